# SPDX-License-Identifier: Apache-2.0
"""The soak's invariant checks fail on injected bugs: each test breaks the
scheduler in one way (monkeypatch) and expects `InvariantViolation`."""

import pytest

from asyncbatch.sim.soak import InvariantViolation, SoakConfig, SoakRun

NUM_REQUESTS = 3_000


def soak(model_dir, **kwargs) -> SoakRun:
    return SoakRun(SoakConfig(num_requests=NUM_REQUESTS, seed=11, **kwargs), model_dir)


def test_clean_run_passes(model_dir):
    f = soak(model_dir, allowed_leftovers=frozenset()).run()
    assert f.num_blocks_leaked == 0 and f.num_aborts > 0


def test_abort_not_passed_to_policy(model_dir, monkeypatch):
    from asyncbatch.glue.queue import PolicyRequestQueue

    def remove_request(self, request):
        del self._requests[request.request_id]

    monkeypatch.setattr(PolicyRequestQueue, "remove_request", remove_request)
    with pytest.raises(InvariantViolation, match="policy holds"):
        soak(model_dir).run()


def test_group_member_dropped_on_abort(model_dir, monkeypatch):
    from asyncbatch.policy.prefix import PrefixGroupingPolicy

    remove = PrefixGroupingPolicy.remove

    def remove_and_drop_sibling(self, request_id):
        entry = self._entries.get(request_id)
        remove(self, request_id)
        unit = entry.unit if entry is not None else None
        if unit is not None and unit.members:
            remove(self, next(iter(unit.members)))

    monkeypatch.setattr(PrefixGroupingPolicy, "remove", remove_and_drop_sibling)
    with pytest.raises(InvariantViolation, match="policy holds"):
        soak(model_dir).run()


def test_block_not_released(model_dir):
    run = soak(model_dir)
    pool = run.scheduler.kv_cache_manager.block_pool
    free_blocks = pool.free_blocks
    num_calls = 0

    def leaky_free_blocks(blocks):
        nonlocal num_calls
        num_calls += 1
        blocks = list(blocks)
        # every 500th release keeps its first block referenced
        free_blocks(blocks[1:] if num_calls % 500 == 0 else blocks)

    pool.free_blocks = leaky_free_blocks
    with pytest.raises(InvariantViolation, match="leaked"):
        run.run()


def test_wait_bound_ignored(model_dir, monkeypatch):
    from asyncbatch.policy.prefix import PrefixGroupingPolicy

    monkeypatch.setattr(PrefixGroupingPolicy, "_is_overdue", lambda self, entry, state: False)
    with pytest.raises(InvariantViolation, match="after it in vLLM's order were admitted"):
        soak(model_dir, settings={"max_wait_steps": 4}).run()


def test_queue_that_removes_only_what_it_holds_is_required(model_dir, monkeypatch):
    """The engine crash of a queue that raises for a request it does not hold:
    vLLM's finish_requests removes an aborted or failed request from the waiting
    queue and from skipped_waiting with the same list, and requests whose grammar
    compiles or whose KV loads wait in skipped_waiting."""
    from asyncbatch.glue.queue import PolicyRequestQueue

    def strict_remove_requests(self, requests):
        for request in requests:
            self.remove_request(request)

    monkeypatch.setattr(PolicyRequestQueue, "remove_requests", strict_remove_requests)
    with pytest.raises(ValueError, match="is not in the waiting queue"):
        SoakRun(SoakConfig(num_requests=NUM_REQUESTS, seed=11).with_request_states(),
                model_dir).run()


def test_request_lost_from_running(model_dir):
    """A request dropped from the running list without being finished."""
    run = soak(model_dir)
    scheduler = run.scheduler
    schedule = scheduler.schedule
    num_calls = 0

    def lossy_schedule(*args, **kwargs):
        nonlocal num_calls
        out = schedule(*args, **kwargs)
        num_calls += 1
        if num_calls == 200 and scheduler.running:
            scheduler.running.pop()
        return out

    scheduler.schedule = lossy_schedule
    with pytest.raises(InvariantViolation, match="lost requests"):
        run.run()

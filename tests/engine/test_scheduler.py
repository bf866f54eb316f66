# SPDX-License-Identifier: Apache-2.0
"""asyncbatch.Scheduler against stock AsyncScheduler on the real vLLM 0.26
scheduler, driven on the CPU with two steps in flight."""

import pytest
from streams import ASYNCBATCH, STOCK, feed, prefix_stream
from vllm.v1.core.sched.async_scheduler import AsyncScheduler

from asyncbatch.config import InvalidSettings
from asyncbatch.glue.scheduler import AsyncSchedulingRequired
from asyncbatch.sim.engine import SimEngine, default_token, make_request

FCFS = {"asyncbatch": {"policy": "fcfs"}}


def run_both(make_scheduler, stream, settings=None, **kwargs):
    """The same stream through stock AsyncScheduler and asyncbatch.Scheduler."""
    results = {}
    for name, cls in (("stock", STOCK), ("asyncbatch", ASYNCBATCH)):
        extra = {"additional_config": settings} if cls == ASYNCBATCH and settings else {}
        engine = SimEngine(make_scheduler(cls, **kwargs, **extra))
        feed(engine, stream, block_size=kwargs.get("block_size", 16))
        assert_idle_and_clean(engine)
        results[name] = engine
    return results["stock"], results["asyncbatch"]


def assert_idle_and_clean(engine):
    s = engine.scheduler
    assert not s.has_requests() and not s.running and not s.waiting and not s.requests
    pool = s.kv_cache_manager.block_pool
    # Every block but vLLM's null block is free again (cached blocks count as free).
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1
    assert set(engine.finished) == set(engine.outputs)


def test_is_an_async_scheduler_resolved_by_qualname(make_scheduler):
    s = make_scheduler(ASYNCBATCH)
    assert isinstance(s, AsyncScheduler)
    assert type(s).__module__ == "asyncbatch.glue.scheduler"
    assert s.vllm_config.scheduler_config.get_scheduler_cls() is type(s)


@pytest.mark.parametrize("seed", [0, 1])
def test_same_tokens_as_stock_with_ample_kv(make_scheduler, seed):
    stream = prefix_stream(seed, num_groups=5, members=6)
    stock, ours = run_both(make_scheduler, stream, FCFS, num_blocks=2048, max_num_seqs=32)
    assert len(ours.finished) == 30
    assert {r: f.output_token_ids for r, f in ours.finished.items()} == {
        r: f.output_token_ids for r, f in stock.finished.items()
    }
    # Pass-through: same batches, so the same number of steps and no idle step.
    assert ours.stats.num_steps == stock.stats.num_steps
    assert ours.stats.num_empty_steps == stock.stats.num_empty_steps


def test_every_running_request_decodes_every_step(make_scheduler):
    """Two steps in flight: a lone request must get a token scheduled in every
    step.  A scheduler that is not an AsyncScheduler skips every other step."""
    engine = SimEngine(make_scheduler(ASYNCBATCH, additional_config=FCFS))
    engine.add_request(make_request("solo", list(range(2, 34)), max_tokens=40))
    engine.run()
    assert len(engine.finished["solo"].output_token_ids) == 40
    assert engine.stats.num_empty_steps <= 2
    # 1 prefill step + 39 more decode steps, plus the final drain of the queue.
    assert engine.stats.num_steps <= 40 + 3


@pytest.mark.parametrize("seed", [2, 3])
def test_kv_pressure_preemption_aborts_and_stops(make_scheduler, seed):
    stream = prefix_stream(seed, num_groups=8, members=5, max_tokens=40, num_aborts=8,
                           num_stops=6)
    # 48 blocks of 16 tokens: far less than the ~40 requests of 80-120 tokens need.
    stock, ours = run_both(make_scheduler, stream, FCFS, num_blocks=48, max_num_seqs=16,
                           max_num_batched_tokens=256)
    assert ours.stats.num_preemptions > 0 and stock.stats.num_preemptions > 0
    reasons = {f.finish_reason for f in ours.finished.values()}
    assert {"abort", "stop", "length"} <= reasons
    for rid, f in ours.finished.items():
        arrival = next(a for a in stream.arrivals if a.request_id == rid)
        if f.finish_reason == "length":
            assert len(f.output_token_ids) == arrival.max_tokens
        if f.finish_reason == "stop":
            assert f.output_token_ids[-1] == 1
        # Same tokens as the model would give, whatever was preempted or aborted.
        expected = [default_token(rid, i) for i in range(len(f.output_token_ids))]
        if f.finish_reason == "stop":
            expected[-1] = 1
        assert f.output_token_ids == expected
    # Requests neither aborted nor stopped end the same way under both schedulers.
    for rid in set(ours.finished) - set(stream.aborts):
        assert ours.finished[rid].output_token_ids == stock.finished[rid].output_token_ids


def test_priority_policy_keeps_priority_semantics(make_scheduler):
    stream = prefix_stream(4, num_groups=4, members=5, priorities=True)
    stock, ours = run_both(make_scheduler, stream, FCFS, num_blocks=64, max_num_seqs=4,
                           scheduling_policy="priority")
    assert type(ours.scheduler.waiting).__name__ == "PolicyRequestQueue"
    assert {r: f.output_token_ids for r, f in ours.finished.items()} == {
        r: f.output_token_ids for r, f in stock.finished.items()
    }
    assert [f.request_id for f in sorted(ours.finished.values(), key=lambda f: f.finish_step)] \
        == [f.request_id for f in sorted(stock.finished.values(), key=lambda f: f.finish_step)]


def test_refuses_without_async_scheduling(make_scheduler):
    with pytest.raises(AsyncSchedulingRequired, match="--no-async-scheduling"):
        make_scheduler(ASYNCBATCH, async_scheduling=False)


def test_invalid_settings_stop_startup(make_scheduler):
    with pytest.raises(InvalidSettings, match="'max_wait'"):
        make_scheduler(ASYNCBATCH, additional_config={"asyncbatch": {"max_wait": 3}})

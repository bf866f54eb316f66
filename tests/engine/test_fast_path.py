# SPDX-License-Identifier: Apache-2.0
"""The steady-decode fast paths for ``allocate_slots`` and ``cache_blocks``
(`asyncbatch.glue.fastpath`) on the real vLLM 0.26 scheduler (CPU).

Every CPU test runs with ``ASYNCBATCH_VERIFY_FAST_PATH=1`` (tests/conftest.py): each
fast answer is checked against vLLM's own path on the same call.  The tests here
also check that the steps scheduled are the same with and without it."""

from types import SimpleNamespace

import pytest
from streams import ASYNCBATCH, STOCK, feed, prefix_stream, settings, trace_steps

from asyncbatch.glue import fastpath
from asyncbatch.glue.fastpath import (
    HAS_VLLM_STEADY_DECODE_PATH,
    FastPathMismatch,
    fast_path_gaps,
)
from asyncbatch.sim.engine import SimEngine

pytestmark = pytest.mark.skipif(
    HAS_VLLM_STEADY_DECODE_PATH,
    reason="vLLM with patches/0006 answers these calls itself "
           "(tests/patches/test_steady_decode.py)")


def run(make_scheduler, cls, stream, num_blocks=48, **kwargs):
    scheduler = make_scheduler(cls, num_blocks=num_blocks, max_num_seqs=16,
                               max_num_batched_tokens=256, **kwargs)
    steps = trace_steps(scheduler)
    engine = feed(SimEngine(scheduler), stream)
    return scheduler, steps, engine


@pytest.mark.parametrize("policy", ["fcfs", "prefix"])
def test_same_steps_with_and_without_the_fast_path(make_scheduler, policy):
    # KV pressure (48 blocks): preemptions, aborts and early stops, prefix caching on
    stream = prefix_stream(11, num_groups=8, members=5, max_tokens=80, num_aborts=6,
                           num_stops=6)
    on, steps_on, engine_on = run(make_scheduler, ASYNCBATCH, stream,
                                  **settings(policy=policy))
    off, steps_off, engine_off = run(make_scheduler, ASYNCBATCH, stream,
                                     **settings(policy=policy, decode_fast_path=False))
    assert on.decode_fast_path is not None and off.decode_fast_path is None
    # most calls are steady decode, and some needed vLLM's path (a new block, a full one)
    for fast in (on.decode_fast_path.slots, on.decode_fast_path.cache):
        assert fast.fast > fast.calls // 2 and fast.calls > fast.fast
    assert engine_on.stats.num_preemptions > 0
    assert steps_on == steps_off
    assert engine_on.outputs == engine_off.outputs


def test_same_steps_without_prefix_caching(make_scheduler):
    # vLLM's cache_blocks does nothing then; allocate_slots has no block to cache
    stream = prefix_stream(15, num_groups=6, members=4, max_tokens=60, num_aborts=4,
                           num_stops=4)
    on, steps_on, engine_on = run(make_scheduler, ASYNCBATCH, stream,
                                  enable_prefix_caching=False, **settings(policy="fcfs"))
    _, steps_off, engine_off = run(make_scheduler, ASYNCBATCH, stream,
                                   enable_prefix_caching=False,
                                   **settings(policy="fcfs", decode_fast_path=False))
    assert on.decode_fast_path is not None
    assert on.decode_fast_path.slots.fast > 0
    assert on.decode_fast_path.cache.fast == on.decode_fast_path.cache.calls > 0
    assert steps_on == steps_off
    assert engine_on.outputs == engine_off.outputs


def test_same_steps_as_stock(make_scheduler):
    stream = prefix_stream(12, num_groups=6, members=4, max_tokens=48, num_stops=4)
    ours, steps_ours, engine_ours = run(make_scheduler, ASYNCBATCH, stream,
                                        **settings(policy="fcfs"))
    _, steps_stock, engine_stock = run(make_scheduler, STOCK, stream)
    assert ours.decode_fast_path is not None and ours.decode_fast_path.slots.fast > 0
    assert ours.decode_fast_path.cache.fast > 0
    assert steps_ours == steps_stock
    assert engine_ours.outputs == engine_stock.outputs


def test_a_wrong_fast_answer_is_caught(make_scheduler, monkeypatch):
    """The check behind every CPU test can fail: a fast path that also skips the
    steps where a block fills or a new one is needed is caught at once."""
    monkeypatch.setattr(fastpath.DecodeSlotsFastPath, "_nothing_to_do",
                        lambda self, request, num_new_tokens: True)
    stream = prefix_stream(13, num_groups=3, members=3, max_tokens=100)
    with pytest.raises(FastPathMismatch, match="changed"):
        run(make_scheduler, ASYNCBATCH, stream, **settings(policy="fcfs"))


def test_a_wrong_cache_blocks_skip_is_caught(make_scheduler, monkeypatch):
    """Skipping cache_blocks also when a block has filled is caught at once. (With
    two steps in flight, vLLM's allocate_slots for the next step caches a filled block
    first, so the call after a step has work only at a request's last step: seed 11
    has one that ends on a block boundary.)"""
    def skip_always(self, request, num_computed_tokens):
        self.fast += 1
        self._check(request, num_computed_tokens)

    monkeypatch.setattr(fastpath.CacheBlocksFastPath, "__call__", skip_always)
    stream = prefix_stream(11, num_groups=3, members=3, max_tokens=100)
    with pytest.raises(FastPathMismatch, match="cached blocks"):
        run(make_scheduler, ASYNCBATCH, stream, **settings(policy="fcfs"))


def test_the_fast_answer_converts_like_vllms_empty_result(make_scheduler):
    scheduler = make_scheduler(ASYNCBATCH)
    answer = scheduler.decode_fast_path.slots.answer
    empty = scheduler.kv_cache_manager.empty_kv_cache_blocks
    assert answer.blocks is empty.blocks
    for allow_none in (True, False):
        assert answer.get_block_ids(allow_none=allow_none) == empty.get_block_ids(
            allow_none=allow_none)
    # fresh lists each time, as vLLM's: a caller may extend them
    assert answer.get_block_ids()[0] is not answer.get_block_ids()[0]


def test_not_installed_where_it_cannot_stand_in(make_scheduler):
    kvm = make_scheduler(ASYNCBATCH).kv_cache_manager
    assert fast_path_gaps(kvm, connector=None) == []
    assert fast_path_gaps(kvm, connector=object()) == ["a KV connector"]
    (manager,) = kvm.coordinator.single_type_managers
    two_groups = SimpleNamespace(coordinator=SimpleNamespace(
        single_type_managers=(manager, manager)), enable_caching=True)
    assert fast_path_gaps(two_groups, None) == ["2 KV cache groups"]
    other = SimpleNamespace(coordinator=SimpleNamespace(
        single_type_managers=(SimpleNamespace(),)), enable_caching=True)
    assert fast_path_gaps(other, None) == ["SimpleNamespace layers"]

# SPDX-License-Identifier: Apache-2.0
"""patches/0006: vLLM's own steady-decode fast path in ``KVCacheManager``, with no
asyncbatch code involved (stock ``AsyncScheduler``)."""

import pytest
from streams import STOCK, feed, prefix_stream, trace_steps

from asyncbatch.glue.fastpath import HAS_VLLM_STEADY_DECODE_PATH
from asyncbatch.sim.engine import SimEngine, build_scheduler


def has_steady_decode_path() -> bool:
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    return hasattr(KVCacheManager, "_steady_decode_needs_nothing")


needs_patch = pytest.mark.skipif(not has_steady_decode_path(),
                                 reason="vLLM without patches/0006")


def run(model_dir, stream, *, fast: bool, **kwargs):
    scheduler = build_scheduler(model_dir, STOCK, num_blocks=48, max_num_seqs=16,
                                max_num_batched_tokens=256, **kwargs)
    kvm = scheduler.kv_cache_manager
    if not fast:
        kvm._steady_decode_manager = None
    answered = []
    needs_nothing = kvm._steady_decode_needs_nothing

    def counting(request, num_new_tokens):
        result = needs_nothing(request, num_new_tokens)
        answered.append(result)
        return result

    kvm._steady_decode_needs_nothing = counting
    steps = trace_steps(scheduler)
    engine = feed(SimEngine(scheduler), stream)
    return steps, engine, answered


@needs_patch
@pytest.mark.parametrize("caching", [True, False])
def test_same_steps_with_and_without_vllms_fast_path(model_dir, caching):
    # KV pressure (48 blocks): preemptions, aborts and early stops
    stream = prefix_stream(11, num_groups=8, members=5, max_tokens=80, num_aborts=6,
                           num_stops=6)
    steps_on, engine_on, answered = run(model_dir, stream, fast=True,
                                        enable_prefix_caching=caching)
    steps_off, engine_off, unused = run(model_dir, stream, fast=False,
                                        enable_prefix_caching=caching)
    assert unused == []
    # most calls are answered by the fast path, and some needed the full one
    assert sum(answered) > len(answered) // 2 and not all(answered)
    assert engine_on.stats.num_preemptions > 0
    assert steps_on == steps_off
    assert engine_on.outputs == engine_off.outputs


@needs_patch
def test_a_wrong_fast_answer_changes_the_steps(model_dir, monkeypatch):
    """The comparison above can fail: a fast path that never allocates does."""
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    stream = prefix_stream(13, num_groups=3, members=3, max_tokens=100)
    steps_off, engine_off, _ = run(model_dir, stream, fast=False)
    monkeypatch.setattr(KVCacheManager, "_steady_decode_needs_nothing",
                        lambda self, request, num_new_tokens: True)
    try:
        steps_bad, engine_bad, _ = run(model_dir, stream, fast=True)
    except (AssertionError, IndexError, KeyError, ValueError):
        return  # vLLM noticed on its own
    assert (steps_bad, engine_bad.outputs) != (steps_off, engine_off.outputs)


def test_empty_blocks_convert_the_same(model_dir):
    kvm = build_scheduler(model_dir, STOCK).kv_cache_manager
    empty = kvm.empty_kv_cache_blocks
    assert empty.get_block_ids(allow_none=True) is None
    assert empty.get_block_ids() == ([],)


@needs_patch
def test_asyncbatch_leaves_the_calls_to_vllm(make_asyncbatch):
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    assert HAS_VLLM_STEADY_DECODE_PATH
    scheduler = make_asyncbatch()
    assert scheduler.decode_fast_path is None
    kvm = scheduler.kv_cache_manager
    assert kvm.allocate_slots.__func__ is KVCacheManager.allocate_slots
    assert kvm.cache_blocks.__func__ is KVCacheManager.cache_blocks
    assert kvm._steady_decode_manager is not None

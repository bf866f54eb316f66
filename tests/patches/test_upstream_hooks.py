# SPDX-License-Identifier: Apache-2.0
"""asyncbatch.Scheduler on vLLM with the hooks of patches/ (vLLM calls the public
methods) and without them (asyncbatch overrides vLLM's private methods).

On a plain install the hook-path tests skip; patches/check.sh runs this file
again on a patched copy of vLLM, where the fallback tests skip."""

import importlib.metadata
import os

import pytest
import vllm
from streams import feed, prefix_stream

from asyncbatch.glue import scheduler as glue
from asyncbatch.glue.graphs import has_default_ceiling_method
from asyncbatch.glue.queue import PolicyRequestQueue
from asyncbatch.sim.engine import SimEngine, make_request

HOOKS = glue.HAS_WAITING_QUEUE_HOOKS and glue.HAS_FINISHED_HOOK and glue.HAS_EVICT_FIRST_HOOK
needs_hooks = pytest.mark.skipif(not HOOKS, reason="vLLM without the patches/ hooks")
needs_fallback = pytest.mark.skipif(HOOKS, reason="vLLM with the patches/ hooks")
OVERRIDES = ("schedule", "_free_request", "_free_request_blocks")


def test_detected_hooks_match_the_vllm_in_use():
    """patches/check.sh says which vLLM it runs on; the glue must see the same."""
    expect = os.environ.get("ASYNCBATCH_EXPECT_HOOKS")
    if expect is None:
        pytest.skip("not run by patches/check.sh")
    detected = (glue.HAS_WAITING_QUEUE_HOOKS, glue.HAS_FINISHED_HOOK, glue.HAS_EVICT_FIRST_HOOK,
                glue.HAS_DEPTH_SETTING, has_default_ceiling_method())
    assert detected == (expect == "1",) * 5
    patched = os.environ.get("ASYNCBATCH_PATCHED_VLLM")
    if patched:
        assert os.path.dirname(vllm.__file__) == patched
    # the dist metadata stays in site-packages: the patched copy reports its release
    release = os.environ.get("ASYNCBATCH_EXPECT_VLLM")
    if release:
        assert importlib.metadata.version("vllm") == release


def pressure_stream():
    return prefix_stream(5, num_groups=10, members=4, prefix_blocks=2, spread_steps=3,
                         max_tokens=48, num_aborts=3)


KW = dict(num_blocks=64, max_num_seqs=32, max_num_batched_tokens=512,
          additional_config={"asyncbatch": {"kv_headroom": 0.0,
                                            "release_done_prefixes": True}})


def run_gated(make_asyncbatch, spy=None):
    engine = SimEngine(make_asyncbatch(**KW))
    s = engine.scheduler
    seen = {"falsy_nonempty": 0}

    def watch(e):
        # The queue is only ever falsy outside schedule() when it is empty.
        if len(e.scheduler.waiting) and not e.scheduler.waiting:
            seen["falsy_nonempty"] += 1

    engine.on_step = watch
    if spy is not None:
        spy(s)
    stream = pressure_stream()
    feed(engine, stream)
    assert not s.requests and not s.waiting and not s.waiting.num_cached_tokens
    pool = s.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1
    assert s.prefix_policy.stats.num_gate_closures > 0
    assert len(engine.finished) == len(stream.arrivals)
    assert seen["falsy_nonempty"] == 0
    return engine


def release_two_siblings(make_asyncbatch):
    engine = SimEngine(make_asyncbatch(
        num_blocks=64, additional_config={"asyncbatch": {"release_done_prefixes": True}}))
    prompt = list(range(2, 2 + 16 * 3))
    for i in range(2):
        engine.add_request(make_request(f"a{i}", prompt + [100 + i], max_tokens=2))
    engine.run()
    queue = engine.scheduler.kv_cache_manager.block_pool.free_block_queue
    assert all(b.block_hash is not None for b in queue.get_all_free_blocks()[:3])
    return engine


@needs_hooks
def test_hook_path_no_private_overrides(make_asyncbatch):
    for name in OVERRIDES:
        assert name not in vars(glue.Scheduler), name
    s = make_asyncbatch()
    assert isinstance(s.waiting, PolicyRequestQueue)
    assert not s.waiting.gate_by_falsiness


@needs_hooks
def test_hook_path_gates_admission_through_may_admit(make_asyncbatch):
    calls = {"may_admit": 0, "refused": 0, "finished": 0}

    def spy(s):
        queue = s.waiting
        may_admit = queue.may_admit
        on_finished = s.on_request_finished

        def counting_may_admit():
            ok = may_admit()
            calls["may_admit"] += 1
            calls["refused"] += not ok
            return ok

        def counting_finished(request):
            calls["finished"] += 1
            on_finished(request)

        queue.may_admit = counting_may_admit
        s.on_request_finished = counting_finished

    engine = run_gated(make_asyncbatch, spy)
    assert calls["may_admit"] > 0 and calls["refused"] > 0
    assert calls["finished"] == len(engine.finished)


@needs_hooks
def test_hook_path_releases_done_prefixes_through_evict_first(make_asyncbatch):
    release_two_siblings(make_asyncbatch)


@needs_fallback
def test_fallback_overrides_private_methods(make_asyncbatch):
    for name in OVERRIDES:
        assert name in vars(glue.Scheduler), name
    s = make_asyncbatch()
    assert isinstance(s.waiting, PolicyRequestQueue)
    assert s.waiting.gate_by_falsiness


@needs_fallback
def test_fallback_gates_admission_through_a_falsy_queue(make_asyncbatch):
    run_gated(make_asyncbatch)


@needs_fallback
def test_fallback_releases_done_prefixes_by_moving_blocks(make_asyncbatch):
    release_two_siblings(make_asyncbatch)


def test_fcfs_queue_has_no_step_callbacks(make_asyncbatch):
    s = make_asyncbatch(additional_config={"asyncbatch": {"policy": "fcfs"}})
    assert s.prefix_policy is None and s.waiting.prefix_policy is None
    engine = SimEngine(s)
    feed(engine, prefix_stream(0, num_groups=2, members=3))
    assert len(engine.finished) == 6


def test_schedule_trace(model_dir):
    """Written for patches/check.sh, which compares it across the two paths."""
    from sched_trace import schedule_trace

    lines = schedule_trace(model_dir)
    assert any(line.startswith("seed 1:") for line in lines)
    out = os.environ.get("ASYNCBATCH_TRACE_OUT")
    if out:
        with open(out, "w") as f:
            f.write("\n".join(lines) + "\n")

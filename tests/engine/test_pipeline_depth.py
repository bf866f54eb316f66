# SPDX-License-Identifier: Apache-2.0
"""A third batch in flight (``pipeline_depth``) on the real vLLM 0.26 scheduler, on CPU.

The CPU platform builds the V1 model runner, so tests that need the V2 runner's
answer make `runs_v2_model_runner` say so; the scheduler side under test does not
depend on the runner itself.
"""

from types import SimpleNamespace

import pytest
from streams import ASYNCBATCH, STOCK, feed, prefix_stream

from asyncbatch.config import InvalidSettings
from asyncbatch.glue import pipeline
from asyncbatch.glue.pipeline import PipelineDepthUnsupported, effective_depth
from asyncbatch.glue.scheduler import VLLM_HOLDS_RESUMES
from asyncbatch.sim.engine import SimEngine, make_request

WORKER = "asyncbatch.Worker"


@pytest.fixture
def v2_runner(monkeypatch):
    monkeypatch.setattr(pipeline, "runs_v2_model_runner", lambda vllm_config: True)


def depth(settings=None):
    return {"additional_config": {"asyncbatch": settings}} if settings else {}


def test_auto_depth_is_three_with_the_worker_on_the_v2_runner(make_scheduler, v2_runner):
    s = make_scheduler(ASYNCBATCH, worker_cls=WORKER)
    assert s.pipeline_depth == 3
    assert s.vllm_config.max_concurrent_batches == 3  # what EngineCore sizes its queue by
    assert SimEngine(s).max_in_flight == 3


@pytest.mark.parametrize("worker_cls, v2", [(None, True), (WORKER, False)])
def test_auto_depth_stays_two_where_unsupported(make_scheduler, monkeypatch, worker_cls, v2):
    monkeypatch.setattr(pipeline, "runs_v2_model_runner", lambda vllm_config: v2)
    s = make_scheduler(ASYNCBATCH, worker_cls=worker_cls)
    assert s.pipeline_depth == 2
    assert s.vllm_config.max_concurrent_batches == 2


def test_explicit_depth_two_with_the_worker(make_scheduler, v2_runner):
    s = make_scheduler(ASYNCBATCH, worker_cls=WORKER, **depth({"pipeline_depth": 2}))
    assert s.pipeline_depth == 2 and s.vllm_config.max_concurrent_batches == 2


def test_explicit_depth_without_the_worker_is_refused(make_scheduler, v2_runner):
    with pytest.raises(PipelineDepthUnsupported, match="--worker-cls asyncbatch.Worker"):
        make_scheduler(ASYNCBATCH, **depth({"pipeline_depth": 3}))


def test_explicit_depth_names_every_reason(make_scheduler):
    # V1 runner (the CPU platform's) and vLLM's own worker: both reasons, one message
    with pytest.raises(PipelineDepthUnsupported) as e:
        make_scheduler(ASYNCBATCH, **depth({"pipeline_depth": 4}))
    message = str(e.value)
    assert "V1 model runner" in message and "--worker-cls" in message
    assert '"pipeline_depth": 2' in message


def fake_config(**overrides):
    parallel = SimpleNamespace(worker_cls=WORKER, pipeline_parallel_size=1)
    model = SimpleNamespace(get_sliding_window=lambda: None, attention_chunk_size=None)
    config = SimpleNamespace(
        model_config=model,
        scheduler_config=SimpleNamespace(async_scheduling=True), parallel_config=parallel,
        speculative_config=None, use_v2_model_runner=True, additional_config={})
    for key, value in overrides.items():
        target = parallel if key == "pipeline_parallel_size" else config
        setattr(target, key, value)
    return config


@pytest.mark.parametrize("overrides, expected", [
    ({"pipeline_parallel_size": 2}, "pipeline parallelism (pp=2)"),
    ({"speculative_config": object()}, "speculative decoding"),
    ({"use_v2_model_runner": False}, "V1 model runner"),
    ({"scheduler_config": SimpleNamespace(async_scheduling=False)}, "async scheduling is off"),
    ({"model_config": SimpleNamespace(get_sliding_window=lambda: 4096,
                                      attention_chunk_size=None)}, "sliding-window"),
    ({"model_config": SimpleNamespace(get_sliding_window=lambda: None,
                                      attention_chunk_size=8192)}, "chunked-local"),
])
def test_unsupported_combinations(overrides, expected):
    config = fake_config(**overrides)
    reasons = pipeline.unsupported_reasons(config, 3)
    assert len(reasons) == 1 and expected in reasons[0]
    assert effective_depth(config) == 2  # unset: falls back to vLLM's depth
    assert pipeline.unsupported_reasons(fake_config(), 3) == []
    assert effective_depth(fake_config()) == 3


def test_invalid_settings_do_not_break_the_property_but_stop_the_scheduler(make_scheduler):
    config = fake_config(additional_config={"asyncbatch": {"pipeline_depth": 9}})
    assert effective_depth(config) == 2
    with pytest.raises(InvalidSettings, match="pipeline_depth"):
        make_scheduler(ASYNCBATCH, worker_cls=WORKER, **depth({"pipeline_depth": 9}))


def test_sync_scheduling_keeps_one_batch(make_scheduler, v2_runner):
    s = make_scheduler(STOCK, worker_cls=WORKER, async_scheduling=False)
    assert s.vllm_config.max_concurrent_batches == 1


def run_stream(make_scheduler, cls, stream, **kwargs):
    engine = SimEngine(make_scheduler(cls, **kwargs))
    seen = []

    def record(e):
        # after a step's completion: the batches still queued behind the one done
        seen.append(len(e.in_flight) + 1)

    engine.on_step = record
    feed(engine, stream)
    s = engine.scheduler
    assert not s.has_requests() and not s.requests
    pool = s.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1
    return engine, max(seen)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_third_batch_gives_the_same_tokens_as_stock(make_scheduler, v2_runner, seed):
    """Shuffled prefix groups under KV pressure, with aborts and early stops:
    every request that was not aborted gets the same tokens with three batches
    in flight as stock vLLM gives it with two."""
    stream = prefix_stream(seed, num_groups=6, members=6, num_aborts=4, num_stops=6,
                           max_tokens=48)
    stock, stock_depth = run_stream(make_scheduler, STOCK, stream, num_blocks=40)
    deep, deep_depth = run_stream(make_scheduler, ASYNCBATCH, stream, num_blocks=40,
                                  worker_cls=WORKER, **depth({"policy": "fcfs"}))
    assert (stock_depth, deep_depth) == (2, 3)
    kept = [rid for rid in stock.outputs if rid not in stream.aborts]
    assert {r: deep.outputs[r] for r in kept} == {r: stock.outputs[r] for r in kept}
    assert deep.stats.num_preemptions > 0  # the KV pressure was real


def preempting_runs(make_scheduler):
    """Three shuffled prefix streams under KV pressure, each with a fresh engine three
    deep (``fcfs`` policy), whose preemptions hit requests with steps in flight."""
    for seed in range(3):
        stream = prefix_stream(seed, num_groups=6, members=6, max_tokens=48)
        yield SimEngine(make_scheduler(ASYNCBATCH, num_blocks=40, worker_cls=WORKER,
                                       **depth({"policy": "fcfs"}))), stream


def test_a_request_preempted_with_a_step_in_flight_resumes_after_it(make_scheduler,
                                                                     v2_runner):
    """Three in flight: a request preempted while a step that samples for it is
    still in flight waits until that step has returned.  Resumed earlier,
    its prefill would sample the position that step samples, and vLLM's
    ``num_output_placeholders >= 0`` assertion would end the engine (seen on a GPU
    under KV pressure); vLLM 0.33 holds such a request back itself."""
    held = resumed = 0
    for engine, stream in preempting_runs(make_scheduler):
        s = engine.scheduler
        assert s.hold_resumes is not VLLM_HOLDS_RESUMES

        schedule = s.schedule

        def checked_schedule(s=s, schedule=schedule):
            nonlocal resumed
            out = schedule()
            ids = {new.req_id for new in out.scheduled_new_reqs}
            ids |= set(out.scheduled_cached_reqs.resumed_req_ids)
            for rid in ids:
                request = s.requests[rid]
                if request.num_preemptions:
                    resumed += 1
                    # no step that samples for it in flight, but this one if it samples
                    samples = 0 if request.is_prefill_chunk else 1
                    assert request.num_output_placeholders == samples
            return out

        s.schedule = checked_schedule
        feed(engine, stream)
        held += s.num_held_resumes
    assert resumed > 0  # preempted requests did resume
    if not VLLM_HOLDS_RESUMES:
        assert held > 0  # and some had to wait for a step in flight


def test_without_the_hold_vllm_026_asserts(make_scheduler, v2_runner):
    """The same streams with the hold switched off end in vLLM 0.26's assertion, as
    the engine did on the GPU."""
    if VLLM_HOLDS_RESUMES:
        pytest.skip("this vLLM holds such a request back itself")
    with pytest.raises(AssertionError) as e:
        for engine, stream in preempting_runs(make_scheduler):
            assert engine.scheduler.hold_resumes
            engine.scheduler.hold_resumes = False
            feed(engine, stream)
    where = e.traceback[-1]
    assert str(where.path).endswith("async_scheduler.py")  # num_output_placeholders >= 0
    assert "num_output_placeholders" in str(where.statement)


def test_a_lone_request_decodes_every_step_and_wastes_at_most_one_token(
        make_scheduler, v2_runner):
    """Three in flight: a request gets a token scheduled in every step, and
    scheduling runs at most one step past its last token (discarded)."""
    results = {}
    for cls, extra in ((STOCK, {}), (ASYNCBATCH, {"worker_cls": WORKER})):
        engine = SimEngine(make_scheduler(cls, **extra))
        engine.add_request(make_request("solo", list(range(2, 40)), max_tokens=50))
        decode_steps = 0
        while engine.has_work():
            engine.step()
            out = engine.last_scheduled
            if out is not None and out.num_scheduled_tokens.get("solo") == 1:
                decode_steps += 1
        assert len(engine.outputs["solo"]) == 50
        results[cls] = (decode_steps, engine.stats.num_scheduled_tokens)
    (stock_decodes, stock_tokens), (deep_decodes, deep_tokens) = results[STOCK], results[
        ASYNCBATCH]
    assert stock_decodes == 49  # vLLM's own: max_tokens - 1 decode steps after prefill
    assert deep_decodes - stock_decodes in (0, 1)
    assert deep_tokens - stock_tokens in (0, 1)

# SPDX-License-Identifier: Apache-2.0
"""Bad input: each gives one clear error, at start-up or for that request only,
and the scheduler keeps serving the other requests."""

from types import SimpleNamespace

import pytest
from reliability_support import needs_vllm

from asyncbatch import _compat
from asyncbatch.config import AsyncBatchConfig, InvalidSettings
from asyncbatch.sim.soak import ASYNCBATCH, STOCK, check_kv, num_blocks_in_use

BOTH = pytest.mark.parametrize("cls", [STOCK, ASYNCBATCH], ids=["stock", "asyncbatch"])

# ------------------------------------------------------------------ settings


@pytest.mark.parametrize("key, value, allowed", [
    ("grouping", "yes", "true or false"),
    ("grouping", 1, "true or false"),
    ("min_shared_blocks", 0, ">= 1"),
    ("min_shared_blocks", 1.5, "an integer"),
    ("decode_first", None, "true or false"),
    ("max_wait_steps", -1, ">= 0"),
    ("max_wait_steps", "512", "an integer"),
    ("max_wait_s", 0, "> 0"),
    ("max_wait_s", "1s", "null"),
    ("memory_gate", "false", "true or false"),
    ("kv_headroom", 0.9, "<= 0.5"),
    ("kv_headroom", -2, ">= -1.0"),
    ("release_done_prefixes", [], "true or false"),
    ("policy", None, '"prefix"'),
])
def test_each_invalid_setting_names_key_and_allowed_values(key, value, allowed):
    with pytest.raises(InvalidSettings) as e:
        AsyncBatchConfig.from_additional_config({"asyncbatch": {key: value}})
    msg = str(e.value)
    assert f"'{key}'" in msg and allowed in msg
    assert msg.count("\n") == 0


def test_all_invalid_settings_in_one_message():
    with pytest.raises(InvalidSettings) as e:
        AsyncBatchConfig.from_additional_config(
            {"asyncbatch": {"max_wait_steps": -1, "kv_headroom": 2.0, "colour": "red"}})
    msg = str(e.value)
    assert "'max_wait_steps'" in msg and "'kv_headroom'" in msg and "'colour'" in msg


@pytest.mark.parametrize("settings", [{"policy": "lifo"}, {"max_wait_steps": -1}, []])
def test_invalid_settings_stop_the_scheduler(model_dir, settings):
    from asyncbatch.sim.engine import build_scheduler

    with pytest.raises(InvalidSettings):
        build_scheduler(model_dir, ASYNCBATCH, additional_config={"asyncbatch": settings})


# --------------------------------------------------------------- vLLM version


@pytest.mark.parametrize("version", ["0.25.2", "0.34.0"])
def test_scheduler_refuses_other_vllm(model_dir, monkeypatch, version):
    from asyncbatch.sim.engine import build_scheduler

    monkeypatch.setattr(_compat, "installed_vllm_version", lambda: version)
    with pytest.raises(_compat.UnsupportedVllmVersion, match=version.replace(".", r"\.")):
        build_scheduler(model_dir, ASYNCBATCH)


# ------------------------------------------------------ option combinations


def fake_config(**overrides):
    config = SimpleNamespace(
        scheduler_config=SimpleNamespace(async_scheduling=False),
        model_config=SimpleNamespace(runner_type="generate"),
        speculative_config=None,
        parallel_config=SimpleNamespace(distributed_executor_backend="uni"),
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


@pytest.mark.parametrize("overrides, expected", [
    ({"model_config": SimpleNamespace(runner_type="pooling")}, "pooling"),
    ({"speculative_config": SimpleNamespace(method="ngram",
                                            disable_padded_drafter_batch=False)},
     "'ngram'"),
    ({"speculative_config": SimpleNamespace(method="eagle",
                                            disable_padded_drafter_batch=True)},
     "disable_padded_drafter_batch"),
    ({}, "--no-async-scheduling"),
])
def test_unsupported_combinations_say_what_to_change(overrides, expected):
    needs_vllm()
    from asyncbatch.glue.checks import async_scheduling_disabled_reason

    reason = async_scheduling_disabled_reason(fake_config(**overrides))
    assert reason is not None and expected in reason


def test_async_scheduling_on_is_accepted():
    needs_vllm()
    from asyncbatch.glue.checks import async_scheduling_disabled_reason

    config = fake_config(scheduler_config=SimpleNamespace(async_scheduling=True))
    assert async_scheduling_disabled_reason(config) is None


# ------------------------------------------------------------------ requests


def run_with_checks(engine, max_steps=10_000):
    """Run to idle, checking the KV invariant after every step."""
    s = engine.scheduler
    for _ in range(max_steps):
        if not engine.has_work():
            break
        engine.step()
        check_kv(s, {r.request_id for r in s.running})
    assert not engine.has_work()
    assert num_blocks_in_use(s) == 0 and not s.requests


def normal_requests(n=6):
    from asyncbatch.sim.engine import make_request

    return [make_request(f"ok{i}", list(range(2, 20 + 5 * i)), max_tokens=12)
            for i in range(n)]


@BOTH
def test_max_tokens_past_model_length_ends_there(model_dir, cls):
    from asyncbatch.sim.engine import SimEngine, build_scheduler, make_request

    engine = SimEngine(build_scheduler(model_dir, cls, max_model_len=128, num_blocks=64))
    engine.add_request(make_request("long", list(range(2, 102)), max_tokens=10**6))
    engine.add_request(make_request("edge", list(range(2, 129)), max_tokens=50))
    engine.add_request(make_request("one", [5], max_tokens=3))
    for r in normal_requests():
        engine.add_request(r)
    run_with_checks(engine)
    long, edge = engine.finished["long"], engine.finished["edge"]
    assert long.finish_reason == "length" and len(long.output_token_ids) == 128 - 100
    # a prompt one token short of the model length gets exactly one token
    assert edge.finish_reason == "length" and len(edge.output_token_ids) == 1
    assert len(engine.finished["one"].output_token_ids) == 3
    for i in range(6):
        assert len(engine.finished[f"ok{i}"].output_token_ids) == 12


@BOTH
def test_aborts_of_unknown_finished_and_aborted_ids_are_ignored(model_dir, cls):
    from vllm.v1.request import RequestStatus

    from asyncbatch.sim.engine import SimEngine, build_scheduler

    engine = SimEngine(build_scheduler(model_dir, cls, num_blocks=64))
    for r in normal_requests():
        engine.add_request(r)
    scheduler = engine.scheduler
    assert scheduler.finish_requests(["nope"], RequestStatus.FINISHED_ABORTED) == []
    engine.step()
    engine.abort(["ok1"])
    engine.abort(["ok1", "ok1", "nope"])
    assert scheduler.finish_requests(["ok1"], RequestStatus.FINISHED_ABORTED) == []
    run_with_checks(engine)
    assert scheduler.finish_requests(["ok2"], RequestStatus.FINISHED_ABORTED) == []
    assert engine.finished["ok1"].finish_reason == "abort"
    assert all(engine.finished[f"ok{i}"].finish_reason == "length" for i in (0, 2, 3, 4, 5))


@BOTH
def test_front_end_rejects_bad_prompts_and_the_others_are_served(model_dir, cls):
    """vLLM's own InputProcessor (the front end's validation) on this model
    folder: empty prompts and prompts at or past max_model_len are refused one
    by one; the valid requests then go through the real scheduler."""
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.request import Request

    from asyncbatch.sim.engine import SimEngine, build_scheduler

    scheduler = build_scheduler(model_dir, cls, max_model_len=64, num_blocks=64)
    processor = InputProcessor(scheduler.vllm_config)
    init_none_hash(sha256)
    hasher = get_request_block_hasher(16, sha256)
    prompts = {
        "empty": [],
        "too-long": list(range(2, 80)),
        "at-limit": list(range(2, 66)),
        "one-token": [7],
        "ok": list(range(2, 40)),
    }
    try:  # vLLM >= 0.33 raises its own client error
        from vllm.exceptions import VLLMValidationError
        rejected: tuple[type[Exception], ...] = (ValueError, VLLMValidationError)
    except ImportError:
        rejected = (ValueError,)
    engine = SimEngine(scheduler)
    errors = {}
    for rid, tokens in prompts.items():
        params = SamplingParams(max_tokens=8)
        try:
            core_request = processor.process_inputs(
                rid, {"type": "token", "prompt_token_ids": tokens}, params,
                supported_tasks=("generate",))
        except rejected as e:
            errors[rid] = str(e)
            continue
        engine.add_request(Request.from_engine_core_request(core_request, hasher))
    assert set(errors) == {"empty", "too-long", "at-limit"}
    assert "cannot be empty" in errors["empty"]
    assert "maximum model length" in errors["too-long"]
    run_with_checks(engine)
    assert len(engine.finished["one-token"].output_token_ids) == 8
    assert len(engine.finished["ok"].output_token_ids) == 8


def pending_grammar(request):
    """Hold ``request``'s grammar compilation open (as EngineCore's thread pool does
    while it compiles) and return the future that ends it."""
    from concurrent.futures import Future

    future = Future()
    request.structured_output_request._grammar = future
    return future


def grammar_request(engine, rid, prompt):
    from asyncbatch.sim.engine import make_request
    from asyncbatch.sim.soak import GRAMMAR_REGEX

    request = make_request(rid, prompt, max_tokens=6, regex=GRAMMAR_REGEX)
    engine.scheduler.structured_output_manager.grammar_init(request)
    compiled = request.structured_output_request._grammar
    engine.outputs[rid] = []
    return request, compiled


@BOTH
@pytest.mark.parametrize("policy", ["prefix", "fcfs"])
def test_grammar_that_fails_to_compile_ends_that_request_with_vllms_error(
        model_dir, cls, policy):
    """The request whose grammar fails is parked (skipped_waiting up to vLLM 0.30,
    deferred_waiting from 0.31); vLLM finishes it with FINISHED_ERROR and removes
    it from every waiting queue with one list."""
    from asyncbatch.sim.engine import SimEngine, build_scheduler

    extra = {} if cls == STOCK else {"additional_config": {"asyncbatch": {"policy": policy}}}
    engine = SimEngine(build_scheduler(model_dir, cls, num_blocks=64, **extra))
    bad, _ = grammar_request(engine, "bad-grammar", list(range(2, 30)))
    future = pending_grammar(bad)
    engine.scheduler.add_request(bad)
    for r in normal_requests():
        engine.add_request(r)
    engine.step()
    assert _compat.is_parked(engine.scheduler, bad)
    future.set_exception(RuntimeError("grammar does not compile"))
    run_with_checks(engine)
    assert engine.finished["bad-grammar"].finish_reason == "error"
    assert engine.finished["bad-grammar"].output_token_ids == []
    assert all(engine.finished[f"ok{i}"].finish_reason == "length" for i in range(6))


@BOTH
@pytest.mark.parametrize("policy", ["prefix", "fcfs"])
def test_abort_while_the_grammar_compiles(model_dir, cls, policy):
    from asyncbatch.sim.engine import SimEngine, build_scheduler

    extra = {} if cls == STOCK else {"additional_config": {"asyncbatch": {"policy": policy}}}
    engine = SimEngine(build_scheduler(model_dir, cls, num_blocks=64, **extra))
    request, compiled = grammar_request(engine, "compiling", list(range(2, 30)))
    pending_grammar(request)
    engine.scheduler.add_request(request)
    for r in normal_requests():
        engine.add_request(r)
    engine.step()
    engine.abort(["compiling"])
    assert "compiling" not in engine.scheduler.requests
    assert not _compat.is_parked(engine.scheduler, request)
    assert all(request not in q for q in (engine.scheduler.waiting,
                                          *_compat.parked_queues(engine.scheduler)))
    run_with_checks(engine)
    assert engine.finished["compiling"].finish_reason == "abort"
    assert all(engine.finished[f"ok{i}"].finish_reason == "length" for i in range(6))


@BOTH
def test_abort_racing_a_finish(model_dir, cls):
    """The abort arrives while the step that finishes the request is in flight:
    the request ends once, by the abort (EngineCore applies aborts before it
    processes the step's output), and its late token is dropped."""
    from asyncbatch.sim.engine import SimEngine, build_scheduler, make_request

    engine = SimEngine(build_scheduler(model_dir, cls, num_blocks=64))
    engine.add_request(make_request("short", list(range(2, 12)), max_tokens=2))
    for r in normal_requests():
        engine.add_request(r)
    while not any(out.num_scheduled_tokens.get("short") and
                  engine.scheduler.requests["short"].num_output_placeholders
                  + engine.scheduler.requests["short"].num_output_tokens >= 2
                  for out, _, _ in engine.in_flight):
        engine.step()
    engine.abort(["short"])
    run_with_checks(engine)
    record = engine.finished["short"]
    assert record.finish_reason == "abort" and len(record.output_token_ids) < 2
    assert all(engine.finished[f"ok{i}"].finish_reason == "length" for i in range(6))

# SPDX-License-Identifier: Apache-2.0
"""Structured outputs (a grammar per request) with two and three batches in flight.

EngineCore computes a step's grammar bitmask at once, or, when a request in it
still waits on a token of an earlier step, after the oldest step in flight has
been processed. `SimEngine` does the same, and its simulated sampler only emits
tokens the bitmask allows, so a bitmask computed from a stale grammar shows up
as vLLM's own "grammar rejected tokens" error finish.
"""

import pytest
from streams import ASYNCBATCH, STOCK

from asyncbatch.glue import pipeline
from asyncbatch.glue.scheduler import Scheduler
from asyncbatch.sim.engine import SimEngine, constrained_token, make_request

pytest.importorskip("xgrammar", reason="vLLM's structured-output backend is not installed")

WORKER = "asyncbatch.Worker"
# the word-level test tokenizer spells token i as "ti": this grammar alternates 5 and 7
REGEX = "(t5t7)+"


@pytest.fixture
def v2_runner(monkeypatch):
    monkeypatch.setattr(pipeline, "runs_v2_model_runner", lambda vllm_config: True)


def run(scheduler, *, num_structured=6, num_plain=6, max_tokens=12):
    """Plain requests first, then, one step later, requests under a grammar: they
    join a pipeline that is already running, as requests do on a server.

    Returns the engine, with ``placeholders``: request kind ("s" structured,
    "p" plain) -> the most steps one request of that kind had in flight at the
    end of a step that scheduled it."""
    engine = SimEngine(scheduler)
    engine.placeholders = {"s": 0, "p": 0}

    def record(e):
        out = e.last_scheduled
        for rid in out.num_scheduled_tokens if out is not None else ():
            request = e.scheduler.requests.get(rid)
            if request is not None and not request.is_prefill_chunk:
                kind = rid[0]
                e.placeholders[kind] = max(e.placeholders[kind],
                                           request.num_output_placeholders)

    engine.on_step = record

    def add(i, regex):
        engine.add_request(make_request(
            f"{'s' if regex else 'p'}{i}", [10 + i, 11, 12, 13, 14, 15, 16, 17],
            max_tokens=max_tokens, ignore_eos=True, regex=regex))

    for i in range(num_plain):
        add(i, None)
    engine.step()
    for i in range(num_plain, num_plain + num_structured):
        add(i, REGEX)
    engine.run(max_steps=10_000)
    assert not scheduler.requests
    return engine


def deep_scheduler(make_scheduler):
    """asyncbatch with the worker: three in flight, vLLM's own admission order."""
    return make_scheduler(ASYNCBATCH, worker_cls=WORKER,
                          additional_config={"asyncbatch": {"policy": "fcfs"}})


def expected_structured(max_tokens):
    return [5 if k % 2 == 0 else 7 for k in range(max_tokens)]


def test_constrained_token_prefers_the_model_token_then_the_smallest_allowed():
    row = [0, 0]  # 64 tokens, two int32 words
    row[0] |= 1 << 1  # eos
    row[1] |= 1 << (40 - 32)
    assert constrained_token(row, 40) == 40
    assert constrained_token(row, 3) == 40  # not allowed: the smallest allowed non-eos
    assert constrained_token([1 << 1, 0], 3) == 1  # only eos allowed
    row[1] |= 1 << 31  # the sign bit of an int32 word: token 63
    assert constrained_token([0, -(1 << 31)], 3) == 63


def test_stock_two_in_flight_follows_the_grammar(make_scheduler):
    engine = run(make_scheduler(STOCK))
    assert engine.max_in_flight == 2
    reasons = {r.finish_reason for r in engine.finished.values()}
    assert reasons == {"length"}
    for rid, out in engine.outputs.items():
        if rid.startswith("s"):
            assert out == expected_structured(12)


def test_three_in_flight_gives_the_same_tokens_as_stock(make_scheduler, v2_runner):
    stock = run(make_scheduler(STOCK))
    deep = run(deep_scheduler(make_scheduler))
    assert deep.max_in_flight == 3
    assert {r.finish_reason for r in deep.finished.values()} == {"length"}
    assert deep.outputs == stock.outputs
    # plain requests have three steps in flight; structured ones at most two: the
    # one a deferred bitmask waits for, and their own
    # steps still in flight per request at the end of a step (after the oldest
    # step's tokens came back): plain requests get the third batch, structured
    # ones stay at stock's cadence
    assert deep.placeholders == {"s": 1, "p": 2}
    assert stock.placeholders == {"s": 1, "p": 1}


def test_without_spacing_three_in_flight_breaks_the_grammar(make_scheduler, v2_runner,
                                                            monkeypatch):
    """Why the spacing exists: three in flight with vLLM's own gate only, and
    the bitmask comes from a grammar one token behind."""
    monkeypatch.setattr(Scheduler, "_space_structured_output_steps", lambda self, out: None)
    engine = run(deep_scheduler(make_scheduler))
    assert engine.max_in_flight == 3
    errors = [rid for rid, r in engine.finished.items() if r.finish_reason == "error"]
    assert errors and all(rid.startswith("s") for rid in errors)
    assert engine.placeholders["s"] == 2

# SPDX-License-Identifier: Apache-2.0
"""patches/0007: vLLM's own plain-decode fast path in ``update_from_output``, with
no asyncbatch code involved (stock ``AsyncScheduler``).

Each test runs the same requests with vLLM's fast path on and forced off and
compares, after every ``update_from_output``, the outputs it returned (in order)
and the state of every request and of the KV cache manager."""

import pytest
from outputs import SPECIAL_LIMITS, record, run_special_requests
from streams import STOCK, feed, prefix_stream

from asyncbatch.glue.fastoutput import HAS_VLLM_PLAIN_DECODE_OUTPUT
from asyncbatch.sim.engine import SimEngine, build_scheduler

needs_patch = pytest.mark.skipif(not HAS_VLLM_PLAIN_DECODE_OUTPUT,
                                 reason="vLLM without patches/0007")


def instrument(scheduler, *, fast: bool) -> list[bool]:
    """Count the fast path's answers (True: it handled the request); ``fast=False``
    makes it decline every request, so vLLM's general loop handles all."""
    answered: list[bool] = []
    plain = scheduler._update_plain_decode

    def counting(request, new_token_ids):
        result = fast and plain(request, new_token_ids)
        answered.append(result)
        return result

    scheduler._update_plain_decode = counting
    return answered


def run_stream(model_dir, stream, *, fast: bool, **kwargs):
    scheduler = build_scheduler(model_dir, STOCK, num_blocks=48, max_num_seqs=16,
                                max_num_batched_tokens=256, **kwargs)
    answered = instrument(scheduler, fast=fast)
    steps = record(scheduler)
    feed(SimEngine(scheduler), stream)
    return steps, answered


def run_special(model_dir, *, fast: bool):
    scheduler = build_scheduler(model_dir, STOCK, **SPECIAL_LIMITS)
    answered = instrument(scheduler, fast=fast)
    steps, engine = run_special_requests(scheduler)
    return steps, answered, engine


@needs_patch
@pytest.mark.parametrize("caching", [True, False])
def test_same_outputs_and_state_with_and_without_vllms_fast_path(model_dir, caching):
    # KV pressure (48 blocks): preemptions, aborts and early stops
    stream = prefix_stream(11, num_groups=8, members=5, max_tokens=80, num_aborts=6,
                           num_stops=6)
    steps_on, answered = run_stream(model_dir, stream, fast=True,
                                    enable_prefix_caching=caching)
    steps_off, _ = run_stream(model_dir, stream, fast=False, enable_prefix_caching=caching)
    # most requests took the fast path, and some needed the general loop
    assert sum(answered) > len(answered) // 2 and not all(answered)
    assert len(steps_on) == len(steps_off)
    for i, (a, b) in enumerate(zip(steps_on, steps_off, strict=True)):
        assert a == b, f"step {i}"


@needs_patch
def test_every_stop_rule_the_same(model_dir):
    steps_on, answered, engine = run_special(model_dir, fast=True)
    steps_off, _, _ = run_special(model_dir, fast=False)
    assert any(answered)
    reasons = {rid[:-1]: f.finish_reason for rid, f in engine.finished.items()}
    assert reasons == {"plain": "length", "stopid": "stop", "mintok": "stop",
                       "logprobs": "length", "rep": "repetition", "long": "length"}
    assert steps_on == steps_off


@needs_patch
def test_a_wrong_stop_check_changes_the_outputs(model_dir, monkeypatch):
    """The comparison above can fail: a may_stop that misses EOS does."""
    from vllm.v1.core.sched import scheduler as vllm_scheduler

    steps_off, _, _ = run_special(model_dir, fast=False)
    may_stop = vllm_scheduler.may_stop
    monkeypatch.setattr(
        vllm_scheduler, "may_stop",
        lambda request, token, max_model_len: (
            token != request.sampling_params.eos_token_id
            and may_stop(request, token, max_model_len)))
    steps_bad, _, _ = run_special(model_dir, fast=True)
    assert steps_bad != steps_off


@needs_patch
def test_asyncbatch_leaves_it_to_vllm(make_asyncbatch):
    scheduler = make_asyncbatch(num_blocks=400, max_num_seqs=16, max_num_batched_tokens=256)
    assert scheduler.decode_fast_output is None
    answered = instrument(scheduler, fast=True)
    feed(SimEngine(scheduler), prefix_stream(12, num_groups=3, members=3, max_tokens=30))
    assert any(answered)

# SPDX-License-Identifier: Apache-2.0
"""The steady-decode fast path for ``update_from_output``
(`asyncbatch.glue.fastoutput`) on the real vLLM scheduler (CPU; 0.26 and 0.33 lay out
that loop differently).

Each test runs the same requests with the fast path on and off and compares, after
every ``update_from_output``, the ``EngineCoreOutputs`` it returned (in order) and
the state of every request and of the KV cache manager."""

from types import SimpleNamespace

import pytest
from outputs import SPECIAL_LIMITS, record, run_special_requests
from streams import ASYNCBATCH, STOCK, feed, prefix_stream, settings

from asyncbatch._compat import output_loop_since_033
from asyncbatch.glue import fastoutput
from asyncbatch.glue.fastoutput import HAS_VLLM_PLAIN_DECODE_OUTPUT, fast_output_gaps
from asyncbatch.glue.overrides import fast_path_verified
from asyncbatch.sim.engine import SimEngine

pytestmark = [
    pytest.mark.skipif(
        HAS_VLLM_PLAIN_DECODE_OUTPUT,
        reason="vLLM with patches/0007 has the same fast path in its own loop "
               "(tests/patches/test_plain_decode_output.py)"),
    pytest.mark.skipif(
        not HAS_VLLM_PLAIN_DECODE_OUTPUT and fast_path_verified("decode_fast_output") is not None,
        reason=f"decode_fast_output is off here: {fast_path_verified('decode_fast_output')} "
               "(tests/engine/test_overrides.py checks that it is)"),
]


def run_stream(make_scheduler, stream, cls=ASYNCBATCH, num_blocks=48, **kwargs):
    scheduler = make_scheduler(cls, num_blocks=num_blocks, max_num_seqs=16,
                               max_num_batched_tokens=256, **kwargs)
    steps = record(scheduler)
    engine = feed(SimEngine(scheduler), stream)
    return scheduler, steps, engine


@pytest.mark.parametrize("policy,caching", [("fcfs", True), ("prefix", True),
                                            ("fcfs", False)])
def test_same_outputs_and_state_with_and_without_it(make_scheduler, policy, caching):
    # KV pressure (48 blocks): preemptions, aborts, early stops
    stream = prefix_stream(11, num_groups=8, members=5, max_tokens=80, num_aborts=6,
                           num_stops=6)
    on, steps_on, engine_on = run_stream(make_scheduler, stream,
                                         enable_prefix_caching=caching,
                                         **settings(policy=policy))
    _, steps_off, engine_off = run_stream(
        make_scheduler, stream, enable_prefix_caching=caching,
        **settings(policy=policy, decode_fast_output=False))
    fast = on.decode_fast_output
    assert fast is not None
    # most requests took the fast path, and some needed vLLM's loop
    assert fast.fast > fast.slow > 0
    assert engine_on.stats.num_preemptions > 0
    assert len(steps_on) == len(steps_off)
    for i, (a, b) in enumerate(zip(steps_on, steps_off, strict=True)):
        assert a == b, f"step {i}"
    assert engine_on.finished == engine_off.finished


def test_same_outputs_as_stock(make_scheduler):
    stream = prefix_stream(12, num_groups=6, members=4, max_tokens=48, num_stops=4)
    ours, steps_ours, _ = run_stream(make_scheduler, stream, **settings(policy="fcfs"))
    _, steps_stock, _ = run_stream(make_scheduler, stream, cls=STOCK)
    assert ours.decode_fast_output is not None and ours.decode_fast_output.fast > 0
    assert steps_ours == steps_stock


def run_special(make_scheduler, **kwargs):
    scheduler = make_scheduler(ASYNCBATCH, **SPECIAL_LIMITS, **kwargs)
    return scheduler, *run_special_requests(scheduler)


def test_every_stop_rule_the_same(make_scheduler):
    on, steps_on, engine_on = run_special(make_scheduler, **settings(policy="fcfs"))
    _, steps_off, engine_off = run_special(
        make_scheduler, **settings(policy="fcfs", decode_fast_output=False))
    assert on.decode_fast_output is not None and on.decode_fast_output.fast > 0
    reasons = {rid[:-1]: f.finish_reason for rid, f in engine_on.finished.items()}
    assert reasons == {"plain": "length", "stopid": "stop", "mintok": "stop",
                       "logprobs": "length", "rep": "repetition", "long": "length"}
    # min_tokens held the early EOS back (vLLM <= 0.32); vLLM 0.33's check_stop stops at
    # an EOS whatever min_tokens says (its sampler keeps the EOS from being sampled)
    lengths = [len(engine_on.finished[f"mintok{i}"].output_token_ids) for i in range(4)]
    assert lengths == ([3] * 4 if output_loop_since_033() else [5 + i for i in range(4)])
    assert steps_on == steps_off
    assert engine_on.finished == engine_off.finished


@pytest.mark.parametrize("mutation", ["misses_eos", "skips_hashing"])
def test_a_wrong_fast_path_is_caught(make_scheduler, monkeypatch, mutation):
    """The comparison can fail: a fast path that misses an EOS, or that skips the
    block hasher, gives different outputs or state. (Prefix caching is off for
    the second: with it on, vLLM's cache_blocks fails at once on the missing
    hashes.)"""
    kwargs = settings(policy="fcfs")
    if mutation == "misses_eos":
        name = "_may_stop_033" if output_loop_since_033() else "_may_stop"
        may_stop = getattr(fastoutput.DecodeOutputFastPath, name)

        def misses_eos(request, params, token, *args):
            return token != params.eos_token_id and may_stop(request, params, token, *args)

        monkeypatch.setattr(fastoutput.DecodeOutputFastPath, name, staticmethod(misses_eos))
    else:
        monkeypatch.setattr(fastoutput.DecodeOutputFastPath, "__init__", _no_hashing_init)
        kwargs["enable_prefix_caching"] = False
    on, steps_on, _ = run_special(make_scheduler, **kwargs)
    monkeypatch.undo()
    assert on.decode_fast_output is not None and on.decode_fast_output.fast > 0
    kwargs["additional_config"]["asyncbatch"]["decode_fast_output"] = False
    _, steps_off, _ = run_special(make_scheduler, **kwargs)
    assert steps_on != steps_off


_init = fastoutput.DecodeOutputFastPath.__init__


def _no_hashing_init(self, scheduler, slow):
    _init(self, scheduler, slow)
    self.hash_block_size = 10**9  # "no block ever fills"


def test_not_installed_where_it_cannot_stand_in():
    def scheduler(**kw):
        base = dict(num_spec_tokens=0, num_sampled_tokens_per_step=1, connector=None,
                    enable_return_routed_experts=False, enable_kv_cache_events=False,
                    perf_metrics=None)
        return SimpleNamespace(**{**base, **kw})

    assert fast_output_gaps(scheduler()) == []
    assert fast_output_gaps(scheduler(num_spec_tokens=3)) == ["speculative decoding"]
    assert fast_output_gaps(scheduler(connector=object())) == ["a KV connector"]
    assert fast_output_gaps(scheduler(enable_kv_cache_events=True)) == [
        "KV cache events published"]
    assert fast_output_gaps(scheduler(enable_return_routed_experts=True)) == [
        "routed experts returned (an aux output connector)"]
    assert fast_output_gaps(scheduler(aux_output_connector=object())) == [
        "routed experts returned (an aux output connector)"]
    assert fast_output_gaps(scheduler(return_sampling_mask=True)) == ["sampling masks returned"]
    metrics = SimpleNamespace(is_enabled=lambda: True)
    assert fast_output_gaps(scheduler(perf_metrics=metrics)) == [
        "per-step performance metrics"]


def test_off_by_setting(make_scheduler):
    assert make_scheduler(ASYNCBATCH).decode_fast_output is not None
    off = make_scheduler(ASYNCBATCH, **settings(decode_fast_output=False))
    assert off.decode_fast_output is None

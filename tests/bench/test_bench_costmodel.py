# SPDX-License-Identifier: Apache-2.0
"""The cost model, its two-in-flight timeline, its fit, and the calibration log parser."""

import json
import random

import pytest

from asyncbatch.bench.calibrate import default_out_name, gpu_samples, parse_step_log
from asyncbatch.bench.replay import calibration_path, load_cost_model
from asyncbatch.sim.costmodel import CostModel, StepFeatures, fit, timeline


def test_timeline_overlaps_host_with_gpu_when_two_in_flight():
    m = CostModel(gpu_step_s=0.010, prefill_token_s=0, decode_seq_s=0, kv_token_s=0,
                  host_step_s=0.004)
    steps = [StepFeatures(0, 1, 10, 1)] * 10
    assert timeline(m, steps, 1)[-1] == pytest.approx(10 * 0.014)
    # GPU-bound: host time hides behind the previous step's GPU time, except the first
    assert timeline(m, steps, 2)[-1] == pytest.approx(0.004 + 10 * 0.010)
    host_bound = CostModel(0.002, 0, 0, 0, 0.005)
    assert timeline(host_bound, steps, 2)[-1] == pytest.approx(10 * 0.005 + 0.002)
    ends = timeline(m, steps, 2)
    assert ends == sorted(ends)


def test_empty_step_costs_no_gpu_time():
    m = CostModel(0.01, 1e-4, 1e-4, 1e-8, 0.001)
    assert m.gpu_time(StepFeatures()) == 0.0
    assert m.gpu_time(StepFeatures(100, 2, 1000, 3)) == pytest.approx(0.01 + 0.01 + 2e-4 + 1e-5)


def test_fit_recovers_coefficients():
    rng = random.Random(0)
    true = [0.005, 5e-5, 4e-5, 2e-8]
    rows = []
    for _ in range(300):
        f = StepFeatures(rng.randrange(0, 2000), rng.randrange(0, 64),
                         rng.randrange(0, 200_000), 1)
        y = true[0] + true[1] * f.num_prefill_tokens + true[2] * f.num_decode_seqs \
            + true[3] * f.num_kv_tokens
        rows.append((f, y * (1 + rng.uniform(-0.01, 0.01))))
    coef, r2 = fit(rows)
    assert r2 > 0.99
    for c, t in zip(coef, true, strict=True):
        assert c == pytest.approx(t, rel=0.1)
    assert min(coef) >= 0


def test_shipped_calibration_loads_and_says_where_it_came_from():
    m, path = load_cost_model(None)
    assert path == str(calibration_path())
    # Either a measurement that names its GPU and fit, or a labelled estimate.
    if m.meta["measured"]:
        assert "measured" in m.source and m.meta["gpu"] in m.source
        assert m.meta["num_steps"] > 0 and 0 < m.meta["r2"] <= 1
    else:
        assert "ESTIMATE" in m.source
    assert m.gpu_step_s > 0 and m.host_step_s > 0


def test_parse_step_log_pairs_steps_with_outputs_after_the_mark(tmp_path):
    log = tmp_path / "steps.jsonl"
    recs = [{"s": [5, 0, 5, 1], "t0": 0.0, "t1": 0.001}, {"u": 0.01},  # warm-up
            {"mark": "w", "t": 1.0}]
    t = 1.0
    for i in range(6):
        recs.append({"s": [0, 2, 100 + i, 2], "t0": t, "t1": t + 0.001})
        if i:
            recs.append({"u": t - 0.0005})
        t += 0.01
    recs.append({"u": t})
    recs += [{"mark": "", "t": t + 0.001},  # end of the timed run, then another warm-up
             {"s": [5, 0, 5, 1], "t0": t + 0.002, "t1": t + 0.003}, {"u": t + 0.004}]
    log.write_text("\n".join(json.dumps(r) for r in recs))
    steps = parse_step_log(log)["w"]
    assert len(steps) == 6
    assert steps[0]["f"] == StepFeatures(0, 2, 100, 2)
    rows = gpu_samples(steps)
    assert len(rows) == 5 and all(g > 0 for _, g in rows)


def test_default_out_name():
    assert default_out_name("NVIDIA H100 80GB HBM3", "llama-8b") == "h100-llama-8b.json"
    assert default_out_name(None, None) == "gpu-model.json"


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_step_log_schedulers_log_every_step(mode, tmp_path, monkeypatch):
    pytest.importorskip("vllm")
    import time

    from asyncbatch.bench.calibrate import STEP_LOG_SCHEDULERS, host_samples
    from asyncbatch.bench.replay import replay_model_dir
    from asyncbatch.bench.workloads import parse_workload
    from asyncbatch.sim.engine import SimEngine, build_scheduler, make_request

    log = tmp_path / "steps.jsonl"
    monkeypatch.setenv("ASYNCBATCH_STEP_LOG", str(log))
    scheduler = build_scheduler(replay_model_dir(), STEP_LOG_SCHEDULERS[mode], num_blocks=64,
                                max_num_seqs=4, max_num_batched_tokens=64,
                                async_scheduling=mode == "async")
    engine = SimEngine(scheduler, max_in_flight=2 if mode == "async" else 1)
    reqs = parse_workload("random:num_requests=6,input_len=40,output_len=5").requests()
    for r in reqs:
        engine.add_request(make_request(r.request_id, r.prompt_token_ids, max_tokens=5))
    log.write_text(json.dumps({"mark": "w", "t": time.perf_counter()}) + "\n")
    engine.run()
    steps = parse_step_log(log)["w"]
    assert sum(s["f"].num_prefill_tokens for s in steps) == engine.stats.num_computed_prompt_tokens
    # every request samples 5 tokens; the first comes from its last prefill step
    assert sum(s["f"].num_decode_seqs for s in steps) == 6 * 4
    assert all(s["u"] >= s["t1"] >= s["t0"] for s in steps)
    assert len(gpu_samples(steps)) > 0
    if mode == "sync":
        assert len(host_samples(steps, CostModel(0, 0, 0, 0, 0))) > 0


def _synthetic_log(model, features, mode):
    """Step records as the step-log schedulers would write them on a GPU that follows
    `model` exactly (two in flight for async, one for sync)."""
    steps, gpu_end, host_done = [], [], 0.0
    h = model.host_step_s
    for i, f in enumerate(features):
        g = model.gpu_time(f)
        prev = gpu_end[i - 1] if i else 0.0
        if mode == "sync":
            t0 = prev
            t1 = t0 + h
            gpu_end.append(t1 + g)
        else:
            gate = gpu_end[i - 2] if i >= 2 else 0.0
            t0 = max(host_done, gate)
            t1 = host_done = t0 + h
            gpu_end.append(max(prev, t1) + g)
        steps.append({"f": f, "t0": t0, "t1": t1, "u": gpu_end[i]})
    return steps


def test_calibration_recovers_the_model_that_made_the_timings():
    from asyncbatch.bench.calibrate import host_samples

    rng = random.Random(1)
    true = CostModel(0.006, 4e-5, 6e-5, 4e-8, 0.003)
    features = [StepFeatures(p, d, k, d + (p > 0))
                for p, d, k in ((rng.choice([0, 0, rng.randrange(16, 2048)]),
                                 rng.randrange(1, 64), rng.randrange(1000, 100_000))
                                for _ in range(400))]
    (g0, p, d, k), r2 = fit(gpu_samples(_synthetic_log(true, features, "async")))
    assert r2 > 0.999
    assert (g0, p, d, k) == pytest.approx((0.006, 4e-5, 6e-5, 4e-8), rel=0.02)
    hs = host_samples(_synthetic_log(true, features, "sync"), CostModel(g0, p, d, k, 0.0))
    assert sorted(hs)[len(hs) // 2] == pytest.approx(0.003, rel=0.05)

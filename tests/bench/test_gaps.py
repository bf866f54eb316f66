# SPDX-License-Identifier: Apache-2.0
"""GPU idle-gap analysis of a chrome trace (`asyncbatch.bench.gaps`) on a synthetic trace."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from asyncbatch.bench.gaps import (
    analyze_trace,
    flatten_innermost,
    idle_gaps,
    load_trace,
    merge_intervals,
    parse_step_name,
    percentile,
    render_markdown,
)

HOST = {"pid": 4242, "tid": 4242}
GPU = {"pid": 0, "tid": 7}
DECODE = "execute_context_0(0)_generation_4(4)"


def _x(name: str, cat: str, ts: float, dur: float, where: dict[str, int],
       **args: Any) -> dict[str, Any]:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, **where,
            "args": dict(args)}


def synthetic_trace(num_decode: int = 12) -> dict[str, Any]:
    """One prefill step, then ``num_decode`` decode steps of 1000 us.

    Decode step i (starting at T = 1000 i): step annotation [T, T+300], graph launch
    [T+50, T+90], sampling annotation [T+850, T+950]; kernels A [T+100, T+700] and
    B [T+720, T+900].  GPU idle per step: 100 + 20 + 100 = 220 us.
    """
    ev: list[dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "pid": 0, "args": {"name": "GPU 0"}},
        _x("execute_context_4(1024)_generation_0(0)", "user_annotation", 0, 300, HOST),
        _x("prefill_gemm", "kernel", 50, 900, GPU, device=0),
        _x("gpu_user_annotation_is_not_busy", "gpu_user_annotation", 0, 20000, GPU),
        _x("cpu_noise", "cpu_op", 0, 5, {"pid": 4242, "tid": 99}),
    ]
    for i in range(1, num_decode + 1):
        t = 1000.0 * i
        ev += [
            _x(DECODE, "user_annotation", t, 300, HOST),
            _x("cudaGraphLaunch", "cuda_runtime", t + 50, 40, HOST),
            _x("gpu_model_runner: sample", "user_annotation", t + 850, 100, HOST),
            _x("kernel_A", "kernel", t + 100, 600, GPU, device=0),
            _x("kernel_B", "kernel", t + 720, 180, GPU, device=0),
        ]
    # an overlapping copy on another stream does not add idle time
    ev.append(_x("Memcpy HtoD", "gpu_memcpy", 3150, 50, {"pid": 0, "tid": 9}, device=0))
    return {"schemaVersion": 1, "traceEvents": ev}


def test_primitives() -> None:
    assert merge_intervals([(5, 6), (0, 2), (1, 3), (3, 4)]) == [(0, 4), (5, 6)]
    assert idle_gaps([(0, 4), (5, 6)], -1, 8) == [(-1, 0), (4, 5), (6, 8)]
    assert percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert parse_step_name(DECODE) == {"ctx_reqs": 0, "ctx_tokens": 0, "gen_reqs": 4,
                                       "gen_tokens": 4}
    detailed = "execute_8_context_1(sq4sk4sqsq16sqsk16)_generation_4(sq4sk90sqsq4sqsk90)"
    assert parse_step_name(detailed) == {"ctx_reqs": 1, "ctx_tokens": 4, "gen_reqs": 4,
                                         "gen_tokens": 4}
    assert parse_step_name("gpu_model_runner: sample") is None
    segs = flatten_innermost([(0, 10, "outer"), (2, 4, "inner"), (6, 12, "late")])
    assert segs == [(0, 2, "outer"), (2, 4, "inner"), (4, 6, "outer"), (6, 10, "late")]


def test_steady_decode_gaps() -> None:
    # 12 decode steps; keep the middle 10 (drop round(12 * 0.08) = 1 each side)
    a = analyze_trace(synthetic_trace(12), steady_fraction=10 / 12)
    w = a["window"]
    assert w["source"] == "steady decode steps"
    assert (w["start_us"], w["end_us"]) == (2000, 12000)
    assert a["busy_us"] == pytest.approx(7800)
    assert a["busy_fraction"] == pytest.approx(0.78)
    g = a["gaps_us"]
    # gaps: [2000,2100] and [11900,12000] (100 us), 10 x 20 us, 9 x 200 us between steps
    assert g["count"] == 21
    assert g["total"] == pytest.approx(2200)
    assert g["p50"] == pytest.approx(100)
    assert g["max"] == pytest.approx(200)
    assert {h["bucket"]: h["count"] for h in a["gap_histogram"]}["20-100 us"] == 10
    ps = a["per_step"]
    assert ps["num_steps"] == 10
    assert ps["step_us"]["p50"] == pytest.approx(1000)
    assert ps["idle_us"]["p50"] == pytest.approx(220)
    assert ps["idle_fraction_mean"] == pytest.approx(0.22)
    assert ps["decode_batch"] == {"min": 4, "max": 4}

    ann = {r["label"]: r for r in a["attribution_annotation"]}
    assert ann["execute_model (step annotation)"]["idle_us"] == pytest.approx(1000)
    assert ann["gpu_model_runner: sample"]["idle_us"] == pytest.approx(500)
    assert ann["(no annotation)"]["idle_us"] == pytest.approx(700)
    assert ann["(no annotation)"]["gaps_dominated"] == 10  # the 20 us gaps
    assert sum(r["idle_share"] for r in a["attribution_annotation"]) == pytest.approx(1.0)
    nk = {r["kernel"]: r for r in a["next_kernel_after_gap"]}
    assert nk["kernel_B"]["gaps"] == 10
    assert nk["kernel_A"]["idle_us"] == pytest.approx(100 + 9 * 200 + 100)
    md = render_markdown({"runs": [{"shape": "s", "executor": "mp", "analysis": a,
                                    "timed": {}}]})
    assert "78.0" in md and "gpu_model_runner: sample" in md
    assert md.startswith("# GPU idle between engine steps: stock vLLM async scheduling\n")
    args = json.dumps({"scheduler_cls": "asyncbatch.Scheduler", "worker_cls": "asyncbatch.Worker"})
    md = render_markdown({"meta": {"engine_args": args}, "runs": []})
    assert md.startswith("# GPU idle between engine steps: vLLM async scheduling with "
                         "asyncbatch.Scheduler + asyncbatch.Worker\n")


def test_without_step_annotations_uses_middle_of_active_span(tmp_path: Path) -> None:
    trace = synthetic_trace(12)
    trace["traceEvents"] = [e for e in trace["traceEvents"] if e.get("cat") != "user_annotation"]
    p = tmp_path / "w.pt.trace.json.gz"
    with gzip.open(p, "wt") as f:
        json.dump(trace, f)
    a = analyze_trace(load_trace(p), steady_fraction=0.5)
    # active span [50, 12900]: the middle half is [3262.5, 9687.5]
    assert a["window"]["source"] == "device active span"
    assert a["window"]["start_us"] == pytest.approx(3262.5)
    assert a["window"]["end_us"] == pytest.approx(9687.5)
    assert a["per_step"] == {}
    assert 0.7 < a["busy_fraction"] < 0.85


def test_no_gpu_events_is_an_error() -> None:
    with pytest.raises(ValueError, match="no GPU events"):
        analyze_trace({"traceEvents": [_x(DECODE, "user_annotation", 0, 1, HOST)]})


def test_profile_gaps_engine_args_must_be_a_json_object(capsys):
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks/profile_gaps.py"
    spec = importlib.util.spec_from_file_location("profile_gaps", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(["--engine-args", '{"worker_cls": "asyncbatch.Worker"}'])
    assert args.engine_args == {"worker_cls": "asyncbatch.Worker"}
    assert module.parse_args([]).engine_args == {}
    for bad in ("[1]", "{worker_cls"):
        with pytest.raises(SystemExit):
            module.parse_args(["--engine-args", bad])
        assert "--engine-args" in capsys.readouterr().err

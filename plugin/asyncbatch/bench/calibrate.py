# SPDX-License-Identifier: Apache-2.0
"""Fit the replay's cost model from per-step timings of a GPU run.

Two offline engine processes (async and sync scheduling) run a few workloads
with stock schedulers that log every step (`asyncbatch.bench.step_log`):

* async (two batches in flight): the GPU time of step ``i`` is the time from
  ``max(output of step i-1 arrived, step i scheduled)`` to the arrival of its
  output; a non-negative least-squares fit over the steps gives
  ``gpu_step_s``, ``prefill_token_s``, ``decode_seq_s`` and ``kv_token_s``.
* sync (one batch in flight): a step takes host time plus GPU time back to
  back, so ``host_step_s`` is the median over steps of the time between two
  outputs minus the fitted GPU time.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import statistics
from pathlib import Path
from typing import Any

from asyncbatch.bench.models import ModelSpec
from asyncbatch.bench.offline import run_worker, write_requests
from asyncbatch.bench.variants import EngineProfile
from asyncbatch.bench.workloads import Workload, workload_spec
from asyncbatch.sim.costmodel import CostModel, StepFeatures, fit, timeline

STEP_LOG_SCHEDULERS = {
    "async": "asyncbatch.bench.step_log.StepLogAsyncScheduler",
    "sync": "asyncbatch.bench.step_log.StepLogSyncScheduler",
}
DEFAULT_WORKLOADS = [
    "random:num_requests=96,input_len=1024,output_len=32",
    "random:num_requests=192,input_len=128,output_len=192,range_ratio=0.5",
    "replay-kv",
]
QUICK_WORKLOADS = [
    "random:num_requests=48,input_len=1024,output_len=32",
    "random:num_requests=96,input_len=128,output_len=128,range_ratio=0.5",
    "replay-kv:num_groups=8",
]
# gap (s) between an output and the next schedule() above which the engine was idle
IDLE_GAP_S = 0.005


def parse_step_log(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """workload label -> steps ``{"f": StepFeatures, "t0", "t1", "u"}`` scheduled
    between the marks that open (``{"mark": label}``) and close (``{"mark": ""}``)
    that workload's timed run; warm-up steps are dropped."""
    marks: list[tuple[float, str]] = []
    scheduled: list[dict[str, Any]] = []
    updates: list[float] = []
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        if "mark" in rec:
            marks.append((rec["t"], rec["mark"]))
        elif "s" in rec:
            scheduled.append({"f": StepFeatures(*rec["s"]), "t0": rec["t0"], "t1": rec["t1"]})
        elif "u" in rec:
            updates.append(rec["u"])
    for step, u in zip(scheduled, updates, strict=False):
        step["u"] = u
    out: dict[str, list[dict[str, Any]]] = {}
    for step in scheduled:
        if "u" not in step:
            continue
        label = None
        for t, name in marks:
            if step["t0"] >= t:
                label = name or None
        if label is not None:
            out.setdefault(label, []).append(step)
    return out


def gpu_samples(steps: list[dict[str, Any]]) -> list[tuple[StepFeatures, float]]:
    rows = []
    for prev, cur in zip(steps, steps[1:], strict=False):
        if cur["f"].num_seqs == 0:
            continue
        start = max(prev["u"], cur["t1"])
        rows.append((cur["f"], cur["u"] - start))
    return [(f, g) for f, g in rows if g > 0]


def host_samples(steps: list[dict[str, Any]], model: CostModel) -> list[float]:
    out = []
    for prev, cur in zip(steps, steps[1:], strict=False):
        if cur["f"].num_seqs == 0 or cur["t0"] - prev["u"] > IDLE_GAP_S:
            continue
        out.append(cur["u"] - prev["u"] - model.gpu_time(cur["f"]))
    return out


def calibrate(model: ModelSpec, workloads: list[tuple[str, Workload]], profile: EngineProfile,
              *, work_dir: Path, with_sync: bool = True, timeout_s: float = 900,
              progress: bool = True) -> CostModel:
    from asyncbatch.bench.offline import _bar

    request_files = write_requests(workloads, work_dir)
    modes = ["async", "sync"] if with_sync else ["async"]
    logs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    measured: dict[str, dict[str, float]] = {}
    gpu = None
    bar = _bar(len(modes), "calibration runs", progress)
    try:
        for mode in modes:
            log = work_dir / f"steps-{mode}.jsonl"
            log.unlink(missing_ok=True)
            engine_args = profile.engine_args(mode)
            engine_args["scheduler_cls"] = STEP_LOG_SCHEDULERS[mode]
            spec = {"model": model.path, "load_format": model.load_format,
                    "engine_args": engine_args, "workloads": request_files, "num_warmup": 8}
            out = run_worker(spec, work_dir, f"calibrate-{mode}", timeout_s=timeout_s,
                             env={"ASYNCBATCH_STEP_LOG": str(log)})
            gpu = gpu or out.get("gpu")
            logs[mode] = parse_step_log(log)
            measured[mode] = {r["workload"]: r["elapsed_time"] for r in out["results"]}
            bar.update(1)
    finally:
        bar.close()

    rows = [row for steps in logs["async"].values() for row in gpu_samples(steps)]
    if len(rows) < 20:
        raise RuntimeError(f"only {len(rows)} usable steps in the async step log; "
                           "run larger workloads")
    (g0, p, d, k), r2 = fit(rows)
    host = 0.0
    if with_sync:
        partial = CostModel(g0, p, d, k, 0.0)
        hs = [h for steps in logs["sync"].values() for h in host_samples(steps, partial)]
        host = max(0.0, statistics.median(hs)) if hs else 0.0
    else:
        ts = [s["t1"] - s["t0"] for steps in logs["async"].values() for s in steps]
        host = statistics.median(ts) if ts else 0.0
    check: dict[str, Any] = {}
    draft = CostModel(g0, p, d, k, host)
    for mode, by_label in logs.items():
        for label, steps in by_label.items():
            ends = timeline(draft, [s["f"] for s in steps], 2 if mode == "async" else 1)
            check[f"{mode}/{label}"] = {"measured_s": measured[mode].get(label),
                                        "predicted_s": ends[-1] if ends else None}
    source = (f"measured by `asyncbatch-bench calibrate` on {gpu or 'unknown GPU'}, model "
              f"{model.label}, {dt.date.today().isoformat()}: least squares over {len(rows)} "
              f"async steps (r2={r2:.3f})" + (", host time from sync steps" if with_sync else
                                              ", host time = schedule() time only"))
    return CostModel(g0, p, d, k, host, source=source, meta={
        "gpu": gpu, "model_shape": model.shape, "model": model.path, "measured": True,
        "r2": r2, "num_steps": len(rows), "engine_profile": profile.common_engine_args(),
        "workloads": {label: workload_spec(w) for label, w in workloads},
        "check": check})


def default_out_name(gpu: str | None, shape: str | None) -> str:
    g = "gpu"
    if gpu:
        m = re.search(r"(H100|H200|A100|L40S|B200|GB200|L4|A10G?)", gpu, re.IGNORECASE)
        g = m.group(1).lower() if m else re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    return f"{g}-{shape or 'model'}.json"

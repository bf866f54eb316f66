# SPDX-License-Identifier: Apache-2.0
"""A/B tables (Markdown), results JSON and plots, the same for every mode.

A run is a flat dict with vLLM's benchmark keys (``elapsed_time``,
``request_throughput``, ``output_throughput``, ``total_token_throughput``,
``requests_per_second``, ``tokens_per_second``, ``median_ttft_ms`` ...) plus
``variant``, ``repeat``, ``workload``, ``num_preemptions``,
``prefix_cache_hit_rate`` (vLLM's counters: every lookup, also repeated ones of a
request that did not fit) and ``prompt_cached_rate`` (per request, the prompt
tokens the cache held at its first admission; offline and replay only).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from asyncbatch.bench.stats import Summary, ratio, summarize, verdict

BASELINE = "async"


@dataclass(frozen=True)
class Metric:
    key: str
    header: str
    higher_is_better: bool
    digits: int = 1


THROUGHPUT_METRICS = [
    Metric("output_throughput", "output tok/s", True),
    Metric("total_token_throughput", "total tok/s", True),
    Metric("request_throughput", "req/s", True, 2),
    Metric("elapsed_time", "wall s", False, 2),
    Metric("num_preemptions", "preemptions", False, 0),
    Metric("prefix_cache_hit_rate", "prefix hit %", True, 1),
    Metric("prompt_cached_rate", "cached prompt %", True, 1),
]
# shares, printed as percentages
PERCENT_METRICS = ("prefix_cache_hit_rate", "prompt_cached_rate")
LATENCY_METRICS = [
    Metric("median_ttft_ms", "TTFT p50 ms", False),
    Metric("p99_ttft_ms", "TTFT p99 ms", False),
    Metric("median_tpot_ms", "TPOT p50 ms", False, 2),
    Metric("p99_tpot_ms", "TPOT p99 ms", False, 2),
    Metric("p99_itl_ms", "ITL p99 ms", False, 2),
    Metric("mean_e2el_ms", "latency mean ms", False, 0),
    Metric("p99_e2el_ms", "latency p99 ms", False, 0),
]
# metrics whose ratio to the baseline gets its own column
RATIO_METRICS = ["output_throughput", "median_ttft_ms"]


def metrics_for(runs: list[dict[str, Any]]) -> list[Metric]:
    keys = set().union(*(r.keys() for r in runs)) if runs else set()
    return [m for m in THROUGHPUT_METRICS + LATENCY_METRICS if m.key in keys]


def group_runs(runs: list[dict[str, Any]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """workload -> variant -> runs, in first-seen order."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in runs:
        out.setdefault(r["workload"], {}).setdefault(r["variant"], []).append(r)
    return out


def summarize_runs(runs: list[dict[str, Any]],
                   baseline: str = BASELINE) -> dict[str, dict[str, dict[str, Any]]]:
    """workload -> variant -> {metric: {median, min, max, n}, ratio/verdict vs baseline}."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    metrics = metrics_for(runs)
    for workload, by_variant in group_runs(runs).items():
        base = by_variant.get(baseline)
        out[workload] = {}
        for variant, vruns in by_variant.items():
            entry: dict[str, Any] = {}
            for m in metrics:
                s = _summary(vruns, m.key)
                if s is None:
                    continue
                entry[m.key] = {"median": s.median, "min": s.min, "max": s.max, "n": s.n}
                b = _summary(base, m.key) if base else None
                if b is not None and variant != baseline:
                    entry[m.key]["ratio_vs_" + baseline] = ratio(s, b)
                    entry[m.key]["verdict"] = verdict(s, b, m.higher_is_better)
            out[workload][variant] = entry
    return out


def format_table(runs: list[dict[str, Any]], *, title: str, baseline: str = BASELINE,
                 simulated: bool = False) -> str:
    """A Markdown table per workload: median (min..max) of each metric per variant,
    with ratios against ``baseline`` and a verdict that says "within noise" when
    the difference is smaller than the spread."""
    metrics = metrics_for(runs)
    lines = []
    head = ("SIMULATED: " if simulated else "") + title
    lines.append(f"### {head}")
    for workload, by_variant in group_runs(runs).items():
        base = by_variant.get(baseline)
        ratio_keys = [k for k in RATIO_METRICS if any(m.key == k for m in metrics)]
        header = ["variant", "runs"] + [m.header for m in metrics]
        header += [f"{_header(k)} vs {baseline}" for k in ratio_keys]
        lines.append("")
        lines.append(f"workload `{workload}`" + (" (simulated time)" if simulated else ""))
        lines.append("")
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" for _ in header) + "|")
        for variant, vruns in by_variant.items():
            row = [variant, str(len(vruns))]
            for m in metrics:
                s = _summary(vruns, m.key)
                row.append("-" if s is None else _fmt(s, m))
            for k in ratio_keys:
                m = next(m for m in metrics if m.key == k)
                s, b = _summary(vruns, k), _summary(base, k) if base else None
                if variant == baseline or s is None or b is None:
                    row.append("1.00 (baseline)" if variant == baseline else "-")
                else:
                    row.append(f"{ratio(s, b):.3f} {verdict(s, b, m.higher_is_better)}")
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("Cells: median (min..max) over runs; a difference no larger than the spread of "
                 "either variant is reported as \"within noise\".")
    return "\n".join(lines)


def _header(key: str) -> str:
    return next(m.header for m in THROUGHPUT_METRICS + LATENCY_METRICS if m.key == key)


def _summary(runs: list[dict[str, Any]] | None, key: str) -> Summary | None:
    if not runs:
        return None
    values = [float(r[key]) for r in runs if r.get(key) is not None]
    return summarize(values) if values else None


def _fmt(s: Summary, m: Metric) -> str:
    if m.key in PERCENT_METRICS:
        s = Summary(s.median * 100, s.min * 100, s.max * 100, s.n)
    return s.fmt(m.digits)


def environment_stamp(model: str, model_shape: str | None, gpu: str | None = None,
                      argv: list[str] | None = None) -> dict:
    """GPU, versions, model and the exact command line, for a results file."""
    try:
        vllm_version = metadata.version("vllm")
    except metadata.PackageNotFoundError:
        vllm_version = "not installed"
    # the imported package's own version: also right when it runs from a checkout
    # on PYTHONPATH (benchmarks/gpu.sh), where no distribution metadata exists
    import asyncbatch

    asyncbatch_version = asyncbatch.__version__
    return {
        "date": dt.datetime.now().strftime("%Y%m%d-%H%M%S"),
        "command": shlex.join(["asyncbatch-bench", *(sys.argv[1:] if argv is None else argv)]),
        "gpu": gpu or detect_gpu(),
        "vllm_version": vllm_version,
        "asyncbatch_version": asyncbatch_version,
        "git_commit": _git_commit(),
        "python": sys.version.split()[0],
        "cpu": detect_cpu(),
        "cpu_count": os.cpu_count(),
        "model": model,
        "model_shape": model_shape,
    }


def detect_gpu() -> str:
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            names = [n.strip() for n in out.stdout.splitlines() if n.strip()]
            if names:
                return f"{len(names)} x {names[0]}"
        except (OSError, subprocess.SubprocessError):
            pass
    return "none (CPU)"


def detect_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The host CPU's model name (Linux), else what `platform` knows: host work
    bounds small models, so a results file says which CPU did it."""
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[3]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def write_results(result_dir: str | Path, name: str, result: dict[str, Any],
                  table: str, *, plot_title: str, simulated: bool = False) -> dict[str, Path]:
    """Write ``NAME.json``, ``NAME.md`` and ``NAME.png`` under ``result_dir``."""
    result_dir = Path(result_dir)
    result_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": result_dir / f"{name}.json", "md": result_dir / f"{name}.md",
             "png": result_dir / f"{name}.png"}
    paths["json"].write_text(json.dumps(result, indent=1, default=str) + "\n")
    stamp = result.get("environment", {})
    footer = (f"\n\nGPU: {stamp.get('gpu')}; vLLM {stamp.get('vllm_version')}; model "
              f"{stamp.get('model_shape') or stamp.get('model')}; command: "
              f"`{stamp.get('command')}`\n")
    paths["md"].write_text(table + footer)
    plot(result["runs"], paths["png"], title=plot_title, simulated=simulated)
    return paths


def plot(runs: list[dict[str, Any]], path: str | Path, *, title: str,
         simulated: bool = False) -> Path:
    """Bars of throughput and latency per variant and workload (median, min..max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = group_runs(runs)
    workloads = list(grouped)
    variants: list[str] = []
    for by_variant in grouped.values():
        variants += [v for v in by_variant if v not in variants]
    keys = set().union(*(r.keys() for r in runs))
    latency = [k for k in ("median_ttft_ms", "median_tpot_ms") if k in keys] or [
        k for k in ("mean_e2el_ms", "elapsed_time") if k in keys][:1]
    panels = [("output_throughput", "output tok/s (higher is better)")] + [
        (k, f"{_header(k)} (lower is better)") for k in latency]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    width = 0.8 / max(1, len(variants))
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        for j, variant in enumerate(variants):
            meds, lo, hi = [], [], []
            for w in workloads:
                s = _summary(grouped[w].get(variant), key)
                meds.append(s.median if s else 0.0)
                lo.append(s.median - s.min if s else 0.0)
                hi.append(s.max - s.median if s else 0.0)
            xs = [i + (j - (len(variants) - 1) / 2) * width for i in range(len(workloads))]
            ax.bar(xs, meds, width, yerr=[lo, hi], capsize=3, label=variant)
        ax.set_xticks(range(len(workloads)))
        ax.set_xticklabels(workloads, fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(("SIMULATED - " if simulated else "") + title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)

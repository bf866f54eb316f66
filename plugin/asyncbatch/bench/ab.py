# SPDX-License-Identifier: Apache-2.0
"""``asyncbatch-bench ab``: the offline and the online A/B in one command, and one
Markdown summary that links both result sets and states their verdicts.

The run itself is `asyncbatch.bench.offline` then `asyncbatch.bench.online`;
this module holds what ``ab`` adds: the plan (checked and printed before the
first process starts, with its expected duration) and the summary.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asyncbatch.bench.report import BASELINE, summarize_runs

# Seconds a process costs besides its timed runs, (typical, slow), measured on an
# H100 host with vLLM's compile cache warm for the shape (the first start of a
# shape compiles and takes longer):
# - an offline engine: Python and vLLM imports, start-up (12-58 s), warm-up, exit;
ENGINE_START_S = (45.0, 70.0)
# - a server: `vllm serve` from launch to a healthy /health (70-146 s), and its exit;
SERVER_START_S = (80.0, 150.0)
# - a `vllm bench serve` client besides its timed run: imports, tokenizer, the
#   dataset (prefix_repetition re-encodes every prompt), the ready-check request.
BENCH_CLIENT_S = 25.0
# Warm-up requests, prefix-cache resets and counters of one offline workload.
OFFLINE_WORKLOAD_OVERHEAD_S = 0.5


@dataclass(frozen=True)
class AbPlan:
    """What ``ab`` will run, fixed before anything starts."""

    model: str
    offline_variants: list[str]
    online_variants: list[str]
    offline_workloads: list[str]
    online_workloads: list[str]
    repeats: int
    request_rates: list[float]
    duration_s: float | None
    # variant -> why the online part leaves it out
    online_skipped: dict[str, str] = field(default_factory=dict)
    # expected seconds of one timed offline run, where the shape is known (--quick)
    offline_run_s: float | None = None

    @property
    def engine_processes(self) -> int:
        return len(self.offline_variants) * self.repeats

    @property
    def servers(self) -> int:
        return len(self.online_variants) * self.repeats

    @property
    def bench_runs(self) -> int:
        return self.servers * len(self.online_workloads) * len(self.request_rates)

    def estimate_s(self, engine_start_s: float, server_start_s: float) -> float | None:
        """Expected wall time at ``engine_start_s`` per offline engine and
        ``server_start_s`` per server; None when the length of an offline run is
        not known in advance."""
        if self.offline_run_s is None or not self.duration_s or any(
                math.isinf(r) for r in self.request_rates):
            return None
        per_engine = len(self.offline_workloads) * (self.offline_run_s
                                                    + OFFLINE_WORKLOAD_OVERHEAD_S)
        per_bench = BENCH_CLIENT_S + self.duration_s + 1.0  # + the last requests' drain
        return (self.engine_processes * (engine_start_s + per_engine)
                + self.servers * server_start_s + self.bench_runs * per_bench)

    def describe(self) -> str:
        """The plan as printed before the run (and kept in the summary)."""
        rates = ", ".join(f"{r:g}" for r in self.request_rates)
        length = f", ~{self.duration_s:g} s per rate" if self.duration_s else ""
        lines = [
            f"offline: {_names(self.offline_variants)} x {self.repeats} repeats (ABBA) = "
            f"{self.engine_processes} engine processes, each running "
            f"{_names(self.offline_workloads)}"
            + (f" (~{self.offline_run_s:g} s each at stock async speed)"
               if self.offline_run_s else ""),
            f"online: {_names(self.online_variants)} x {self.repeats} repeats (ABBA) = "
            f"{self.servers} servers, each running {_names(self.online_workloads)} at "
            f"{rates} req/s{length} ({self.bench_runs} vllm bench serve runs in all)",
        ]
        lines += [f"online leaves out {v}: {why}" for v, why in self.online_skipped.items()]
        lo, hi = (self.estimate_s(e, s) for e, s in zip(ENGINE_START_S, SERVER_START_S,
                                                         strict=True))
        if lo is not None and hi is not None:
            lines.append(f"expected: {duration_text(lo)} to {duration_text(hi)} at "
                         f"{ENGINE_START_S[0]:g}-{ENGINE_START_S[1]:g} s per engine and "
                         f"{SERVER_START_S[0]:g}-{SERVER_START_S[1]:g} s per server, as "
                         "measured on an H100 host, plus the compilation of a shape's "
                         "first start when vLLM's cache is cold")
        return "\n".join(lines)


@dataclass
class PartOutcome:
    """One part's result files, its wall time, or why it failed."""

    mode: str
    seconds: float
    paths: dict[str, Path] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def per_process_median(runs: list[dict[str, Any]], key: str) -> float | None:
    """Median of ``key`` over the engines or servers of a part (one value per
    process, though each has a run record per workload): what a start
    (``startup_s``) or an exit (``exit_s``) cost, to check the plan's estimate."""
    per_process = {(r["variant"], r["repeat"]): r[key] for r in runs
                   if r.get(key) is not None}
    return statistics.median(per_process.values()) if per_process else None


def verdict_cells(result: dict[str, Any]) -> list[dict[str, str]]:
    """Per workload and non-baseline variant: output tok/s and (online) TTFT p50
    against the baseline, ratio and verdict, as `report.summarize_runs` gives them."""
    summary = result.get("summary") or summarize_runs(result["runs"])
    cells = []
    for workload, by_variant in summary.items():
        for variant, entry in by_variant.items():
            if variant == BASELINE:
                continue
            cell = {"workload": workload, "variant": variant}
            for key in ("output_throughput", "median_ttft_ms"):
                m = entry.get(key, {})
                if "verdict" in m:
                    cell[key] = f"{m['ratio_vs_' + BASELINE]:.3f} {m['verdict']}"
                    cell[key + ".verdict"] = m["verdict"]
            cells.append(cell)
    return cells


def verdict_lines(cells_by_part: dict[str, list[dict[str, str]]]) -> list[str]:
    """One sentence per variant: how many of its cells read better, worse and
    within noise, over both parts."""
    lines = []
    variants = list(dict.fromkeys(c["variant"] for cells in cells_by_part.values()
                                  for c in cells))
    for variant in variants:
        parts = []
        for key, what in (("output_throughput", "output tok/s"),
                          ("median_ttft_ms", "TTFT p50 (online)")):
            verdicts = [c[key + ".verdict"] for cells in cells_by_part.values()
                        for c in cells if c["variant"] == variant and key + ".verdict" in c]
            if verdicts:
                counts = ", ".join(f"{n} {v}" for v in ("better", "worse", "within noise", "same")
                                   if (n := verdicts.count(v)))
                parts.append(f"{what}: {counts} (of {len(verdicts)})")
        lines.append(f"- **{variant}** against {BASELINE}: " + "; ".join(parts))
    return lines


def summary_markdown(plan: AbPlan, parts: list[PartOutcome], *, summary_path: Path,
                     environment: dict[str, Any], total_s: float) -> str:
    """The combined summary: what ran, links to both result sets, the verdicts."""
    env = environment
    lines = [f"# A/B: stock vLLM against asyncbatch, {plan.model}, {env.get('gpu')}", "",
             f"Command: `{env.get('command')}` ({env.get('date')}; vLLM "
             f"{env.get('vllm_version')}, asyncbatch {env.get('asyncbatch_version')}, git "
             f"{env.get('git_commit')}). Took {duration_text(total_s)}.", "",
             "Plan:", "", *[f"- {line}" for line in plan.describe().splitlines()], "",
             "| part | variants | workloads | processes | results | time |",
             "|---|---|---|---|---|---|"]
    for part in parts:
        lines.append(_part_row(plan, part, summary_path.parent))
    lines += ["", "## Verdicts against stock async", "",
              "Ratio of the medians over the repeats; a difference no larger than the spread "
              "(min..max) of either variant reads \"within noise\".", "",
              "| part | workload | variant | output tok/s | TTFT p50 |", "|---|---|---|---|---|"]
    cells_by_part = {p.mode: verdict_cells(p.result) for p in parts if p.result}
    for mode, cells in cells_by_part.items():
        for c in cells:
            lines.append(f"| {mode} | {c['workload']} | {c['variant']} | "
                         f"{c.get('output_throughput', '-')} | {c.get('median_ttft_ms', '-')} |")
    lines += ["", *verdict_lines(cells_by_part)]
    for part in parts:
        if part.error:
            lines += ["", f"**The {part.mode} part failed**, so it has no verdicts:", "",
                      "```", part.error.strip(), "```"]
    return "\n".join(lines) + "\n"


def _part_row(plan: AbPlan, part: PartOutcome, base: Path) -> str:
    if part.mode == "offline":
        what = "offline: `vllm.LLM`, a fresh process per run"
        variants, workloads = plan.offline_variants, _names(plan.offline_workloads)
        count = f"{plan.engine_processes} engines"
    else:
        what = "online: `vllm serve` + `vllm bench serve`"
        variants = plan.online_variants
        rates = ", ".join(f"{r:g}" for r in plan.request_rates)
        workloads = f"{_names(plan.online_workloads)} at {rates} req/s"
        if plan.duration_s:
            workloads += f", ~{plan.duration_s:g} s per rate"
        count = f"{plan.servers} servers"
    vtext = f"{_names(variants)} ({plan.repeats} runs each, ABBA)"
    if part.mode == "online" and plan.online_skipped:
        vtext += "; left out: " + ", ".join(plan.online_skipped)
    for key, step in (("startup_s", "start"), ("exit_s", "exit")):
        value = per_process_median(part.result.get("runs", []), key)
        if value is not None:
            count += f", {step} median {value:.1f} s"
    if part.error:
        links = "failed (below)"
    else:
        links = ", ".join(f"[{kind}]({_rel(part.paths[key], base)})" for key, kind in
                          (("md", "table"), ("json", "JSON"), ("png", "plot"))
                          if key in part.paths)
    return (f"| {what} | {vtext} | {workloads} | {count} | {links} | "
            f"{duration_text(part.seconds)} |")


def write_summary(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _rel(path: Path, base: Path) -> str:
    return os.path.relpath(path, base)


def _names(items: list[str]) -> str:
    return ", ".join(items)


def duration_text(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"

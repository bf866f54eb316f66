# SPDX-License-Identifier: Apache-2.0
"""Does the replay rank the variants as a GPU run does?  (``asyncbatch-bench compare``)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from asyncbatch.bench.report import summarize_runs
from asyncbatch.bench.stats import WITHIN_NOISE

METRIC = "output_throughput"


def _verdicts(result: dict[str, Any]) -> dict[tuple[str, str], tuple[str, float]]:
    out = {}
    for workload, by_variant in summarize_runs(result["runs"]).items():
        for variant, entry in by_variant.items():
            m = entry.get(METRIC, {})
            if "verdict" in m:
                out[(workload, variant)] = (m["verdict"], m["ratio_vs_async"])
    return out


def _tie(verdict: str) -> str:
    return "tie" if verdict in ("same", WITHIN_NOISE) else verdict


def compare(simulated_path: str | Path, measured_path: str | Path) -> tuple[str, bool]:
    """A Markdown table of output-throughput verdicts (vs stock async) of both
    results, per common workload and variant, and whether they all agree
    ("same" and "within noise" both count as a tie)."""
    sim = json.loads(Path(simulated_path).read_text())
    gpu = json.loads(Path(measured_path).read_text())
    a, b = _verdicts(sim), _verdicts(gpu)
    common = [k for k in a if k in b]
    if not common:
        raise ValueError(f"no workload/variant in common between {simulated_path} and "
                         f"{measured_path}")
    lines = ["| workload | variant | replay (simulated) | GPU (measured) | ranking |",
             "|---|---|---|---|---|"]
    agree = True
    for key in common:
        (va, ra), (vb, rb) = a[key], b[key]
        same = _tie(va) == _tie(vb)
        agree &= same
        lines.append(f"| {key[0]} | {key[1]} | {ra:.3f} {va} | {rb:.3f} {vb} | "
                     f"{'matches' if same else 'DIFFERS'} |")
    lines.append("")
    lines.append(f"Output tok/s against stock async. Replay: {simulated_path}; "
                 f"GPU: {measured_path}.")
    return "\n".join(lines), agree

# SPDX-License-Identifier: Apache-2.0
"""Does the replay rank the variants as a GPU run does?  (``asyncbatch-bench compare``)

The replay is deterministic, so any difference it computes reads "better" or
"worse", down to a 0.04% one; the GPU run has a spread, and calls a difference
no larger than it "within noise".  Comparing the two verdicts as they stand
flagged a replay at 1.0004 against a GPU run at 1.013 within noise as a
disagreement, though no GPU run of that spread could have told them apart.  So
the replay's ratio is given the verdict the GPU run would have given it: within
noise when the difference is inside the GPU run's noise band, else better or
worse; and the two agree when those verdicts do.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncbatch.bench.report import BASELINE, summarize_runs
from asyncbatch.bench.stats import WITHIN_NOISE

METRIC = "output_throughput"


@dataclass(frozen=True)
class Cell:
    """One variant's output throughput against the baseline, in one workload."""

    ratio: float
    verdict: str
    noise: float  # the spread that bounds "within noise", relative to the baseline median


def _cells(result: dict[str, Any]) -> dict[tuple[str, str], Cell]:
    out = {}
    for workload, by_variant in summarize_runs(result["runs"]).items():
        base = by_variant.get(BASELINE, {}).get(METRIC)
        for variant, entry in by_variant.items():
            m = entry.get(METRIC, {})
            if "verdict" in m and base:
                out[(workload, variant)] = Cell(m[f"ratio_vs_{BASELINE}"], m["verdict"],
                                                _noise(m, base))
    return out


def _noise(candidate: dict[str, Any], base: dict[str, Any]) -> float:
    """`stats.verdict`'s noise band (the larger spread of the two) as a share of
    the baseline median; unbounded when either was measured once."""
    if candidate["n"] < 2 or base["n"] < 2 or not base["median"]:
        return math.inf
    spread = max(candidate["max"] - candidate["min"], base["max"] - base["min"])
    return spread / base["median"]


def at_gpu_resolution(replay: Cell, gpu: Cell) -> str:
    """The verdict the GPU run would give the replay's ratio: a difference inside
    the GPU run's noise band is "within noise"."""
    if abs(replay.ratio - 1.0) <= gpu.noise:
        return WITHIN_NOISE
    return replay.verdict


def agrees(replay: Cell, gpu: Cell) -> bool:
    """Whether the replay ranks the variant as the GPU run does, at the GPU run's
    resolution ("same" and "within noise" both mean it cannot be ranked)."""
    return _tie(at_gpu_resolution(replay, gpu)) == _tie(gpu.verdict)


def _tie(verdict: str) -> str:
    return "tie" if verdict in ("same", WITHIN_NOISE) else verdict


def compare(simulated_path: str | Path, measured_path: str | Path) -> tuple[str, bool]:
    """A Markdown table of output-throughput ratios and verdicts (vs stock async)
    of both results, per common workload and variant, and whether they all agree
    (`agrees`)."""
    sim = json.loads(Path(simulated_path).read_text())
    gpu = json.loads(Path(measured_path).read_text())
    a, b = _cells(sim), _cells(gpu)
    common = [k for k in a if k in b]
    if not common:
        raise ValueError(f"no workload/variant in common between {simulated_path} and "
                         f"{measured_path}")
    lines = ["| workload | variant | replay (simulated) | replay at GPU resolution | "
             "GPU (measured) | ranking |", "|---|---|---|---|---|---|"]
    all_agree = True
    for key in common:
        ca, cb = a[key], b[key]
        same = agrees(ca, cb)
        all_agree &= same
        noise = "" if math.isinf(cb.noise) else f" (noise ±{100 * cb.noise:.1f}%)"
        lines.append(f"| {key[0]} | {key[1]} | {ca.ratio:.3f} {ca.verdict} | "
                     f"{at_gpu_resolution(ca, cb)}{noise} | {cb.ratio:.3f} {cb.verdict} | "
                     f"{'matches' if same else 'DIFFERS'} |")
    lines.append("")
    lines.append(f"Output tok/s against stock async. Replay: {simulated_path}; "
                 f"GPU: {measured_path}. The replay's ratio is judged as the GPU run judges "
                 "its own: within noise when the difference is no larger than the GPU noise "
                 "band (the larger spread of the two variants, as a share of the baseline "
                 "median).")
    return "\n".join(lines), all_agree

# SPDX-License-Identifier: Apache-2.0
"""Run order and A/B statistics: median, spread (min..max), noise verdicts.

Two runs of the same engine on one machine can differ by 15% (the second of two
identical runs came out slower on an H100), so variants run in alternating order
(A B C C B A A B C ...), each at least twice, and a difference between two
medians counts only when it exceeds the spread of either variant.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

WITHIN_NOISE = "within noise"


def abba_order(variants: list[str], repeats: int, offset: int = 0) -> list[tuple[str, int]]:
    """``(variant, repeat index)`` in run order: forward, backward, forward, ...
    ``offset`` continues a series split over several commands: repeats
    ``offset .. offset + repeats - 1`` of the same order."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if not variants:
        raise ValueError("no variants to run")
    if len(set(variants)) != len(variants):
        raise ValueError(f"duplicate variants in {variants}")
    order = []
    for k in range(offset, offset + repeats):
        for v in (variants if k % 2 == 0 else reversed(variants)):
            order.append((v, k))
    return order


@dataclass(frozen=True)
class Summary:
    median: float
    min: float
    max: float
    n: int

    @property
    def spread(self) -> float:
        return self.max - self.min

    def fmt(self, digits: int = 1) -> str:
        if self.n <= 1 or self.spread == 0:
            return f"{self.median:.{digits}f}"
        return f"{self.median:.{digits}f} ({self.min:.{digits}f}..{self.max:.{digits}f})"


def summarize(values: list[float]) -> Summary:
    if not values:
        raise ValueError("no values to summarize")
    return Summary(statistics.median(values), min(values), max(values), len(values))


def verdict(candidate: Summary, baseline: Summary, higher_is_better: bool = True) -> str:
    """``"better"``, ``"worse"``, ``"same"`` or ``"within noise"``.

    A difference of medians no larger than the spread (max - min) of either
    variant is noise.  A variant measured once has no spread, so against a
    measured baseline it cannot be called better or worse, except in a
    deterministic simulation (both ``n == 1`` and both spreads zero), where any
    difference is real.
    """
    diff = candidate.median - baseline.median
    if diff == 0:
        return "same"
    deterministic = candidate.n == 1 and baseline.n == 1
    noise = max(candidate.spread, baseline.spread)
    if not deterministic and (candidate.n < 2 or baseline.n < 2 or abs(diff) <= noise):
        return WITHIN_NOISE
    return "better" if (diff > 0) == higher_is_better else "worse"


def ratio(candidate: Summary, baseline: Summary) -> float:
    return candidate.median / baseline.median if baseline.median else float("nan")

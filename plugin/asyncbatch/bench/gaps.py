# SPDX-License-Identifier: Apache-2.0
"""GPU idle gaps in a torch-profiler chrome trace of vLLM engine steps.

Pure Python (no torch, no vLLM).  The input is the chrome trace that the vLLM
worker writes on ``LLM.start_profile()/stop_profile()`` (``*.pt.trace.json`` or
``.json.gz``).  The analysis:

* takes the device events (``cat`` ``kernel``, ``gpu_memcpy``, ``gpu_memset``) of
  the busiest device and merges them into a busy timeline;
* finds the engine steps from the worker's per-step annotation
  ``execute_context_<n>(<tokens>)_generation_<n>(<tokens>)`` (``execute_<t>_context_...``
  with the detailed annotation) and keeps the steady decode phase: steps without
  prefill requests and with at least half the largest decode batch, trimmed to the
  middle ``steady_fraction``.  Without step annotations the window is the middle
  ``steady_fraction`` of the device's active span;
* reports the busy fraction, the idle gaps (count, total, percentiles, a
  histogram), the idle time per step (a step runs from one step annotation's
  start to the next one's, on the host clock) and, for each gap, which host-side
  range on the stepping thread overlaps it most: the innermost annotation
  (``user_annotation``: the step and, with ``VLLM_CUSTOM_SCOPES_FOR_PROFILING=1``,
  ``gpu_model_runner: ...`` / ``schedule: ...``) and the innermost host event of any
  kind (annotation, ``cpu_op``, ``cuda_runtime``).
"""

from __future__ import annotations

import bisect
import gzip
import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

GPU_CATS = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})
HOST_CATS = frozenset({"user_annotation", "cpu_op", "cuda_runtime", "cuda_driver",
                       "python_function"})
NO_HOST_RANGE = "(no host range: thread outside any recorded event)"
NO_ANNOTATION = "(no annotation)"
GAP_BUCKETS_US: tuple[float, ...] = (5.0, 20.0, 100.0, 500.0, 2000.0)

# execute_context_0(0)_generation_256(256)  /  execute_256_context_0(sq0sk0...)_generation_...
_STEP_RE = re.compile(
    r"^execute_(?:\d+_)?context_(\d+)\((?:sq)?(\d+)[^)]*\)_generation_(\d+)\((?:sq)?(\d+)")

Interval = tuple[float, float]


# ----------------------------------------------------------------------------- loading

def load_trace(path: str | Path) -> dict[str, Any]:
    """Read a chrome trace (plain or gzipped JSON); a bare event list is wrapped."""
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(2)
    opener: Any = gzip.open if head == b"\x1f\x8b" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        data = json.load(f)
    if isinstance(data, list):
        data = {"traceEvents": data}
    return data


def _events(trace: dict[str, Any]) -> list[dict[str, Any]]:
    ev = trace.get("traceEvents", [])
    return [e for e in ev if isinstance(e, dict) and e.get("ph") == "X"]


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _span(e: dict[str, Any]) -> Interval | None:
    ts, dur = _num(e.get("ts")), _num(e.get("dur"))
    if ts is None or dur is None or dur < 0:
        return None
    return ts, ts + dur


# ----------------------------------------------------------------------------- primitives

def merge_intervals(intervals: Iterable[Interval]) -> list[Interval]:
    """Union of closed intervals, sorted; touching intervals are merged."""
    out: list[list[float]] = []
    for s, e in sorted(intervals):
        if e < s:
            continue
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1][1] = e
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def clip(intervals: Sequence[Interval], lo: float, hi: float) -> list[Interval]:
    """Sorted disjoint ``intervals`` cut to ``[lo, hi]``."""
    return [(max(s, lo), min(e, hi)) for s, e in intervals if e > lo and s < hi]


def idle_gaps(busy: Sequence[Interval], lo: float, hi: float) -> list[Interval]:
    """The holes of the sorted disjoint ``busy`` intervals inside ``[lo, hi]``."""
    gaps: list[Interval] = []
    t = lo
    for s, e in clip(busy, lo, hi):
        if s > t:
            gaps.append((t, s))
        t = max(t, e)
    if hi > t:
        gaps.append((t, hi))
    return gaps


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (``q`` in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    f = math.floor(k)
    c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)


def distribution(values: Sequence[float]) -> dict[str, float]:
    vals = list(values)
    n = len(vals)
    return {
        "count": n, "total": sum(vals), "mean": sum(vals) / n if n else 0.0,
        "p50": percentile(vals, 50), "p90": percentile(vals, 90),
        "p99": percentile(vals, 99), "max": max(vals) if vals else 0.0,
    }


def histogram(gaps_us: Sequence[float], edges: Sequence[float] = GAP_BUCKETS_US
              ) -> list[dict[str, Any]]:
    rows = []
    lo = 0.0
    for hi in [*edges, math.inf]:
        sel = [g for g in gaps_us if lo <= g < hi]
        label = f"{lo:g}-{hi:g} us" if hi != math.inf else f">= {lo:g} us"
        rows.append({"bucket": label, "count": len(sel), "total_us": sum(sel)})
        lo = hi
    return rows


def flatten_innermost(ranges: Iterable[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Non-overlapping segments labelled with the innermost enclosing range.

    ``ranges`` are (start, end, label) of one thread; they nest (ranges that
    only partly overlap are treated as nested in the earlier one).
    """
    items = sorted(ranges, key=lambda r: (r[0], -r[1]))
    segs: list[tuple[float, float, str]] = []
    stack: list[tuple[float, str]] = []  # (end, label)
    t = -math.inf

    def emit(a: float, b: float, label: str) -> None:
        if b > a:
            segs.append((a, b, label))

    for s, e, label in items:
        # close ranges that end before this one starts
        while stack and stack[-1][0] <= s:
            end, lab = stack.pop()
            emit(t, end, lab)
            t = max(t, end)
        if stack:
            emit(t, s, stack[-1][1])
        t = max(t, s)
        stack.append((min(e, stack[-1][0]) if stack else e, label))
    while stack:
        end, lab = stack.pop()
        emit(t, end, lab)
        t = max(t, end)
    return segs


def overlap_by_label(gap: Interval, segs: Sequence[tuple[float, float, str]],
                     starts: Sequence[float], fallback: str) -> dict[str, float]:
    """Time of ``gap`` covered by each label of the sorted disjoint ``segs``."""
    a, b = gap
    out: dict[str, float] = defaultdict(float)
    covered = 0.0
    i = max(bisect.bisect_right(starts, a) - 1, 0)
    while i < len(segs) and segs[i][0] < b:
        s, e, label = segs[i]
        ov = min(e, b) - max(s, a)
        if ov > 0:
            out[label] += ov
            covered += ov
        i += 1
    rest = (b - a) - covered
    if rest > 1e-9:
        out[fallback] += rest
    return dict(out)


# ----------------------------------------------------------------------------- steps

def parse_step_name(name: str) -> dict[str, int] | None:
    m = _STEP_RE.match(name)
    if not m:
        return None
    return {"ctx_reqs": int(m.group(1)), "ctx_tokens": int(m.group(2)),
            "gen_reqs": int(m.group(3)), "gen_tokens": int(m.group(4))}


def normalize_label(name: str) -> str:
    if parse_step_name(name) is not None:
        return "execute_model (step annotation)"
    name = name.strip()
    return name if len(name) <= 90 else name[:87] + "..."


def _step_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    steps = []
    for e in events:
        if e.get("cat") != "user_annotation":
            continue
        info = parse_step_name(str(e.get("name", "")))
        sp = _span(e)
        if info is None or sp is None:
            continue
        steps.append({**info, "start": sp[0], "end": sp[1], "pid": e.get("pid"),
                      "tid": e.get("tid")})
    steps.sort(key=lambda s: float(s["start"] or 0.0))
    return steps


# ----------------------------------------------------------------------------- analysis

def analyze_trace(trace: dict[str, Any], *, steady_fraction: float = 0.6,
                  top: int = 8) -> dict[str, Any]:
    """Busy fraction, idle gaps, idle per step and gap attribution; see the module doc."""
    events = _events(trace)
    gpu_by_dev: dict[Any, list[tuple[float, float, str]]] = defaultdict(list)
    for e in events:
        if e.get("cat") in GPU_CATS:
            sp = _span(e)
            if sp is not None:
                args = e.get("args") or {}
                dev = args.get("device", e.get("pid"))
                gpu_by_dev[dev].append((sp[0], sp[1], str(e.get("name", ""))))
    if not gpu_by_dev:
        raise ValueError("the trace holds no GPU events (cat kernel/gpu_memcpy/gpu_memset); "
                         "was the CUDA activity profiled?")
    device = max(gpu_by_dev, key=lambda d: len(gpu_by_dev[d]))
    kernels = sorted(gpu_by_dev[device])
    busy = merge_intervals((s, e) for s, e, _ in kernels)
    active_lo, active_hi = busy[0][0], busy[-1][1]

    all_steps = _step_events(events)
    steps_used: list[dict[str, Any]] = []
    window_source = "device active span"
    if len(all_steps) >= 3:
        max_gen = max(s["gen_reqs"] for s in all_steps)
        decode = [s for s in all_steps
                  if s["ctx_reqs"] == 0 and s["gen_reqs"] > 0 and s["gen_reqs"] * 2 >= max_gen]
        # the step thread is the one with the most decode step annotations
        if len(decode) >= 3:
            counts: dict[Any, int] = defaultdict(int)
            for s in decode:
                counts[(s["pid"], s["tid"])] += 1
            key = max(counts, key=lambda k: counts[k])
            decode = [s for s in decode if (s["pid"], s["tid"]) == key]
            n = len(decode)
            drop = int(round(n * (1.0 - steady_fraction) / 2.0))
            kept = decode[drop:n - drop] if n - 2 * drop >= 2 else decode
            steps_used = kept
            window_source = "steady decode steps"
    if steps_used:
        # the last kept step ends where the next annotated step starts (or its own end)
        nxt = [s["start"] for s in all_steps if s["start"] > steps_used[-1]["start"]]
        lo = steps_used[0]["start"]
        hi = nxt[0] if nxt else max(steps_used[-1]["end"], active_hi)
        hi = min(hi, active_hi)
    else:
        span = active_hi - active_lo
        lo = active_lo + span * (1.0 - steady_fraction) / 2.0
        hi = active_hi - span * (1.0 - steady_fraction) / 2.0
    window_us = max(hi - lo, 1e-9)

    busy_w = clip(busy, lo, hi)
    busy_us = sum(e - s for s, e in busy_w)
    gaps = idle_gaps(busy, lo, hi)
    gap_us = [b - a for a, b in gaps]

    # next kernel after each gap
    kstarts = [k[0] for k in kernels]
    next_kernel: dict[str, list[float]] = defaultdict(list)
    for (_a, b), g in zip(gaps, gap_us, strict=True):
        i = bisect.bisect_left(kstarts, b - 1e-6)
        name = normalize_label(kernels[i][2]) if i < len(kernels) else "(end of window)"
        next_kernel[name].append(g)

    # per-step idle on the host step clock
    per_step: list[dict[str, float]] = []
    if steps_used:
        bounds = [s["start"] for s in steps_used] + [hi]
        for i in range(len(steps_used)):
            a, b = bounds[i], bounds[i + 1]
            idle = sum(y - x for x, y in idle_gaps(busy, a, b))
            n_g = sum(1 for x, y in gaps if x < b and y > a)
            per_step.append({"step_us": b - a, "idle_us": idle, "gaps": float(n_g)})

    # host attribution on the stepping thread
    if steps_used:
        thread = (steps_used[0]["pid"], steps_used[0]["tid"])
    else:
        launches: dict[Any, int] = defaultdict(int)
        for e in events:
            if e.get("cat") == "cuda_runtime":
                launches[(e.get("pid"), e.get("tid"))] += 1
        thread = max(launches, key=lambda k: launches[k]) if launches else (None, None)
    ann_ranges, any_ranges = [], []
    for e in events:
        if (e.get("pid"), e.get("tid")) != thread or e.get("cat") not in HOST_CATS:
            continue
        sp = _span(e)
        if sp is None or sp[1] < lo - 1e5 or sp[0] > hi + 1e5:
            continue
        label = normalize_label(str(e.get("name", "")))
        any_ranges.append((sp[0], sp[1], label))
        if e.get("cat") == "user_annotation":
            ann_ranges.append((sp[0], sp[1], label))
    ann_segs = flatten_innermost(ann_ranges)
    any_segs = flatten_innermost(any_ranges)

    def attribute(segs: list[tuple[float, float, str]], fallback: str) -> list[dict[str, Any]]:
        starts = [s[0] for s in segs]
        total: dict[str, float] = defaultdict(float)
        dominant: dict[str, int] = defaultdict(int)
        dominant_us: dict[str, float] = defaultdict(float)
        for gap, g in zip(gaps, gap_us, strict=True):
            ov = overlap_by_label(gap, segs, starts, fallback)
            for k, v in ov.items():
                total[k] += v
            if ov:
                best = max(ov, key=lambda k: ov[k])
                dominant[best] += 1
                dominant_us[best] += g
        idle_total = sum(gap_us) or 1.0
        rows = [{"label": k, "idle_us": v, "idle_share": v / idle_total,
                 "gaps_dominated": dominant.get(k, 0),
                 "dominated_idle_us": dominant_us.get(k, 0.0)}
                for k, v in total.items()]
        rows.sort(key=lambda r: -float(r["idle_us"]))  # type: ignore[arg-type]
        return rows[:top]

    step_dist: dict[str, Any] = {}
    if per_step:
        step_dist = {
            "num_steps": len(per_step),
            "step_us": distribution([p["step_us"] for p in per_step]),
            "idle_us": distribution([p["idle_us"] for p in per_step]),
            "gaps_per_step_mean": sum(p["gaps"] for p in per_step) / len(per_step),
            "idle_fraction_mean": sum(p["idle_us"] / p["step_us"] for p in per_step
                                      if p["step_us"] > 0) / len(per_step),
            "decode_batch": {"min": min(s["gen_reqs"] for s in steps_used),
                             "max": max(s["gen_reqs"] for s in steps_used)},
        }
    nk = sorted(({"kernel": k, "gaps": len(v), "idle_us": sum(v)} for k, v in
                 next_kernel.items()), key=lambda r: -float(r["idle_us"]))[:top]
    return {
        "device": str(device),
        "window": {"source": window_source, "start_us": lo, "end_us": hi,
                   "duration_us": window_us, "steady_fraction": steady_fraction,
                   "num_step_annotations": len(all_steps)},
        "gpu_events_in_trace": len(kernels),
        "busy_us": busy_us,
        "idle_us": window_us - busy_us,
        "busy_fraction": busy_us / window_us,
        "gaps_us": distribution(gap_us),
        "gap_histogram": histogram(gap_us),
        "per_step": step_dist,
        "host_thread": [str(thread[0]), str(thread[1])],
        "attribution_annotation": attribute(ann_segs, NO_ANNOTATION),
        "attribution_host_event": attribute(any_segs, NO_HOST_RANGE),
        "next_kernel_after_gap": nk,
    }


# ----------------------------------------------------------------------------- report

def _f(x: Any, nd: int = 1) -> str:
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    return str(x)


def engine_title(engine_args: str | None) -> str:
    """What ran, from the engine arguments a summary records (JSON, or "-")."""
    args = json.loads(engine_args) if engine_args and engine_args != "-" else {}
    plugins = [str(args[k]) for k in ("scheduler_cls", "worker_cls") if k in args]
    if plugins:
        return "vLLM async scheduling with " + " + ".join(plugins)
    return "stock vLLM async scheduling"


def render_markdown(summary: dict[str, Any]) -> str:
    """Markdown for the summary written by ``benchmarks/profile_gaps.py``."""
    meta = summary.get("meta", {})
    lines = [f"# GPU idle between engine steps: {engine_title(meta.get('engine_args'))}", ""]
    if meta:
        lines += [", ".join(f"{k}: {v}" for k, v in meta.items()), ""]
    runs = summary.get("runs", [])
    lines += ["| shape | executor | out tok/s | decode ms/step | NVML util % (mean / decode) | "
              "trace busy % | idle us/step p50 / p90 | gaps/step | gap p50 / p90 / max us |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        t = r.get("timed", {})
        a = r.get("analysis") or {}
        ps = a.get("per_step") or {}
        g = a.get("gaps_us") or {}
        nv = t.get("nvml") or {}
        lines.append(
            f"| {r.get('shape')} | {r.get('executor')} | {_f(t.get('output_tok_s', '-'), 0)} | "
            f"{_f(t.get('decode_ms_per_step', '-'), 2)} | "
            f"{_f(nv.get('mean', '-'))} / {_f(nv.get('mean_middle', '-'))} | "
            f"{_f(100 * a['busy_fraction']) if a else '-'} | "
            f"{_f((ps.get('idle_us') or {}).get('p50', '-'))} / "
            f"{_f((ps.get('idle_us') or {}).get('p90', '-'))} | "
            f"{_f(ps.get('gaps_per_step_mean', '-'))} | "
            f"{_f(g.get('p50', '-'))} / {_f(g.get('p90', '-'))} / {_f(g.get('max', '-'))} |")
    for r in runs:
        a = r.get("analysis")
        lines += ["", f"## {r.get('shape')}, executor {r.get('executor')}", ""]
        if r.get("error"):
            lines += [f"error: {r['error']}", ""]
        if not a:
            continue
        w, ps = a["window"], a.get("per_step") or {}
        lines.append(f"Window: {w['source']}, {_f(w['duration_us'] / 1000, 2)} ms; "
                     f"busy {_f(100 * a['busy_fraction'])} %, idle {_f(a['idle_us'] / 1000, 2)} ms"
                     f" in {a['gaps_us']['count']} gaps.")
        if ps:
            lines.append(f"Steps: {ps['num_steps']} (decode batch {ps['decode_batch']['min']}-"
                         f"{ps['decode_batch']['max']}), step p50 {_f(ps['step_us']['p50'])} us, "
                         f"idle/step mean {_f(ps['idle_us']['mean'])} us "
                         f"({_f(100 * ps['idle_fraction_mean'])} % of the step).")
        lines += ["", "| gap size | count | idle us |", "|---|---|---|"]
        lines += [f"| {h['bucket']} | {h['count']} | {_f(h['total_us'])} |"
                  for h in a["gap_histogram"]]
        for key, title in (("attribution_annotation", "host annotation during the gaps"),
                           ("attribution_host_event", "innermost host event during the gaps")):
            lines += ["", f"| {title} | idle us | share % | gaps where largest |",
                      "|---|---|---|---|"]
            lines += [f"| {row['label']} | {_f(row['idle_us'])} | "
                      f"{_f(100 * row['idle_share'])} | {row['gaps_dominated']} |"
                      for row in a[key]]
        lines += ["", "| kernel after the gap | gaps | idle us |", "|---|---|---|"]
        lines += [f"| `{row['kernel']}` | {row['gaps']} | {_f(row['idle_us'])} |"
                  for row in a["next_kernel_after_gap"]]
    notes = summary.get("notes")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def trim_trace(trace: dict[str, Any], lo: float, hi: float,
               host_pid: Any = None) -> dict[str, Any]:
    """The device events and the host events of ``host_pid`` that overlap ``[lo, hi]``."""
    keep = []
    for e in trace.get("traceEvents", []):
        if not isinstance(e, dict):
            continue
        if e.get("ph") == "M":
            keep.append(e)
            continue
        sp = _span(e)
        if sp is None or sp[1] < lo or sp[0] > hi:
            continue
        cat = e.get("cat")
        if cat in GPU_CATS or (cat in HOST_CATS and (host_pid is None
                                                    or str(e.get("pid")) == str(host_pid))):
            keep.append(e)
    out = {k: v for k, v in trace.items() if k != "traceEvents"}
    out["traceEvents"] = keep
    return out

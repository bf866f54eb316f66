# SPDX-License-Identifier: Apache-2.0
"""Online A/B: ``vllm serve`` per variant on loopback, driven by ``vllm bench serve``.

Every server runs in its own process group and is killed as a group when its
runs end, when anything fails, and on SIGINT/SIGTERM.  vLLM is invoked as
``python -m vllm.entrypoints.cli.main`` (no ``vllm`` console script needed).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from asyncbatch.bench import procs
from asyncbatch.bench.models import ModelSpec
from asyncbatch.bench.offline import BenchError, _bar, run_to_json
from asyncbatch.bench.stats import abba_order
from asyncbatch.bench.variants import EngineProfile, check_variants
from asyncbatch.bench.workloads import (
    PrefixSharedWorkload,
    RandomWorkload,
    Workload,
    resized,
    vllm_dataset_args,
    workload_spec,
    write_custom_jsonl,
)

HOST = "127.0.0.1"
VLLM_CLI = [sys.executable, "-m", "vllm.entrypoints.cli.main"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise BenchError(f"port {port} on {HOST} is already in use; pick another "
                                 "--port or leave it out to use a free one") from None
            raise BenchError(f"cannot use port {port} on {HOST}: {e}") from None


def wait_healthy(proc: Any, url: str, log_path: Path, timeout_s: float) -> float:
    """Poll ``url`` until it answers 200; fail early if the server process exits."""
    t0 = time.monotonic()
    while True:
        rc = proc.poll()
        if rc is not None:
            raise BenchError(f"server exited with code {rc} before it was ready; log "
                             f"{log_path}:\n{procs.tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except (urllib.error.URLError, OSError, ValueError):
            pass
        if time.monotonic() - t0 > timeout_s:
            raise BenchError(f"server not healthy at {url} after {timeout_s:.0f} s; log "
                             f"{log_path}:\n{procs.tail(log_path)}")
        time.sleep(0.5)


@contextlib.contextmanager
def running_server(cmd: list[str], *, port: int, log_path: Path,
                   health_timeout_s: float) -> Iterator[float]:
    """Start a server command (it must listen on ``port``), wait for ``/health``,
    yield the start-up seconds, and kill its process group on exit."""
    check_port_free(port)
    # dev mode serves POST /reset_prefix_cache, emptied between runs
    proc = procs.start(cmd, log_path, env={**os.environ, "VLLM_SERVER_DEV_MODE": "1"})
    try:
        with procs.sigterm_raises():
            yield wait_healthy(proc, f"http://{HOST}:{port}/health", log_path,
                               health_timeout_s)
    finally:
        procs.kill_group(proc)


def serve_cmd(model: ModelSpec, profile: EngineProfile, variant: str, port: int) -> list[str]:
    return [*VLLM_CLI, "serve", model.path, "--host", HOST, "--port", str(port),
            "--tokenizer", model.path, "--load-format", model.load_format,
            "--disable-uvicorn-access-log", *profile.serve_args(variant)]


def dataset_args(workload: Workload, source: str, work_dir: Path, label: str) -> list[str]:
    """``vllm bench serve`` dataset flags: vLLM's built-in ``random`` /
    ``prefix_repetition`` with the workload's parameters (``source="vllm"``), or
    the workload's exact prompts as a ``custom`` JSONL file (dummy tokenizer only;
    vLLM's custom dataset needs pandas)."""
    if source == "vllm":
        return vllm_dataset_args(workload)
    if source != "custom":
        raise BenchError(f"unknown --online-dataset {source!r}; choose vllm or custom")
    reqs = workload.requests()
    path = write_custom_jsonl(reqs, work_dir / f"dataset-{label}.jsonl")
    return ["--dataset-name", "custom", "--dataset-path", str(path), "--custom-output-len",
            "-1", "--skip-chat-template", "--disable-shuffle", "--num-prompts", str(len(reqs))]


def bench_cmd(model: ModelSpec, port: int, ds_args: list[str], *, request_rate: float,
              max_concurrency: int | None, result_dir: Path, result_filename: str,
              label: str) -> list[str]:
    cmd = [*VLLM_CLI, "bench", "serve", "--backend", "vllm", "--host", HOST, "--port",
           str(port), "--model", model.path, "--tokenizer", model.path, "--ignore-eos",
           "--request-rate", str(request_rate), "--percentile-metrics", "ttft,tpot,itl,e2el",
           "--metric-percentiles", "50,90,99", "--save-result", "--result-dir",
           str(result_dir), "--result-filename", result_filename, "--label", label,
           "--ready-check-timeout-sec", "60", "--disable-tqdm", *ds_args]
    if max_concurrency:
        cmd += ["--max-concurrency", str(max_concurrency)]
    return cmd


def check_online_workloads(workloads: list[tuple[str, Workload]], dataset_source: str) -> None:
    """Refuse what `run_online` could not run, before anything starts (``ab``
    checks this before its offline part, not after it)."""
    if dataset_source not in ("vllm", "custom"):
        raise BenchError(f"unknown --online-dataset {dataset_source!r}; choose vllm or custom")
    for label, w in workloads:
        if not isinstance(w, RandomWorkload | PrefixSharedWorkload) and dataset_source == "vllm":
            raise BenchError(f"workload {label!r}: online runs take random and prefix-shared "
                             "workloads (or --online-dataset custom)")


def for_rate(workload: Workload, rate: float, duration_s: float | None) -> Workload:
    """The workload sized to about ``rate * duration_s`` requests, so that every
    rate runs about as long: 128 requests last 16 s at 8 req/s but 4 s at 32,
    too short to tell a few percent from noise.  Unchanged without a duration
    or at an infinite rate (all requests at once)."""
    if not duration_s or math.isinf(rate):
        return workload
    return resized(workload, max(1, math.ceil(rate * duration_s)))


def run_key(label: str, rate: float) -> str:
    """The ``workload`` of a run record: one table section per workload and rate."""
    return f"{label}@{rate:g}rps"


def run_bench(cmd: list[str], log_path: Path, result_path: Path, timeout_s: float) -> dict:
    return run_to_json(cmd, log_path, result_path, timeout_s, "vllm bench serve")


def scrape_counters(port: int) -> dict[str, float]:
    """Sum of vLLM's preemption and prefix-cache counters from ``/metrics``."""
    names = {"vllm:num_preemptions_total": "num_preemptions",
             "vllm:prefix_cache_hits_total": "prefix_cache_hits",
             "vllm:prefix_cache_queries_total": "prefix_cache_queries"}
    out = dict.fromkeys(names.values(), 0.0)
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError):
        return out
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in names:
            with contextlib.suppress(ValueError):
                out[names[name]] += float(line.rsplit(" ", 1)[1])
    return out


def reset_prefix_cache(port: int) -> None:
    req = urllib.request.Request(f"http://{HOST}:{port}/reset_prefix_cache", method="POST")
    with contextlib.suppress(urllib.error.URLError, OSError):
        urllib.request.urlopen(req, timeout=30).close()


# A `vllm bench serve` run that takes longer than this many times its sending time,
# plus the slack (client start-up, dataset generation, draining), is stuck: stop it
# and say so, instead of waiting out the whole --timeout.
STALL_FACTOR = 6.0
STALL_SLACK_S = 120.0


def run_timeout(num_requests: int, rate: float, limit_s: float,
                slack_s: float = STALL_SLACK_S) -> float:
    """Seconds one ``vllm bench serve`` run may take before it counts as stuck."""
    if math.isinf(rate) or rate <= 0:
        return limit_s
    return min(limit_s, slack_s + STALL_FACTOR * num_requests / rate)


def run_online(model: ModelSpec, workloads: list[tuple[str, Workload]], variants: list[str],
               profile: EngineProfile, *, request_rates: list[float],
               max_concurrency: int | None, repeats: int, work_dir: Path, result_dir: Path,
               port: int | None = None, dataset_source: str = "vllm",
               duration_s: float | None = None, raw_dir: Path | None = None,
               server_cmd: Any = None, health_timeout_s: float = 600,
               bench_timeout_s: float = 900, stall_slack_s: float = STALL_SLACK_S,
               progress: bool = True) -> dict[str, Any]:
    """One server per (variant, repeat), in ABBA order; each serves every
    workload at every request rate (sized to about ``duration_s`` seconds per
    rate, `for_rate`).  Returns ``{"runs": [...], "config": {...}}``.

    ``vllm bench serve``'s own JSON files go to ``raw_dir`` (default
    ``result_dir/vllm-bench``).  ``server_cmd(variant, port) -> argv`` replaces
    ``vllm serve`` (tests).
    """
    check_variants(variants)
    check_online_workloads(workloads, dataset_source)
    if port is not None:
        check_port_free(port)
    work_dir.mkdir(parents=True, exist_ok=True)
    raw_dir = raw_dir or result_dir / "vllm-bench"
    raw_dir.mkdir(parents=True, exist_ok=True)
    sized = {run_key(label, rate): for_rate(w, rate, duration_s)
             for label, w in workloads for rate in request_rates}
    ds = {key: dataset_args(w, dataset_source, work_dir, key.replace("@", "-"))
          for key, w in sized.items()}
    order = abba_order(variants, repeats)
    runs: list[dict[str, Any]] = []
    bar = _bar(len(order) * len(workloads) * len(request_rates), "online runs", progress)
    try:
        for i, (variant, k) in enumerate(order):
            p = port if port is not None else free_port()
            cmd = (server_cmd(variant, p) if server_cmd
                   else serve_cmd(model, profile, variant, p))
            log = work_dir / f"server{i:02d}-{variant}-{k}.log"
            bar.set_postfix_str(f"starting {variant} #{k + 1}")
            with running_server(cmd, port=p, log_path=log,
                                health_timeout_s=health_timeout_s) as startup_s:
                for label, _ in workloads:
                    for rate in request_rates:
                        bar.set_postfix_str(f"{variant} #{k + 1} {label} rate {rate}")
                        reset_prefix_cache(p)
                        before = scrape_counters(p)
                        name = f"{label}-rate{rate:g}-{variant}-{k}"
                        result_path = raw_dir / f"{name}.json"
                        key = run_key(label, rate)
                        cmd_b = bench_cmd(model, p, ds[key], request_rate=rate,
                                          max_concurrency=max_concurrency,
                                          result_dir=raw_dir, result_filename=result_path.name,
                                          label=f"{variant}-{label}")
                        timeout_s = run_timeout(sized[key].num_requests, rate,
                                                bench_timeout_s, stall_slack_s)
                        res = run_bench(cmd_b, work_dir / f"bench-{name}.log", result_path,
                                        timeout_s)
                        after = scrape_counters(p)
                        runs.append(_run_record(res, variant, k, i, label, rate, before, after,
                                                startup_s, result_path))
                        bar.update(1)
    except BaseException as e:
        # Keep what finished: the raw vllm bench JSONs are in raw_dir already; the
        # records with their counters go next to them.
        if runs:
            kept = raw_dir / "completed-runs.json"
            kept.write_text(json.dumps(runs, indent=1, default=str))
            if isinstance(e, BenchError):
                raise BenchError(f"{e}\n({len(runs)} online runs completed before this one; "
                                 f"their records are in {kept})") from None
        raise
    finally:
        bar.close()
    return {"runs": runs, "config": {
        "variants": variants, "repeats": repeats, "order": order,
        "request_rates": request_rates, "max_concurrency": max_concurrency,
        "dataset_source": dataset_source, "duration_s": duration_s,
        "engine_profile": asdict(profile),
        "serve_args": {v: profile.serve_args(v) for v in variants},
        "workloads": {label: workload_spec(w) for label, w in workloads},
        "requests_per_run": {key: w.num_requests for key, w in sized.items()},
        "bench_dataset_args": ds}}


def _run_record(res: dict[str, Any], variant: str, k: int, i: int, label: str, rate: float,
                before: dict[str, float], after: dict[str, float], startup_s: float,
                result_path: Path) -> dict[str, Any]:
    keep = {key: v for key, v in res.items()
            if not isinstance(v, list) and key not in ("generated_texts",)}
    hits = after["prefix_cache_hits"] - before["prefix_cache_hits"]
    queries = after["prefix_cache_queries"] - before["prefix_cache_queries"]
    duration = float(res.get("duration") or 0.0)
    return {**keep, "variant": variant, "repeat": k, "order": i,
            "workload": run_key(label, rate), "request_rate": rate,
            "elapsed_time": duration,
            "num_preemptions": after["num_preemptions"] - before["num_preemptions"],
            "prefix_cache_hits": hits, "prefix_cache_queries": queries,
            "prefix_cache_hit_rate": hits / queries if queries else 0.0,
            "startup_s": startup_s, "vllm_bench_result": str(result_path)}

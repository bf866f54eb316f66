# SPDX-License-Identifier: Apache-2.0
"""Offline A/B: every variant in a fresh engine process, in ABBA order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from asyncbatch.bench import procs
from asyncbatch.bench.models import ModelSpec
from asyncbatch.bench.stats import abba_order
from asyncbatch.bench.variants import EngineProfile, check_variants
from asyncbatch.bench.workloads import Workload, workload_spec

WORKER = [sys.executable, "-m", "asyncbatch.bench.offline_worker"]


class BenchError(RuntimeError):
    pass


def write_requests(workloads: list[tuple[str, Workload]], work_dir: Path) -> list[dict[str, Any]]:
    """Token-id request files of the workloads, for the worker processes."""
    work_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for label, w in workloads:
        path = work_dir / f"requests-{label}.json"
        path.write_text(json.dumps([
            {"request_id": r.request_id, "prompt_token_ids": r.prompt_token_ids,
             "max_tokens": r.max_tokens} for r in w.requests()]))
        out.append({"label": label, "requests_file": str(path)})
    return out


def run_worker(spec: dict[str, Any], work_dir: Path, name: str, *, timeout_s: float,
               env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one `asyncbatch.bench.offline_worker` process; its process group is
    killed whatever happens.  Raises `BenchError` with the log's tail on failure."""
    spec_path = work_dir / f"{name}.spec.json"
    out_path = work_dir / f"{name}.out.json"
    log_path = work_dir / f"{name}.log"
    spec_path.write_text(json.dumps(spec, indent=1))
    out_path.unlink(missing_ok=True)
    cmd = [*WORKER, str(spec_path), str(out_path)]
    return run_to_json(cmd, log_path, out_path, timeout_s, name, env={**os.environ, **(env or {})})


def run_to_json(cmd: list[str], log_path: Path, result_path: Path, timeout_s: float, what: str,
                *, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` in its own process group until it exits, kill the group
    whatever happens, and return the JSON it wrote to ``result_path``.  Raises
    `BenchError` with the tail of ``log_path`` if it times out, fails or
    writes nothing."""
    proc = procs.start(cmd, log_path, env=env)
    try:
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{what}: no result after {timeout_s:.0f} s; log {log_path}:\n"
                             f"{procs.tail(log_path)}") from None
    finally:
        procs.kill_group(proc)
    if rc != 0 or not result_path.is_file():
        raise BenchError(f"{what}: exited with code {rc}; log {log_path}:\n"
                         f"{procs.tail(log_path)}")
    return json.loads(result_path.read_text())


def run_offline(model: ModelSpec, workloads: list[tuple[str, Workload]], variants: list[str],
                profile: EngineProfile, *, repeats: int, work_dir: Path,
                num_warmup: int = 8, timeout_s: float = 900,
                progress: bool = True) -> dict[str, Any]:
    """Run the A/B; returns ``{"runs": [...], "config": {...}}`` (runs in run order)."""
    check_variants(variants)
    request_files = write_requests(workloads, work_dir)
    order = abba_order(variants, repeats)
    runs: list[dict[str, Any]] = []
    gpu = None
    bar = _bar(len(order), "offline runs", progress)
    try:
        for i, (variant, k) in enumerate(order):
            bar.set_postfix_str(f"{variant} #{k + 1}")
            spec = {"model": model.path, "load_format": model.load_format,
                    "engine_args": profile.engine_args(variant), "workloads": request_files,
                    "num_warmup": num_warmup}
            t0 = time.monotonic()
            out = run_worker(spec, work_dir, f"run{i:02d}-{variant}-{k}", timeout_s=timeout_s)
            exit_s = time.time() - out["finished_at"] if "finished_at" in out else None
            gpu = gpu or out.get("gpu")
            effective = out["effective_config"]["async_scheduling"]
            if bool(effective) != (variant != "sync"):
                raise BenchError(f"{variant}: the engine ran with async_scheduling={effective}, "
                                 "so this variant is not what it claims to be; check the "
                                 f"engine arguments (--executor {profile.executor})")
            for r in out["results"]:
                runs.append({"variant": variant, "repeat": k, "order": i, **r,
                             "startup_s": out["startup_s"],
                             "process_s": time.monotonic() - t0, "exit_s": exit_s,
                             "effective_config": out["effective_config"]})
            bar.update(1)
    finally:
        bar.close()
    return {
        "runs": runs,
        "gpu": gpu,
        "config": {"variants": variants, "repeats": repeats, "order": order,
                   "engine_profile": asdict(profile),
                   "engine_args": {v: profile.engine_args(v) for v in variants},
                   "workloads": {label: workload_spec(w) for label, w in workloads},
                   "num_warmup": num_warmup},
    }


def _bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr)

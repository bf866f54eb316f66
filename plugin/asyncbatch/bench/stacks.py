# SPDX-License-Identifier: Apache-2.0
"""Where a process's main thread spends its time, without a profiler.

A daemon thread reads the main thread's Python stack (``sys._current_frames``)
every ``interval_s`` and counts, per function, the samples whose stack contains
it (inclusive) and the samples it was the innermost frame of (leaf).  The counts
go to a JSON file every ``dump_every_s``, so a process that is killed still
leaves them.  A sample is only taken when the sampler holds the GIL, so a thread
that never releases it is seen at the interpreter's switch interval (5 ms by
default); blocking calls (a queue wait, a CUDA sync) release it and are seen
as they happen.

`start_from_env` starts one when ``ASYNCBATCH_STACK_SAMPLES`` names a folder, and
a new one in every child this process forks,
sampling only while the file named by ``ASYNCBATCH_STACK_SAMPLES_GATE`` exists
(when that is set), so that start-up is left out;
``benchmarks/stack_sampling/sitecustomize.py`` calls it in every Python process
of a benchmark run (the engine's processes included, stock or not).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ENV = "ASYNCBATCH_STACK_SAMPLES"
GATE_ENV = "ASYNCBATCH_STACK_SAMPLES_GATE"


def frame_key(code: Any) -> str:
    """``package/module.py:function`` from a code object, short enough to read."""
    path = code.co_filename.replace("\\", "/")
    for marker in ("site-packages/", "dist-packages/", "/plugin/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        path = "/".join(path.split("/")[-2:])
    return f"{path}:{code.co_name}"


def process_name() -> str:
    try:
        return Path("/proc/self/comm").read_text().strip()
    except OSError:
        return Path(sys.argv[0] or "python").name


class StackSampler(threading.Thread):
    def __init__(self, out_dir: str | Path, *, interval_s: float = 0.005,
                 dump_every_s: float = 2.0, max_depth: int = 64,
                 thread_id: int | None = None, gate: str | Path | None = None) -> None:
        super().__init__(name="asyncbatch-stack-sampler", daemon=True)
        self.out_dir = Path(out_dir)
        self.interval_s = interval_s
        self.dump_every_s = dump_every_s
        self.max_depth = max_depth
        self.thread_id: int = thread_id or threading.main_thread().ident or 0
        self.gate = Path(gate) if gate else None
        self.samples = 0
        self.inclusive: Counter[str] = Counter()
        self.leaf: Counter[str] = Counter()
        self.started_at = time.time()
        self._stop_event = threading.Event()

    @property
    def path(self) -> Path:
        return self.out_dir / f"stacks-{os.getpid()}.json"

    def sample_once(self) -> None:
        frame = sys._current_frames().get(self.thread_id)
        if frame is None:
            return
        seen: set[str] = set()
        leaf = None
        depth = 0
        while frame is not None and depth < self.max_depth:
            key = frame_key(frame.f_code)
            if leaf is None:
                leaf = key
            seen.add(key)
            frame = frame.f_back
            depth += 1
        self.samples += 1
        self.inclusive.update(seen)
        if leaf is not None:
            self.leaf[leaf] += 1

    def snapshot(self, top: int = 200) -> dict[str, Any]:
        return {"pid": os.getpid(), "process": process_name(), "samples": self.samples,
                "interval_s": self.interval_s, "seconds": time.time() - self.started_at,
                "inclusive": dict(self.inclusive.most_common(top)),
                "leaf": dict(self.leaf.most_common(top))}

    def dump(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.snapshot()))
        tmp.replace(self.path)

    def run(self) -> None:
        next_dump = time.monotonic() + self.dump_every_s
        while not self._stop_event.wait(self.interval_s):
            if self.gate is None or self.gate.exists():
                self.sample_once()
            if time.monotonic() >= next_dump:
                self.dump()
                next_dump = time.monotonic() + self.dump_every_s
        self.dump()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def start_from_env() -> StackSampler | None:
    out_dir = os.environ.get(ENV)
    if not out_dir:
        return None
    gate = os.environ.get(GATE_ENV) or None
    sampler = StackSampler(out_dir, gate=gate)
    sampler.start()

    def restart_in_child() -> None:
        # threads do not survive fork(); vLLM forks its EngineCore and worker processes
        StackSampler(out_dir, gate=gate).start()

    os.register_at_fork(after_in_child=restart_in_child)
    return sampler


def summarize(out_dir: str | Path, *, min_samples: int = 50,
              top: int = 12) -> list[dict[str, Any]]:
    """Per sampled process with at least ``min_samples`` samples: its name and
    its ``top`` functions by inclusive share of samples, busiest process first."""
    rows = []
    for path in sorted(Path(out_dir).glob("stacks-*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        n = data.get("samples", 0)
        if n < min_samples:
            continue
        rows.append({"process": data["process"], "pid": data["pid"], "samples": n,
                     "inclusive_pct": {k: round(100.0 * v / n, 1) for k, v in
                                       list(data["inclusive"].items())[:top]},
                     "leaf_pct": {k: round(100.0 * v / n, 1) for k, v in
                                  list(data["leaf"].items())[:top]}})
    return sorted(rows, key=lambda r: -r["samples"])

# SPDX-License-Identifier: Apache-2.0
"""Where the EngineCore's host time goes in steady decode, on the CPU.

    $(scripts/venv.sh)/bin/python benchmarks/micro/host_breakdown.py [--running 1000]

Builds stock vLLM 0.26's ``AsyncScheduler`` (or ``--scheduler``) from the
replay's model folder, admits ``--running`` requests (512-token prompts, 256
output tokens), lets them all reach decode, then times ``--steps`` steps of
`SimEngine` (``schedule()`` + ``update_from_output()``, two in flight) while
`asyncbatch.bench.stacks.StackSampler` samples the stack every millisecond
(``--no-stacks``: no sampler).  Prints the milliseconds per step, of which
``schedule()`` and ``update_from_output()``, and each function's inclusive share
of the samples.  The simulator's own work (fake tokens, bookkeeping) is part of
it and shows as ``asyncbatch/sim/...``.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time

STOCK = "vllm.v1.core.sched.async_scheduler.AsyncScheduler"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--running", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--scheduler", default=STOCK)
    ap.add_argument("--settings", type=json.loads, default=None,
                    help='asyncbatch settings, e.g. \'{"policy": "fcfs", "decode_fast_path": '
                         'false}\' (with --scheduler asyncbatch.Scheduler)')
    ap.add_argument("--no-stacks", action="store_true",
                    help="time only, without the stack sampler (its thread takes the GIL "
                         "every millisecond, which shifts time between the timed calls)")
    a = ap.parse_args()

    from asyncbatch.bench.replay import replay_model_dir
    from asyncbatch.bench.stacks import StackSampler
    from asyncbatch.sim.engine import SimEngine, build_scheduler, make_request

    scheduler = build_scheduler(replay_model_dir(), a.scheduler, num_blocks=40_000,
                                max_num_seqs=max(a.running, 1), max_num_batched_tokens=16_384,
                                additional_config={"asyncbatch": a.settings} if a.settings
                                else None)
    engine = SimEngine(scheduler)
    rng = random.Random(0)
    for i in range(a.running):
        engine.add_request(make_request(f"r{i}", [rng.randrange(2, 30_000) for _ in range(512)],
                                        max_tokens=256, ignore_eos=True))
    while any(r.num_output_tokens == 0 for r in scheduler.running) or scheduler.waiting:
        engine.step()
    # the scheduler's own two shares of each step
    seconds = {"schedule": 0.0, "update_from_output": 0.0}
    for name in seconds:
        setattr(scheduler, name, _timed(getattr(scheduler, name), name, seconds))
    if a.no_stacks:
        per_step_ms = _time_steps(engine, a.steps)
        print(_headline(a, scheduler, per_step_ms, seconds))
        return
    with tempfile.TemporaryDirectory() as out:
        sampler = StackSampler(out, interval_s=0.001, thread_id=threading.get_ident())
        sampler.start()
        per_step_ms = _time_steps(engine, a.steps)
        sampler.stop()
        data = json.loads(sampler.path.read_text())
    n = data["samples"]
    print(f"{_headline(a, scheduler, per_step_ms, seconds)}; {n} stack samples")
    for key, count in list(data["inclusive"].items())[:a.top]:
        print(f"{100 * count / n:5.1f}%  {key}")


def _time_steps(engine, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    return 1000 * (time.perf_counter() - t0) / steps


def _headline(a, scheduler, per_step_ms: float, seconds: dict[str, float]) -> str:
    shares = ", ".join(f"{name}() {1000 * s / a.steps:.1f} ms" for name, s in seconds.items())
    return (f"{a.scheduler} {json.dumps(a.settings) if a.settings else ''}, "
            f"{len(scheduler.running)} running: {per_step_ms:.1f} ms per step, of which "
            f"{shares}")

def _timed(method, name, seconds):
    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - t
    return timed


if __name__ == "__main__":
    main()

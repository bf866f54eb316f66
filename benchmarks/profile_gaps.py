# SPDX-License-Identifier: Apache-2.0
"""Where the GPU sits idle between engine steps under stock vLLM 0.26 async scheduling.

For each model shape (dummy weights) and executor, a fresh process builds
``vllm.LLM`` with the torch profiler configured (``profiler_config``), then:

1. warms up, times a prefill-only pass (``max_tokens=1``) and the full workload
   without the profiler while sampling NVML GPU utilization: output tok/s, mean
   utilization, decode ms/step = (full - prefill-only) / (output_len - 1);
2. runs the same workload (fresh random prompts) between ``LLM.start_profile()``
   and ``stop_profile()``; the worker records ``--profile-steps`` steps after
   skipping ``--profile-delay`` (both in steady decode) and writes a gzipped
   chrome trace under /tmp.

The parent analyses each trace with `asyncbatch.bench.gaps` (busy fraction, idle
gaps, idle per step, the host range that overlaps each gap) and writes
``profile-gaps-<time>.json`` / ``.md`` (and a small trimmed trace per run) to
``--result-dir``.  Runs that would not fit ``--budget-s`` are skipped.

    PYTHONPATH=$PWD/plugin:$PYTHONPATH python benchmarks/profile_gaps.py \\
        --shapes llama-1b,llama-8b --executor mp,default

``--engine-args JSON`` adds ``vllm.LLM`` arguments to every run: the asyncbatch
worker, or stock with a CUDA-graph ceiling above 512 (``max_num_seqs`` is the
number of requests, at most 1024).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "plugin"))

WORK = Path("/tmp/asyncbatch_profile_gaps")
FIRST_ESTIMATE_S = {"llama-1b": 150.0, "llama-8b": 200.0}
TRIMMED_TRACE_MAX_BYTES = 10 * 1024 * 1024


def log(msg: str) -> None:
    print(f"[profile_gaps {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ============================================================================ child process

class UtilSampler:
    """GPU utilization samples (NVML via pynvml, else ``nvidia-smi -lms``) in a thread."""

    def __init__(self, index: int, period_s: float = 0.05) -> None:
        self.index, self.period_s = index, period_s
        self.samples: list[tuple[float, float]] = []
        self.source = "none"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
            pynvml.nvmlDeviceGetUtilizationRates(handle)
            self.source = "pynvml"

            def loop() -> None:
                while not self._stop.is_set():
                    with contextlib.suppress(Exception):
                        u = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
                        self.samples.append((time.perf_counter(), float(u)))
                    self._stop.wait(self.period_s)

            self._thread = threading.Thread(target=loop, daemon=True)
            self._thread.start()
            return
        except Exception as e:  # noqa: BLE001
            log(f"pynvml unavailable ({e!r}); trying nvidia-smi")
        if shutil.which("nvidia-smi") is None:
            log("no NVML sampler: neither pynvml nor nvidia-smi")
            return
        try:
            self._proc = subprocess.Popen(
                ["nvidia-smi", "-i", str(self.index), "--query-gpu=utilization.gpu",
                 "--format=csv,noheader,nounits", "-lms", "100"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.source = "nvidia-smi"
            proc = self._proc

            def read() -> None:
                assert proc.stdout is not None
                for line in proc.stdout:
                    with contextlib.suppress(ValueError):
                        self.samples.append((time.perf_counter(), float(line.strip())))

            self._thread = threading.Thread(target=read, daemon=True)
            self._thread.start()
        except Exception as e:  # noqa: BLE001
            log(f"nvidia-smi sampler failed: {e!r}")

    def stop(self, t0: float, t1: float) -> dict[str, Any]:
        self._stop.set()
        if self._proc is not None:
            with contextlib.suppress(Exception):
                self._proc.terminate()
                self._proc.wait(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=5)
        inside = [u for t, u in self.samples if t0 <= t <= t1]
        span = t1 - t0
        mid = [u for t, u in self.samples if t0 + 0.2 * span <= t <= t1 - 0.2 * span]
        return {"source": self.source, "samples": len(inside),
                "mean": sum(inside) / len(inside) if inside else None,
                "mean_middle": sum(mid) / len(mid) if mid else None}


def _gpu_index() -> int:
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


def _prompts(rng: random.Random, n: int, length: int) -> list[Any]:
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=[rng.randrange(2, 128000) for _ in range(length)])
            for _ in range(n)]


def _find_trace(trace_dir: Path, wait_s: float) -> Path | None:
    """The newest trace under ``trace_dir`` once its size stops changing."""
    deadline = time.monotonic() + wait_s
    last: tuple[Path, int] | None = None
    while time.monotonic() < deadline:
        found = sorted((p for p in trace_dir.rglob("*.pt.trace.json*") if p.is_file()),
                       key=lambda p: p.stat().st_mtime)
        if found:
            cur = (found[-1], found[-1].stat().st_size)
            if last == cur and cur[1] > 0:
                return cur[0]
            last = cur
        time.sleep(1.0)
    return last[0] if last else None


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"shape": spec["shape"], "executor": spec["executor"]}
    t_begin = time.perf_counter()
    from vllm import LLM, SamplingParams

    n, in_len, out_len = spec["num_requests"], spec["input_len"], spec["output_len"]
    trace_dir = Path(spec["trace_dir"])
    trace_dir.mkdir(parents=True, exist_ok=True)
    profiler_config = {
        "profiler": "torch", "torch_profiler_dir": str(trace_dir),
        "torch_profiler_with_stack": False, "torch_profiler_record_shapes": False,
        "torch_profiler_dump_cuda_time_total": False, "torch_profiler_use_gzip": True,
        "delay_iterations": spec["profile_delay"], "max_iterations": spec["profile_steps"],
        "ignore_frontend": True,
    }
    kwargs: dict[str, Any] = dict(
        model=spec["model"], tokenizer=spec["model"], load_format="dummy",
        max_model_len=spec["max_model_len"], max_num_seqs=spec["max_num_seqs"],
        max_num_batched_tokens=spec["max_num_batched_tokens"],
        gpu_memory_utilization=spec["gpu_memory_utilization"], seed=0,
        profiler_config=profiler_config,
    )
    kwargs.update(spec.get("engine_args") or {})
    if spec["executor"] != "default":
        kwargs["distributed_executor_backend"] = spec["executor"]
    log(f"{spec['shape']}/{spec['executor']}: building LLM {kwargs}")
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    out["startup_s"] = time.perf_counter() - t0
    log(f"engine up in {out['startup_s']:.1f} s")
    try:
        vc = llm.llm_engine.vllm_config
        eff: dict[str, Any] = {
            "async_scheduling": vc.scheduler_config.async_scheduling,
            "distributed_executor_backend": str(vc.parallel_config.distributed_executor_backend),
            "num_gpu_blocks": vc.cache_config.num_gpu_blocks,
            "max_num_seqs": vc.scheduler_config.max_num_seqs,
            "max_num_batched_tokens": vc.scheduler_config.max_num_batched_tokens,
        }
        for key, get in (("use_v2_model_runner", lambda: vc.use_v2_model_runner),
                         ("cudagraph_mode", lambda: str(vc.compilation_config.cudagraph_mode))):
            try:
                eff[key] = get()
            except Exception as e:  # noqa: BLE001
                eff[key] = f"? ({type(e).__name__})"
        out["effective"] = eff
        log(f"effective config: {eff}")
    except Exception as e:  # noqa: BLE001
        out["effective"] = {"error": repr(e)}
    with contextlib.suppress(Exception):
        import torch

        out["gpu"] = torch.cuda.get_device_name(0)
        out["torch"] = torch.__version__
    with contextlib.suppress(Exception):
        import vllm

        out["vllm"] = vllm.__version__

    rng = random.Random(spec["seed"])
    full = SamplingParams(max_tokens=out_len, ignore_eos=True, temperature=1.0)
    one = SamplingParams(max_tokens=1, ignore_eos=True, temperature=1.0)

    def reset() -> None:
        with contextlib.suppress(Exception):
            llm.reset_prefix_cache()

    log("warm-up")
    llm.generate(_prompts(rng, min(n, 16), in_len),
                 SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False)
    reset()

    log("timed prefill-only pass (max_tokens=1)")
    ps = _prompts(rng, n, in_len)
    t0 = time.perf_counter()
    llm.generate(ps, one, use_tqdm=False)
    t_prefill = time.perf_counter() - t0
    reset()

    log(f"timed run without profiler: {n} x {in_len} in / {out_len} out")
    ps = _prompts(rng, n, in_len)
    sampler = UtilSampler(_gpu_index())
    sampler.start()
    t0 = time.perf_counter()
    outs = llm.generate(ps, full, use_tqdm=False)
    t1 = time.perf_counter()
    nvml = sampler.stop(t0, t1)
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    wall = t1 - t0
    out["timed"] = {
        "wall_s": wall, "prefill_only_s": t_prefill, "output_tokens": n_out,
        "output_tok_s": n_out / wall,
        "decode_ms_per_step": 1000.0 * (wall - t_prefill) / max(out_len - 1, 1),
        "nvml": nvml,
    }
    log(f"timed: {wall:.2f} s, {n_out / wall:,.0f} out tok/s, "
        f"decode {out['timed']['decode_ms_per_step']:.2f} ms/step, NVML util {nvml}")
    reset()

    log(f"profiled run (worker records steps {spec['profile_delay']}.."
        f"{spec['profile_delay'] + spec['profile_steps']} of it)")
    ps = _prompts(rng, n, in_len)
    before = set(trace_dir.rglob("*"))
    llm.start_profile(profile_prefix=f"{spec['shape']}-{spec['executor']}")
    t0 = time.perf_counter()
    llm.generate(ps, full, use_tqdm=False)
    t1 = time.perf_counter()
    log("stop_profile (the worker may spend a while writing the trace)")
    llm.stop_profile()
    out["profiled_wall_s"] = t1 - t0
    trace = _find_trace(trace_dir, wait_s=90.0)
    if trace is None or trace in before:
        out["trace"] = None
        out["error"] = f"no trace file appeared under {trace_dir}"
        log(out["error"])
    else:
        out["trace"] = str(trace)
        log(f"trace {trace} ({trace.stat().st_size / 1e6:.1f} MB)")
    out["child_s"] = time.perf_counter() - t_begin
    Path(spec["out"]).write_text(json.dumps(out, indent=1, default=str))
    log("child done; shutting the engine down")
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
    return out


# ============================================================================ parent

def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def run_one(args: argparse.Namespace, shape: str, executor: str, timeout_s: float,
            stamp: str) -> dict[str, Any]:
    from asyncbatch.sim.model_dir import write_model_dir

    model = write_model_dir(WORK / "models" / shape, shape)
    run_dir = WORK / f"{stamp}-{shape}-{executor}"
    run_dir.mkdir(parents=True, exist_ok=True)
    steps, delay = args.profile_steps, args.profile_delay
    if args.output_len < delay + steps + 32:
        log(f"output_len {args.output_len} too short for delay {delay} + {steps} steps: "
            "profiling the whole run")
        steps, delay = 0, 0
    spec = {
        "shape": shape, "executor": executor, "model": str(model),
        "num_requests": args.num_requests, "input_len": args.input_len,
        "output_len": args.output_len, "seed": args.seed,
        "max_num_seqs": min(max(args.num_requests, 1), 1024),
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_model_len": max(1024, -(-(args.input_len + args.output_len + 16) // 256) * 256),
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "profile_delay": delay, "profile_steps": steps,
        "trace_dir": str(run_dir / "traces"), "out": str(run_dir / "child.json"),
        "engine_args": args.engine_args,
    }
    spec_path = run_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    env = dict(os.environ)
    env.update({"VLLM_CUSTOM_SCOPES_FOR_PROFILING": "1", "VLLM_NO_USAGE_STATS": "1",
                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "PYTHONPATH": os.pathsep.join(
                    [str(ROOT / "plugin"), *filter(None, [env.get("PYTHONPATH")])])})
    log(f"=== {shape} / executor {executor}: child process (timeout {timeout_s:.0f} s)")
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child",
                             str(spec_path)], env=env, start_new_session=True)
    rc: int | None
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        rc = None
        # the result may be written already (a slow engine shutdown)
        if not Path(spec["out"]).exists():
            log(f"{shape}/{executor}: timed out after {timeout_s:.0f} s; killing it")
    finally:
        _kill_group(proc)
        with contextlib.suppress(Exception):
            proc.wait(timeout=20)
    elapsed = time.monotonic() - t0
    res: dict[str, Any] = {"shape": shape, "executor": executor, "child_rc": rc,
                           "run_s": elapsed}
    if Path(spec["out"]).exists():
        res.update(json.loads(Path(spec["out"]).read_text()))
    else:
        res["error"] = res.get("error") or f"child failed (rc={rc}); see its log above"
        return res
    if res.get("trace"):
        res.update(analyze(res["trace"], args, shape, executor, stamp))
    return res


def analyze(trace_path: str, args: argparse.Namespace, shape: str, executor: str,
            stamp: str) -> dict[str, Any]:
    from asyncbatch.bench.gaps import analyze_trace, load_trace, trim_trace

    log(f"analysing {trace_path}")
    t0 = time.perf_counter()
    try:
        trace = load_trace(trace_path)
        a = analyze_trace(trace, steady_fraction=args.steady_fraction)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        return {"analysis": None, "error": f"analysis failed: {e!r}"}
    log(f"analysed in {time.perf_counter() - t0:.1f} s: busy {100 * a['busy_fraction']:.1f} %, "
        f"{a['gaps_us']['count']} gaps, p50 {a['gaps_us']['p50']:.1f} us, "
        f"max {a['gaps_us']['max']:.1f} us")
    extra: dict[str, Any] = {"analysis": a}
    # a small trace of ~24 steady steps for later inspection
    try:
        w = a["window"]
        step = (a.get("per_step") or {}).get("step_us", {}).get("p50") or w["duration_us"] / 10
        hi = min(w["end_us"], w["start_us"] + 24 * step)
        small = trim_trace(trace, w["start_us"], hi, a["host_thread"][0])
        dest = Path(args.result_dir) / f"trace-{stamp}-{shape}-{executor}-steady.json.gz"
        with gzip.open(dest, "wt") as f:
            json.dump(small, f)
        if dest.stat().st_size > TRIMMED_TRACE_MAX_BYTES:
            dest.unlink()
        else:
            extra["trimmed_trace"] = dest.name
    except Exception as e:  # noqa: BLE001
        log(f"trimmed trace not written: {e!r}")
    return extra


def write_summary(args: argparse.Namespace, stamp: str, runs: list[dict[str, Any]],
                  notes: list[str]) -> Path:
    from asyncbatch.bench.gaps import render_markdown

    summary = {
        "meta": {"workload": f"{args.num_requests} requests x {args.input_len} in / "
                             f"{args.output_len} out (random token ids, ignore_eos)",
                 "profile": f"steps {args.profile_delay}..{args.profile_delay + args.profile_steps}"
                            f" of the profiled run, middle {100 * args.steady_fraction:.0f} % "
                            "of its decode steps analysed",
                 "gpu": next((r.get("gpu") for r in runs if r.get("gpu")), "?"),
                 "vllm": next((r.get("vllm") for r in runs if r.get("vllm")), "?"),
                 "torch": next((r.get("torch") for r in runs if r.get("torch")), "?"),
                 "engine_args": json.dumps(args.engine_args) if args.engine_args else "-"},
        "runs": runs, "notes": notes,
    }
    out = Path(args.result_dir)
    out.mkdir(parents=True, exist_ok=True)
    jpath = out / f"profile-gaps-{stamp}.json"
    jpath.write_text(json.dumps(summary, indent=1, default=str))
    (out / f"profile-gaps-{stamp}.md").write_text(render_markdown(summary))
    return jpath


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from asyncbatch.bench.cli import json_object

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="llama-1b,llama-8b")
    p.add_argument("--executor", default="mp",
                   help="mp, default, or a comma list (runs in order: every shape with the "
                        "first executor, then the next)")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--profile-delay", type=int, default=64,
                   help="worker steps of the profiled run before recording starts")
    p.add_argument("--profile-steps", type=int, default=96, help="worker steps recorded")
    p.add_argument("--steady-fraction", type=float, default=0.6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="skip runs that would not finish within this many seconds in all")
    p.add_argument("--result-dir", default=str(ROOT / "benchmarks/results/profile"))
    p.add_argument("--engine-args", type=json_object, default={},
                   help="JSON object of more vllm.LLM arguments for every run, e.g. "
                        '\'{"compilation_config": {"max_cudagraph_capture_size": 1024}}\' or '
                        '\'{"scheduler_cls": "asyncbatch.Scheduler", '
                        '"worker_cls": "asyncbatch.Worker"}\'')
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)



def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        try:
            run_child(json.loads(Path(args.child).read_text()))
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    executors = [e.strip() for e in args.executor.split(",") if e.strip()]
    bad = [e for e in executors if e not in ("mp", "default", "uni", "ray")]
    if bad:
        raise SystemExit(f"unknown executor(s) {bad}; use mp or default")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    Path(args.result_dir).mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    runs: list[dict[str, Any]] = []
    notes: list[str] = [
        "idle = no kernel, memcpy or memset running on the device; a step runs from one "
        "execute_model annotation start to the next on the worker's host thread",
        "the attribution tables give the host range (innermost) on that thread that overlaps "
        "the idle time; '(no annotation)' on the worker thread is mostly waiting for the next "
        "scheduler output",
        "decode ms/step = (timed run - prefill-only run) / (output_len - 1), wall clock, "
        "without the profiler",
    ]
    measured: dict[str, float] = {}
    log(f"shapes {shapes}, executors {executors}, budget {args.budget_s:.0f} s, "
        f"results in {args.result_dir}, traces under {WORK}")
    for executor in executors:
        for shape in shapes:
            elapsed = time.monotonic() - start
            est = measured.get(shape, FIRST_ESTIMATE_S.get(shape, 200.0))
            left = args.budget_s - elapsed
            if est > left:
                msg = (f"skipped {shape}/{executor}: about {est:.0f} s needed, "
                       f"{max(left, 0):.0f} s of the budget left")
                log(msg)
                notes.append(msg)
                continue
            try:
                res = run_one(args, shape, executor, timeout_s=min(max(left, 60.0), 330.0),
                              stamp=stamp)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                res = {"shape": shape, "executor": executor, "error": repr(e)}
            measured[shape] = 1.1 * float(res.get("run_s", est))
            runs.append(res)
            path = write_summary(args, stamp, runs, notes)
            log(f"summary so far: {path}")
    path = write_summary(args, stamp, runs, notes)
    md = path.with_suffix(".md")
    print("\n" + md.read_text(), flush=True)
    log(f"done in {time.monotonic() - start:.0f} s; summary {path} and {md}")
    return 0 if any(r.get("analysis") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())

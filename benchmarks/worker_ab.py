# SPDX-License-Identifier: Apache-2.0
"""Worker-side A/B on a GPU: stock async scheduling vs ``asyncbatch.Worker``.

    python3 benchmarks/worker_ab.py --shape llama-1b --repeats 2 --out DIR
    python3 benchmarks/worker_ab.py --long --repeats 2 --repeat-offset 0|2|4 --out DIR
        # long runs (timed parts >= 30 s), split over three commands; then --pool the files
    python3 benchmarks/worker_ab.py --resident --long --variants async,depth3,grouped \
        --workload random --workload prefix --out DIR
        # one engine per variant, started once; timed parts alternate between them

Variants (every run a fresh ``vllm.LLM`` in its own process, ABBA order; the
default is ``async,async+cg1024,depth3``: stock as it ships, stock with the same
CUDA graphs as the worker, and the worker):

- ``async``: stock vLLM 0.26, async scheduling, two batches in flight.
- ``depthN``: ``asyncbatch.Scheduler`` (pass-through ``fcfs`` policy, so the
  admission order is stock's) + ``asyncbatch.Worker`` + ``pipeline_depth`` N, with
  the worker's CUDA graphs up to the largest decode batch.
- ``depth3-cg512``: ``depth3`` with ``cuda_graph_max_tokens`` 0, i.e. vLLM's own
  CUDA-graph ceiling (``depth3`` raises it to the largest decode batch);
  ``depth3-nofast``: ``depth3`` without the scheduler's ``decode_fast_path``;
  ``depth3-nofastout``: without its ``decode_fast_output``; the suffixes may be
  combined (``depth2-cg512-nofast-nofastout``).
- ``sched``: ``asyncbatch.Scheduler`` alone (pass-through ``fcfs``, its decode fast
  paths) with vLLM's own worker, two in flight; ``sched+cg1024`` against
  ``async+cg1024`` and ``depth3`` separates the fast path from the worker.
- ``grouped``: ``asyncbatch.Scheduler`` alone with its default settings (prefix
  groups, decode first, the KV forecast, the fast paths) and vLLM's own worker: the
  scheduler as users turn it on with ``--scheduler-cls`` only.
- ``full3``: ``asyncbatch.Scheduler`` with its default settings and
  ``asyncbatch.Worker``, three in flight: both as users turn them on.
- a suffix ``+cgN`` on any (``async+cg1024``) sets vLLM's ``max_cudagraph_capture_size``
  to N, i.e. captures CUDA graphs for batches of up to N tokens (vLLM: 512).
- a last suffix ``~swN`` on any (``depth3~sw200``) sets Python's thread switch
  interval (``sys.setswitchinterval``, default 5 ms) to N microseconds in every
  process of the run (through ``benchmarks/stack_sampling/sitecustomize.py``).  The
  engine processes each have a main thread and an output thread that take turns on
  the GIL; a thread that wants the GIL back waits up to one interval.

**Resident engines** (``--resident``): every run above pays an engine start (20-60 s)
for one timed part.  With ``--resident`` each variant's engine starts once, in its own
process, one after the other (so that each sizes its KV cache with the others already
resident), each with ``--gpu-memory-utilization`` (default 0.88 / number of variants),
and the timed parts go to them in A B B A order; the engines that wait are idle
(vLLM's shared-memory readers stop polling after 1 s without work).  Part ``k`` of
every variant generates the same prompts (seed ``k``), after ``reset_prefix_cache``.
Greedy parity is generated once per engine, after its start.  One result file per
workload (``--workload``, repeatable):

- ``random`` (default): ``--num-prompts`` x ``--input-len`` / ``--output-len``;
- ``prefix[:groups=G,size=S,prefix=P,suffix=X,out=O]``: G groups of S prompts that share
  a P-token prefix, each with X tokens of its own, O tokens out, shuffled so the groups
  arrive interleaved (default 256 x 32, 1024 + 64 in, 192 out: no KV pressure);
- a suffix ``@v1,v2`` runs a workload on those variants only (``prefix@async,grouped``).

All use ``distributed_executor_backend="mp"`` (stock vLLM's faster option for
small models) and vLLM's defaults for everything else.  Each run times one
``llm.generate`` of random prompts (``--num-prompts`` x ``--input-len`` in /
``--output-len`` out, ``ignore_eos``) while a thread samples NVML GPU utilization
every 50 ms and the CPU time of every thread of the engine's processes is read
before and after (vLLM's shared-memory queues poll, so a thread that waits on one
reads busy too), then generates greedily for a parity set: prompts of mixed lengths
whose ``max_tokens`` differ, so requests finish at different steps, with prefix
caching on.  The parent compares the parity tokens of every run with the first
run of the first of ``--variants`` and fails on any difference.  ``--sync-check``
adds one run of the last of ``--variants`` under ``VLLM_GPU_SYNC_CHECK=error`` (any host sync inside
``execute_model`` / ``sample_tokens`` raises).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def switch_interval_us(variant: str) -> int | None:
    """The ``~swN`` suffix: Python's thread switch interval in microseconds (None: unset)."""
    _, sep, us = variant.partition("~sw")
    if not sep:
        return None
    if not us.isdigit() or int(us) == 0:
        raise SystemExit(f"unknown variant {variant!r}: ~sw takes microseconds > 0")
    return int(us)


def engine_args(variant: str) -> dict[str, Any]:
    args: dict[str, Any] = {"distributed_executor_backend": "mp", "seed": 0}
    variant = variant.partition("~sw")[0]
    variant, _, graphs = variant.partition("+cg")
    if graphs:  # e.g. async+cg1024: CUDA graphs captured up to 1024 tokens (vLLM: 512)
        args["compilation_config"] = {"max_cudagraph_capture_size": int(graphs)}
    if variant.startswith("depth"):
        depth, *flags = variant.removeprefix("depth").split("-")
        if not depth.isdigit() or set(flags) - {"cg512", "nofast", "nofastout"}:
            raise SystemExit(f"unknown variant {variant!r}")
        settings: dict[str, Any] = {"policy": "fcfs", "pipeline_depth": int(depth)}
        if "cg512" in flags:
            settings["cuda_graph_max_tokens"] = 0
        if "nofast" in flags:
            settings["decode_fast_path"] = False
        if "nofastout" in flags:
            settings["decode_fast_output"] = False
        args.update(scheduler_cls="asyncbatch.Scheduler", worker_cls="asyncbatch.Worker",
                    additional_config={"asyncbatch": settings})
    elif variant == "sched":
        args.update(scheduler_cls="asyncbatch.Scheduler",
                    additional_config={"asyncbatch": {"policy": "fcfs"}})
    elif variant == "grouped":
        args.update(scheduler_cls="asyncbatch.Scheduler")
    elif variant == "full3":
        args.update(scheduler_cls="asyncbatch.Scheduler", worker_cls="asyncbatch.Worker",
                    additional_config={"asyncbatch": {"pipeline_depth": 3}})
    elif variant != "async":
        raise SystemExit(f"unknown variant {variant!r}")
    return args


def parity_prompts(n: int = 64, seed: int = 1) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(100, 30000) for _ in range(96)]
    prompts, max_tokens = [], []
    for i in range(n):
        length = rng.choice([5, 17, 64, 200, 700, 1500])
        body = [rng.randrange(100, 30000) for _ in range(length)]
        prompts.append(shared + body if i % 3 == 0 else body)
        max_tokens.append(rng.choice([1, 3, 16, 40, 97, 128]))
    return prompts, max_tokens


def nvml_handle(pynvml: Any) -> Any:
    """NVML's handle of the GPU the engine runs on: the first device
    ``CUDA_VISIBLE_DEVICES`` names (an index, or a UUID), else device 0.  NVML
    ignores ``CUDA_VISIBLE_DEVICES`` and numbers devices in PCI bus order; on a
    host of identical GPUs CUDA's default order agrees with it, elsewhere set
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID``."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    if first.isdigit():
        return pynvml.nvmlDeviceGetHandleByIndex(int(first))
    if first.startswith(("GPU-", "MIG-")):
        return pynvml.nvmlDeviceGetHandleByUUID(first)
    return pynvml.nvmlDeviceGetHandleByIndex(0)


class UtilSampler(threading.Thread):
    """NVML GPU utilization (% of time a kernel ran in the last sample period)."""

    def __init__(self, period_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        try:
            import pynvml
        except ImportError:
            from vllm.third_party import pynvml  # type: ignore[no-redef]

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = nvml_handle(pynvml)
        self.period_s = period_s
        self.samples: list[int] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)
            time.sleep(self.period_s)

    def stop(self) -> list[int]:
        self._halt.set()
        self.join()
        return self.samples


class ThreadCpu:
    """CPU seconds of every thread of this process and its descendants (the
    EngineCore and the workers), read from psutil at two instants: which thread
    of which process was busy, and how busy, during the timed run."""

    def __init__(self) -> None:
        import psutil

        self.psutil = psutil
        self.start = self._snapshot()
        self.t0 = time.perf_counter()

    def _snapshot(self) -> dict[tuple[int, int], tuple[str, float]]:
        me = self.psutil.Process()
        out = {}
        for proc in [me, *me.children(recursive=True)]:
            try:
                name = proc.name()
                for t in proc.threads():
                    out[(proc.pid, t.id)] = (name, t.user_time + t.system_time)
            except self.psutil.Error:
                continue
        return out

    def busiest(self, per_process: int = 3) -> list[dict[str, Any]]:
        """Per process, its ``per_process`` busiest threads as % of one core."""
        end, wall = self._snapshot(), time.perf_counter() - self.t0
        by_proc: dict[tuple[int, str], list[float]] = {}
        for key, (name, cpu) in end.items():
            busy = cpu - self.start.get(key, (name, 0.0))[1]
            by_proc.setdefault((key[0], name), []).append(100.0 * busy / wall)
        rows = [{"pid": pid, "process": name, "threads": len(pcts),
                 "total_pct": round(sum(pcts), 1),
                 "busiest_threads_pct": [round(x, 1) for x in sorted(pcts)[::-1][:per_process]]}
                for (pid, name), pcts in by_proc.items()]
        return sorted(rows, key=lambda r: -r["total_pct"])


def _worker_buffer_depth(worker: Any) -> int:
    from vllm.v1.worker.gpu import buffer_utils

    return int(buffer_utils._DEFAULT_MAX_CONCURRENCY)


def _worker_allocator_stats(worker: Any) -> dict[str, int]:
    """The worker's CUDA caching-allocator counters. ``num_alloc_retries`` counts
    allocations that failed, emptied the cache (``cudaFree``, which waits for the
    device) and tried again: a host stall inside a step that the sync check does
    not see."""
    import torch

    stats = torch.cuda.memory_stats()
    keys = ("num_alloc_retries", "num_ooms", "num_device_alloc", "num_device_free",
            "reserved_bytes.all.peak", "allocated_bytes.all.peak")
    return {k: int(stats.get(k, 0)) for k in keys}


def _worker_switch_interval(worker: Any) -> float:
    return sys.getswitchinterval()


def _worker_graph_ceiling(worker: Any) -> int:
    return int(worker.vllm_config.compilation_config.max_cudagraph_capture_size or 0)


def workload_prompts(workload: dict[str, Any], seed: int) -> tuple[list[list[int]], int]:
    """The token ids of one timed part of ``workload`` and its ``max_tokens``."""
    rng = random.Random(seed)
    if workload["kind"] == "random":
        prompts = [[rng.randrange(100, 30000) for _ in range(workload["input_len"])]
                   for _ in range(workload["num_prompts"])]
        return prompts, workload["output_len"]
    if workload["kind"] == "prefix":
        prompts = []
        for _ in range(workload["groups"]):
            shared = [rng.randrange(100, 30000) for _ in range(workload["prefix"])]
            prompts += [shared + [rng.randrange(100, 30000) for _ in range(workload["suffix"])]
                        for _ in range(workload["size"])]
        rng.shuffle(prompts)  # the groups arrive interleaved
        return prompts, workload["out"]
    raise ValueError(f"unknown workload kind {workload['kind']!r}")


PREFIX_DEFAULTS = {"groups": 256, "size": 32, "prefix": 1024, "suffix": 64, "out": 192}


def parse_workload(text: str, a: argparse.Namespace) -> dict[str, Any]:
    """``random`` or ``prefix[:k=v,...]`` (keys of `PREFIX_DEFAULTS`) as a workload dict."""
    name, _, params = text.partition(":")
    if name == "random":
        if params:
            raise SystemExit("workload random takes --num-prompts/--input-len/--output-len, "
                             f"not parameters ({text!r})")
        return {"kind": "random", "num_prompts": a.num_prompts, "input_len": a.input_len,
                "output_len": a.output_len}
    if name != "prefix":
        raise SystemExit(f"unknown workload {text!r}: random or prefix[:k=v,...]")
    workload: dict[str, Any] = {"kind": "prefix", **PREFIX_DEFAULTS}
    for item in filter(None, params.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in PREFIX_DEFAULTS or not value.isdigit() or int(value) < 1:
            raise SystemExit(f"bad workload parameter {item!r} in {text!r}: one of "
                             f"{', '.join(PREFIX_DEFAULTS)} = a positive integer")
        workload[key] = int(value)
    return workload


def engine_info(llm: Any, variant: str, startup_s: float) -> dict[str, Any]:
    vc = llm.llm_engine.vllm_config
    return {
        "variant": variant, "startup_s": startup_s,
        "worker_switch_interval_s": llm.collective_rpc(_worker_switch_interval),
        "max_num_seqs": vc.scheduler_config.max_num_seqs,
        "max_num_batched_tokens": vc.scheduler_config.max_num_batched_tokens,
        "num_gpu_blocks": vc.cache_config.num_gpu_blocks,
        # what the worker processes actually built (round-robin input buffers per pool)
        "worker_buffer_depth": llm.collective_rpc(_worker_buffer_depth),
        # ... and the largest batch, in tokens, they run as a CUDA graph
        "worker_cuda_graph_max_tokens": llm.collective_rpc(_worker_graph_ceiling),
    }


def timed_part(llm: Any, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """One timed ``llm.generate`` (``ignore_eos``, temperature 1) after
    ``reset_prefix_cache``, with NVML sampling and per-thread CPU time."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=1.0)
    requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    llm.reset_prefix_cache()
    allocator_before = llm.collective_rpc(_worker_allocator_stats)
    sampler = UtilSampler()
    sampler.start()
    threads = ThreadCpu()
    gate = os.environ.get("ASYNCBATCH_STACK_SAMPLES_GATE")
    if gate:  # the engine's stack samplers count from here ...
        Path(gate).touch()
    t1 = time.perf_counter()
    res = llm.generate(requests, params, use_tqdm=False)
    elapsed = time.perf_counter() - t1
    if gate:  # ... to here
        Path(gate).unlink()
    out: dict[str, Any] = {"host_threads": threads.busiest()}
    util = sampler.stop()
    # allocator activity during the timed call, per worker
    out["worker_allocator"] = [
        {k: after[k] - before[k] if k.startswith("num_") else after[k] for k in after}
        for before, after in zip(allocator_before,
                                 llm.collective_rpc(_worker_allocator_stats), strict=True)]
    n_out = sum(len(r.outputs[0].token_ids) for r in res)
    n_in = sum(len(r.prompt_token_ids or ()) for r in res)
    # the first and last 10% of samples are ramp-up and tail
    k = len(util) // 10
    steady = util[k:len(util) - k] or util
    out.update(elapsed_s=elapsed, output_tok_s=n_out / elapsed,
               total_tok_s=(n_in + n_out) / elapsed, num_output_tokens=n_out,
               nvml_util_mean=statistics.fmean(util) if util else None,
               nvml_util_steady=statistics.fmean(steady) if steady else None,
               nvml_samples=len(util))
    return out


def warm_up(llm: Any) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    rng = random.Random(12345)
    llm.generate([TokensPrompt(prompt_token_ids=[rng.randrange(100, 30000) for _ in range(512)])
                  for _ in range(16)], SamplingParams(max_tokens=8, ignore_eos=True),
                 use_tqdm=False)


def parity_tokens(llm: Any) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    pp, mt = parity_prompts()
    res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in pp],
                       [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True)
                        for m in mt], use_tqdm=False)
    return [list(r.outputs[0].token_ids) for r in res]


def make_llm(spec: dict[str, Any]) -> tuple[Any, float]:
    sys.path.insert(0, str(ROOT / "plugin"))
    # collective_rpc of a local function (the buffer-depth probe) goes by pickle
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    from vllm import LLM

    args = engine_args(spec["variant"])
    if spec.get("gpu_memory_utilization"):
        args["gpu_memory_utilization"] = spec["gpu_memory_utilization"]
    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], tokenizer=spec["model"], load_format="dummy", **args)
    return llm, time.perf_counter() - t0


def child(spec: dict[str, Any]) -> dict[str, Any]:
    llm, startup_s = make_llm(spec)
    out = engine_info(llm, spec["variant"], startup_s)
    if spec["num_prompts"]:
        workload = {"kind": "random", "num_prompts": spec["num_prompts"],
                    "input_len": spec["input_len"], "output_len": spec["output_len"]}
        prompts, max_tokens = workload_prompts(workload, 0)
        warm_up(llm)
        out.update(timed_part(llm, prompts, max_tokens))
    out["parity_tokens"] = parity_tokens(llm)
    return out


def _write_atomic(path: Path, doc: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)


def resident_child(spec: dict[str, Any]) -> None:
    """Start one engine, write its `engine_info` and parity tokens to
    ``spec["ready"]``, then run one timed part per line of stdin (JSON: workload,
    seed, result path) until a line ``{"quit": true}`` or the end of stdin."""
    llm, startup_s = make_llm(spec)
    info = engine_info(llm, spec["variant"], startup_s)
    info["parity_tokens"] = parity_tokens(llm)
    warm_up(llm)
    _write_atomic(Path(spec["ready"]), info)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        prompts, max_tokens = workload_prompts(cmd["workload"], cmd["seed"])
        _write_atomic(Path(cmd["result"]), timed_part(llm, prompts, max_tokens))


def site_pythonpath() -> str:
    """A PYTHONPATH with which every process of a run imports
    ``benchmarks/stack_sampling/sitecustomize.py`` (and the plugin)."""
    return os.pathsep.join([str(ROOT / "benchmarks/stack_sampling"), str(ROOT / "plugin"),
                            os.environ.get("PYTHONPATH", "")])


def switch_interval_env(variant: str, env: dict[str, str]) -> dict[str, str]:
    """``env`` with the ``~swN`` suffix's switch interval for every process of the
    engine (through ``benchmarks/stack_sampling/sitecustomize.py``)."""
    interval = switch_interval_us(variant)
    if interval is None:
        return env
    return {**env, "ASYNCBATCH_SWITCH_INTERVAL_US": str(interval),
            "PYTHONPATH": site_pythonpath()}


def serve_command(spec_path: Path) -> list[str]:
    """The command line of one resident engine process."""
    return [sys.executable, __file__, "--serve", str(spec_path)]


class Resident:
    """The parent's handle on one `resident_child` process."""

    def __init__(self, variant: str, spec: dict[str, Any], log: Path, env: dict[str, str]):
        self.variant, self.log = variant, log
        self.info: dict[str, Any] = {}
        self.ready = Path(spec["ready"])
        self.ready.unlink(missing_ok=True)
        self.spec_path = log.with_suffix(".spec.json")
        self.spec_path.write_text(json.dumps(spec))
        self._log = open(log, "w")  # noqa: SIM115 (closed in close())
        # its own session: close() can end vLLM's engine processes with it
        self.proc = subprocess.Popen(
            serve_command(self.spec_path), stdin=subprocess.PIPE, stdout=self._log,
            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)

    def _tail(self) -> str:
        self._log.flush()
        return "".join(self.log.read_text().splitlines(True)[-40:])

    def _wait_file(self, path: Path, timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not path.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.variant}: engine process exited (rc "
                                   f"{self.proc.returncode}) during {what}; log {self.log}:\n"
                                   f"{self._tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.variant}: {what} took over {timeout:g} s; log "
                                   f"{self.log}:\n{self._tail()}")
            time.sleep(0.2)
        doc = json.loads(path.read_text())
        path.unlink()
        return doc

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        self.info = self._wait_file(self.ready, timeout, "engine start")
        return self.info

    def run(self, workload: dict[str, Any], seed: int, result: Path,
            timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        result.unlink(missing_ok=True)
        try:
            self.proc.stdin.write(json.dumps({"workload": workload, "seed": seed,
                                              "result": str(result)}) + "\n")
            self.proc.stdin.flush()
        except OSError as e:  # the engine process is gone (broken pipe)
            self.proc.wait(timeout=30)
            raise RuntimeError(f"{self.variant}: engine process exited (rc "
                               f"{self.proc.returncode}) while idle ({e}); log {self.log}:\n"
                               f"{self._tail()}") from None
        try:
            return self._wait_file(result, timeout, "a timed part")
        finally:
            result.unlink(missing_ok=True)  # a part that timed out may still write it

    def close(self, timeout: float = 120) -> None:
        """Ask the engine to quit; after ``timeout`` s, kill its whole session
        (the engine core and worker processes vLLM started, which hold GPU
        memory)."""
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.close()
            self.proc.wait(timeout=timeout)
        except (OSError, subprocess.TimeoutExpired):
            from asyncbatch.bench import procs

            procs.kill_group(self.proc, grace_s=0)
        finally:
            self._log.close()
            self.spec_path.unlink(missing_ok=True)


def split_variants(text: str, variants: list[str]) -> tuple[str, list[str]]:
    """``WORKLOAD[@v1,v2,...]``: the workload and the variants that run it (default:
    all of ``variants``; ratios are against the first)."""
    workload, sep, names = text.partition("@")
    if not sep:
        return workload, variants
    subset = names.split(",")
    unknown = [v for v in subset if v not in variants]
    if unknown or len(set(subset)) != len(subset) or not all(subset):
        raise SystemExit(f"--workload {text!r}: the variants after @ must be distinct and "
                         f"among --variants ({', '.join(variants)})")
    return workload, subset


def run_resident(a: argparse.Namespace, model: str, variants: list[str],
                 workloads: list[tuple[dict[str, Any], list[str]]], stamp: str) -> int:
    """``--resident``: one engine per variant for the whole command (see the module
    docstring); one result file per workload (run by its own list of variants),
    written after every timed part."""
    util = a.gpu_memory_utilization or round(0.88 / len(variants), 3)
    engines: dict[str, Resident] = {}
    kinds = [w["kind"] for w, _ in workloads]
    failed = False
    try:
        for v in variants:  # one after the other: each sizes its KV cache with the
            # earlier ones resident
            log = a.out / f"engine-{stamp}-{v}.log"
            spec = {"model": model, "variant": v, "gpu_memory_utilization": util,
                    "ready": str(a.out / f".ready-{stamp}-{v}.json")}
            engines[v] = Resident(v, spec, log, switch_interval_env(v, {**os.environ}))
            info = engines[v].wait_ready(a.timeout)
            print(f"{v}: engine up in {info['startup_s']:.0f} s, {info['num_gpu_blocks']} KV "
                  f"blocks, CUDA graphs up to {info['worker_cuda_graph_max_tokens']} tokens",
                  flush=True)
        for n, (workload, names) in enumerate(workloads):
            plan = abba_plan(names, a.repeats, a.repeat_offset)
            # one file per workload: the kind, and its position where a kind repeats
            name = workload["kind"] + (f"{n}" if kinds.count(workload["kind"]) > 1 else "")
            path = a.out / f"worker-ab-{a.shape}-{name}-resident-{stamp}.json"
            runs: list[dict[str, Any]] = []
            for i, (v, k) in enumerate(plan):
                t0 = time.perf_counter()
                r = engines[v].run(workload, k, a.out / f".part-{stamp}.json", a.timeout)
                r = {**engines[v].info, **r, "order": i, "repeat": k, "sync_check": False,
                     "wall_s": time.perf_counter() - t0}
                runs.append(r)
                write_result(path, a, names, runs, complete=False, workload=workload)
                print(f"[{workload['kind']} {i}] {v} (part {k}): {r['output_tok_s']:,.0f} out "
                      f"tok/s in {r['elapsed_s']:.1f} s, NVML {r['nvml_util_steady']:.0f}%",
                      flush=True)
            doc = write_result(path, a, names, runs, complete=True, workload=workload)
            failed |= report(doc, a, path)
    finally:
        for engine in engines.values():
            engine.close()
    return 1 if failed else 0


def abba_plan(variants: list[str], repeats: int, offset: int) -> list[tuple[str, int]]:
    """``(variant, repeat)`` in A B B A order (`asyncbatch.bench.stats.abba_order`)."""
    sys.path.insert(0, str(ROOT / "plugin"))
    from asyncbatch.bench.stats import abba_order

    return abba_order(variants, repeats, offset)


def report(doc: dict[str, Any], a: argparse.Namespace, path: Path) -> bool:
    """Print a finished result file's summary; True when parity failed."""
    print(json.dumps(doc["summary"], indent=1))
    mismatches = doc["parity_mismatches"]
    print("parity:", "identical" if not mismatches else f"MISMATCH {mismatches}")
    if doc["short_runs"]:
        print(f"WARNING: {len(doc['short_runs'])} timed run(s) lasted less than "
              f"{a.min_timed_s:g} s ({doc['short_runs']}): too short to resolve a 2% "
              "difference on a host-bound shape; raise --num-prompts")
    print("wrote", path)
    return bool(mismatches)


def plot_result(path: Path) -> Path:
    """A PNG of one result file: each timed run's output tok/s and NVML busy share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.loads(path.read_text())
    runs = [r for r in result["runs"] if not r.get("sync_check")]
    labels = [f"{i}: {r['variant']}" for i, r in enumerate(runs)]
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    colors = {v: f"C{i}" for i, v in enumerate(variants)}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((ax1, "output_tok_s", "output tok/s (higher is better)"),
                           (ax2, "nvml_util_steady", "GPU busy, NVML % (steady part)")):
        ax.bar(labels, [r.get(key) or 0 for r in runs],
               color=[colors[r["variant"]] for r in runs])
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"worker A/B, {result.get('shape')}, {result.get('gpu')} "
                 f"(runs in order)", fontsize=11)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--shape", default="llama-1b", choices=["llama-1b", "llama-8b"])
    ap.add_argument("--variants", default="async,async+cg1024,depth3")
    ap.add_argument("--repeats", type=int, default=None,
                    help="runs per variant, A B B A (default 2; 6 with --long)")
    ap.add_argument("--num-prompts", type=int, default=None,
                    help="prompts per timed run (default 1000; 6000 with --long)")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--sync-check", action="store_true")
    ap.add_argument("--long", action="store_true",
                    help="runs long enough to see a 2%% difference on a host-bound shape: "
                         "6 repeats, 6000 prompts per timed run, and every timed part "
                         "checked to last --min-timed-s 30 s or more (an explicit "
                         "--repeats/--num-prompts wins)")
    ap.add_argument("--min-timed-s", type=float, default=None,
                    help="flag (\"short_runs\" in the result, and a warning) every timed run "
                         "shorter than this many seconds (default: none; 30 with --long)")
    ap.add_argument("--repeat-offset", type=int, default=0,
                    help="start the A B B A order at this repeat, to continue a run split "
                         "over several commands (pool the files with --pool)")
    ap.add_argument("--resident", action="store_true",
                    help="one engine per variant, started once; the timed parts alternate "
                         "between them (see the module docstring)")
    ap.add_argument("--workload", action="append", metavar="NAME[:k=v,...]",
                    help="with --resident: random (default) or prefix[:groups=G,size=S,"
                         "prefix=P,suffix=X,out=O], repeatable, one result file each; a "
                         "suffix @v1,v2 runs it on those of --variants only")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None,
                    help="with --resident: each engine's share of GPU memory (default "
                         "0.88 / number of variants)")
    ap.add_argument("--stacks", action="store_true",
                    help="sample the main thread's stack of every engine process during the "
                         "timed run (asyncbatch/bench/stacks.py); adds a little host load")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/worker")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--pool", type=Path, nargs="+", metavar="FILE",
                    help="run nothing: pool the timed runs of these result files (same "
                         "shape and workload) and print each variant's median, range, NVML "
                         "range and ratio against the first of --variants")
    ap.add_argument("--plot", type=Path, nargs="+", metavar="FILE",
                    help="run nothing: write FILE.png beside each result file (output "
                         "tok/s and NVML busy share of every timed run, in run order)")
    a = ap.parse_args()
    for name in ("repeats", "num_prompts"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.long:
        a.repeats = a.repeats or 6
        a.num_prompts = a.num_prompts or 6000
        a.min_timed_s = 30.0 if a.min_timed_s is None else a.min_timed_s
    a.repeats = a.repeats or 2
    a.num_prompts = a.num_prompts or 1000
    if a.repeat_offset < 0:
        ap.error("--repeat-offset must be >= 0")
    if a.gpu_memory_utilization is not None and not 0 < a.gpu_memory_utilization <= 1:
        ap.error(f"--gpu-memory-utilization must be in (0, 1], got {a.gpu_memory_utilization}")
    if a.plot or a.pool:
        try:
            if a.plot:
                for file in a.plot:
                    print(plot_result(file))
            else:
                print(format_pool(pool_results(a.pool, a.variants.split(",")[0])))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"worker_ab: not a readable result file: "
                             f"{type(e).__name__}: {e}") from None
        except ImportError as e:
            raise SystemExit(f"worker_ab: --plot needs matplotlib ({e})") from None
        return 0
    if a.serve:
        resident_child(json.loads(a.serve.read_text()))
        return 0
    if a.child:
        spec = json.loads(a.child.read_text())
        result = child(spec)
        Path(spec["result"]).write_text(json.dumps(result))
        return 0

    variants = a.variants.split(",")
    # every variant known before any engine starts
    if len(set(variants)) < len(variants) or not all(variants):
        ap.error(f"--variants must name each variant once: {a.variants!r}")
    for v in variants:
        try:
            engine_args(v)
            switch_interval_us(v)
        except (SystemExit, ValueError) as e:
            ap.error(str(e) if isinstance(e, SystemExit) else f"unknown variant {v!r}")

    sys.path.insert(0, str(ROOT / "plugin"))
    from asyncbatch.bench.models import resolve_model
    model = resolve_model(f"dummy:{a.shape}")
    a.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if a.resident:
        if a.sync_check or a.stacks:
            ap.error("--resident runs timed parts only: no --sync-check or --stacks")
        workloads = []
        for text in a.workload or ["random"]:
            name, names = split_variants(text, variants)
            workloads.append((parse_workload(name, a), names))
        try:
            return run_resident(a, model.path, variants, workloads, stamp)
        except RuntimeError as e:  # an engine died or hung: its log's tail is in the message
            print(f"error: {e}", file=sys.stderr)
            return 1
    if a.workload or a.gpu_memory_utilization:
        ap.error("--workload and --gpu-memory-utilization need --resident")
    plan = run_plan(variants, a.repeats, a.repeat_offset, a.sync_check)
    runs: list[dict[str, Any]] = []
    path = a.out / f"worker-ab-{a.shape}-{stamp}.json"
    for i, (variant, env) in enumerate(plan):
        spec_path = a.out / f".spec-{stamp}-{i}.json"
        res_path = a.out / f".res-{stamp}-{i}.json"
        sync = bool(env)
        spec = {"model": model.path, "variant": variant, "result": str(res_path),
                "num_prompts": 0 if sync else a.num_prompts, "input_len": a.input_len,
                "output_len": a.output_len}
        spec_path.write_text(json.dumps(spec))
        log = a.out / f"run-{stamp}-{i:02d}-{variant}{'-synccheck' if sync else ''}.log"
        t0 = time.perf_counter()
        child_env = {**os.environ, **env}
        stacks_dir = a.out / f"stacks-{stamp}-{i:02d}-{variant}"
        site = False
        if a.stacks and not sync:
            stacks_dir.mkdir(parents=True, exist_ok=True)
            child_env.update(ASYNCBATCH_STACK_SAMPLES=str(stacks_dir),
                             ASYNCBATCH_STACK_SAMPLES_GATE=str(stacks_dir / "gate"))
            site = True
        if switch_interval_us(variant) is not None:
            child_env = switch_interval_env(variant, child_env)
            site = True
        if site:  # every process of the run imports benchmarks/stack_sampling/sitecustomize
            child_env["PYTHONPATH"] = site_pythonpath()
        try:
            rc = run_child([sys.executable, __file__, "--child", str(spec_path)], log,
                           a.timeout, child_env)
        finally:
            spec_path.unlink(missing_ok=True)
        if rc != 0:
            why = f"timed out after {a.timeout:g} s" if rc is None else f"failed (rc {rc})"
            print(f"run {i} {variant} {why}; log {log}:")
            print("".join(log.read_text().splitlines(True)[-40:]))
            if runs:
                write_result(path, a, variants, runs, complete=False)
                print("wrote the finished runs to", path)
            return 1
        r = json.loads(res_path.read_text())
        res_path.unlink()
        if a.stacks and not sync:
            from asyncbatch.bench.stacks import summarize

            r["stacks"] = summarize(stacks_dir)
        r.update(order=i, sync_check=sync, wall_s=time.perf_counter() - t0)
        runs.append(r)
        write_result(path, a, variants, runs, complete=False)
        tps = r.get("output_tok_s")
        print(f"[{i}] {variant}{' (sync check)' if sync else ''}: "
              + (f"{tps:,.0f} out tok/s, NVML {r['nvml_util_steady']:.0f}%, "
                 if tps else "") + f"worker buffers {r['worker_buffer_depth']}, CUDA graphs up to "
              f"{r['worker_cuda_graph_max_tokens']} tokens", flush=True)
        for row in r.get("worker_allocator", []):
            print(f"    worker allocator during the timed call: {row['num_alloc_retries']} "
                  f"retries (cache emptied), {row['num_device_alloc']} cudaMalloc, "
                  f"{row['num_device_free']} cudaFree", flush=True)
        for row in r.get("host_threads", [])[:4]:
            print(f"    {row['process']} (pid {row['pid']}): {row['total_pct']:.0f}% CPU, "
                  f"busiest threads {row['busiest_threads_pct']}", flush=True)
        for row in r.get("stacks", []):
            print(f"    {row['process']}: {row['samples']} stack samples; leaf "
                  + ", ".join(f"{k} {v}%" for k, v in list(row["leaf_pct"].items())[:6]),
                  flush=True)

    doc = write_result(path, a, variants, runs, complete=True)
    return 1 if report(doc, a, path) else 0


def pool_results(paths: list[Path], baseline: str) -> dict[str, Any]:
    """The timed runs (no sync-check runs) of several result files, by variant: the
    median output tok/s over all of them, the range, the NVML range, and the ratio of
    medians against ``baseline``.  The files must share shape and workload."""
    resolved = [Path(p).resolve() for p in paths]
    if len(set(resolved)) < len(resolved):
        raise SystemExit("the same file given twice: its runs would count twice")
    docs = [json.loads(Path(p).read_text()) for p in paths]
    for p, d in zip(paths, docs, strict=True):
        if d.get("parity_mismatches"):
            raise SystemExit(f"{p}: greedy outputs differed from the baseline's "
                             f"({d['parity_mismatches']}): not pooled")
        if d.get("complete") is False:
            print(f"note: {p} is incomplete (stopped part way); its finished runs are pooled",
                  file=sys.stderr)
    keys = {(d["shape"], json.dumps(d["workload"], sort_keys=True)) for d in docs}
    if len(keys) > 1:
        raise SystemExit("cannot pool files of different shapes or workloads (a resident "
                         f"file's workload also names its kind): {sorted(keys)}")
    stats = variant_stats([r for d in docs for r in d["runs"]])
    if baseline not in stats:
        raise SystemExit(f"no timed run of {baseline!r} in these files "
                         f"(variants: {', '.join(stats)})")
    base = stats[baseline]["output_tok_s_median"]
    rows = {v: {"runs": st["runs"], "output_tok_s_median": st["output_tok_s_median"],
                "output_tok_s_range": st["output_tok_s_range"],
                "nvml_util_steady_range": st["nvml_util_steady_range"],
                "ratio_vs_baseline": st["output_tok_s_median"] / base}
            for v, st in stats.items()}
    return {"files": [str(p) for p in paths], "baseline": baseline, "variants": rows}


def variant_stats(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per variant, in order of first appearance, over its timed runs (sync-check
    runs time nothing): run count, median and range of output tok/s, median and
    range of NVML utilization (None without samples)."""
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        if not r.get("sync_check") and r.get("output_tok_s"):
            by_variant.setdefault(r["variant"], []).append(r)
    stats = {}
    for v, xs in by_variant.items():
        tps = [r["output_tok_s"] for r in xs]
        util = [r["nvml_util_steady"] for r in xs if r.get("nvml_util_steady") is not None]
        stats[v] = {"runs": len(xs), "output_tok_s_median": statistics.median(tps),
                    "output_tok_s_range": [min(tps), max(tps)],
                    "nvml_util_steady_median": statistics.median(util) if util else None,
                    "nvml_util_steady_range": [min(util), max(util)] if util else None}
    return stats


def format_pool(pooled: dict[str, Any]) -> str:
    lines = [f"pooled {len(pooled['files'])} files; ratios against {pooled['baseline']}",
             "| variant | runs | output tok/s median (range) | NVML % | ratio |",
             "| --- | --- | --- | --- | --- |"]
    for v, r in pooled["variants"].items():
        lo, hi = r["output_tok_s_range"]
        nv = r["nvml_util_steady_range"]
        util = f"{nv[0]:.0f}-{nv[1]:.0f}" if nv else "-"
        lines.append(f"| {v} | {r['runs']} | {r['output_tok_s_median']:,.0f} "
                     f"({lo:,.0f}..{hi:,.0f}) | {util} | {r['ratio_vs_baseline']:.3f} |")
    return "\n".join(lines)


def run_child(cmd: list[str], log: Path, timeout_s: float, env: dict[str, str]) -> int | None:
    """Run one fresh-engine run in its own session, output to ``log``: its exit
    code, or None when it ran past ``timeout_s`` (then the whole session, the
    engine's processes included, is killed)."""
    from asyncbatch.bench import procs

    log.write_text("")  # procs.start appends; one log per run
    proc = procs.start(cmd, log, env=env)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        procs.kill_group(proc)
        return None


def run_plan(variants: list[str], repeats: int, offset: int = 0, sync_check: bool = False
             ) -> list[tuple[str, dict[str, str]]]:
    """(variant, extra environment) per run: A B B A order over ``repeats`` repeats
    starting at repeat ``offset`` (so that a run split over several commands keeps
    alternating), then the sync-check run of the last variant if asked."""
    plan: list[tuple[str, dict[str, str]]] = [
        (v, {}) for v, _ in abba_plan(variants, repeats, offset)]
    if sync_check:
        plan.append((variants[-1], {"VLLM_GPU_SYNC_CHECK": "error"}))
    return plan


def short_runs(runs: list[dict[str, Any]], min_timed_s: float | None) -> list[str]:
    """``order-variant`` of each timed run whose timed part lasted less than
    ``min_timed_s`` (none when it is None)."""
    if not min_timed_s:
        return []
    return [f"{r['order']}-{r['variant']}" for r in runs
            if not r.get("sync_check") and r.get("elapsed_s", math.inf) < min_timed_s]


def write_result(path: Path, a: argparse.Namespace, variants: list[str],
                 runs: list[dict[str, Any]], *, complete: bool,
                 workload: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write what the runs so far measured; called after every run, so a command cut
    short (a machine taken back, a failed run) keeps its finished runs
    (``"complete": false``)."""
    ref = next((r["parity_tokens"] for r in runs if r["variant"] == variants[0]), None)
    mismatches = {}
    for r in runs if ref is not None else ():
        bad = [j for j, (x, y) in enumerate(zip(ref, r["parity_tokens"], strict=True))
               if x != y]
        if bad:
            mismatches[f"{r['order']}-{r['variant']}"] = bad
    stats = variant_stats(runs)
    summary: dict[str, Any] = {
        v: {k: stats[v][k] for k in ("runs", "output_tok_s_median", "output_tok_s_range",
                                     "nvml_util_steady_median")}
        for v in variants if v in stats}
    if variants[0] in summary:
        base = summary[variants[0]]["output_tok_s_median"]
        for row in summary.values():
            row["ratio_vs_" + variants[0]] = row["output_tok_s_median"] / base
    import torch

    from asyncbatch.bench.report import detect_cpu

    doc = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
           "gpu": torch.cuda.get_device_name(0), "host": platform.node(),
           "cpu": detect_cpu(), "cpu_count": os.cpu_count(),
           "shape": a.shape,
           "workload": workload if workload is not None else {
               "num_prompts": a.num_prompts, "input_len": a.input_len,
               "output_len": a.output_len},
           "resident": workload is not None,
           "complete": complete, "summary": summary, "parity_mismatches": mismatches,
           "min_timed_s": getattr(a, "min_timed_s", None),
           "repeat_offset": getattr(a, "repeat_offset", 0),
           "short_runs": short_runs(runs, getattr(a, "min_timed_s", None)),
           "runs": [{k: v for k, v in r.items() if k != "parity_tokens"} for r in runs]}
    path.write_text(json.dumps(doc, indent=1))
    return doc

if __name__ == "__main__":
    sys.exit(main())

# SPDX-License-Identifier: Apache-2.0
"""Data-parallel A/B: prefix routing against vLLM's own balancing, on ``vllm serve
--data-parallel-size 2`` (dummy weights, loopback, no internet needed).

    python3 benchmarks/dp_ab.py --model dummy:llama-8b --out benchmarks/results/dp
    python3 benchmarks/dp_ab.py --quick --out /tmp/dp-smoke      # a smoke test

A series too long for one command splits into parts that continue its order,
then merges (a part that was stopped leaves ``runs-partial.json``, with the
settings its runs were made with; a later command into the same ``--out`` moves
it to ``runs-partial-<time>.json``).  ``--merge`` refuses files made with
different settings (model shape, server arguments, ...) and a run found in two
files::

    python3 benchmarks/dp_ab.py --repeats 1 --out /tmp/dp-a
    python3 benchmarks/dp_ab.py --repeats 1 --repeat-offset 1 --out /tmp/dp-b
    python3 benchmarks/dp_ab.py --merge /tmp/dp-a/results.json /tmp/dp-b/results.json \
        --out benchmarks/results/dp

Variants, in A B C D D C B A order; ``hash-header`` is a client of the stock
server (one server for both, their runs alternating per workload), so a repeat
starts three servers:

- ``stock``: vLLM's scheduler, vLLM's balancing (lowest load, rotating ties);
- ``asyncbatch``: ``--scheduler-cls asyncbatch.Scheduler``, ``dp_routing`` "auto"
  (prefix routing on);
- ``asyncbatch-norouting``: the same scheduler with ``dp_routing`` "off";
- ``hash-header``: stock server; the client sends ``X-data-parallel-rank:
  hash(prefix) % N`` (perfect affinity, no load bound: the upper bound on
  affinity, not a balancer).

Each server serves, after a short warm-up, each workload at each rate with the
prefix cache emptied before every run:

- ``prefix``: ``--groups`` groups x ``--members`` requests, each group sharing a
  ``--prefix-len``-token prefix (2048), ``--suffix-len`` own tokens, interleaved
  arrival (shuffled), at every ``--rates`` entry (``inf``: all at once =
  saturation);
- ``random``: as many independent prompts of the same length, at the rates in
  ``--random-rates``;
- ``hot``: one group is half the requests, the rest spread over ``--groups``
  groups, at ``--hot-rates``.

Each run records the client's view (throughput, TTFT and end-to-end latency
p50/p99 from streamed ``/v1/completions``) and each engine's view from the
server's Prometheus ``/metrics`` (``engine="0"``/``"1"``): requests finished,
prompt tokens, prefix-cache queries and hits (tokens), generated tokens,
preemptions, and the time-averaged running + waiting requests sampled every
0.5 s (``Config.sample_s``).  ``results.json``, ``summary.md`` and ``summary.png`` go to ``--out``.

The asyncbatch variants need asyncbatch's ``vllm.general_plugins`` entry point in
the server's Python (that is what installs the routing hook in the API server);
when asyncbatch is only on ``PYTHONPATH`` (not pip-installed), the driver puts an
entry-point record for it on the servers' ``PYTHONPATH``.  Each asyncbatch server's
log must say that routing is on (``asyncbatch``) or off (``-norouting``), else the
run stops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import random
import re
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "plugin") not in sys.path:
    sys.path.insert(0, str(ROOT / "plugin"))

from asyncbatch.bench import procs  # noqa: E402
from asyncbatch.bench.models import ModelSpec, resolve_model  # noqa: E402
from asyncbatch.bench.offline import BenchError  # noqa: E402
from asyncbatch.bench.online import (  # noqa: E402
    HOST,
    VLLM_CLI,
    free_port,
    reset_prefix_cache,
    running_server,
)
from asyncbatch.bench.stats import abba_order  # noqa: E402
from asyncbatch.bench.workloads import (  # noqa: E402
    PrefixSharedWorkload,
    RandomWorkload,
    random_tokens,
)
from asyncbatch.dp.routing import (  # noqa: E402
    DEFAULT_KEY_SHARE,
    DEFAULT_LOAD_BOUND,
    DEFAULT_LOAD_SLACK,
    DEFAULT_NEW_KEY_SLACK,
    DEFAULT_PREFIX_TOKENS,
)

VARIANTS = ("stock", "asyncbatch", "asyncbatch-norouting", "hash-header")
# --replay only: asyncbatch's routing without the seat check (which the first GPU
# runs, benchmarks/results/dp-h200, did not have), without the key share, and
# without the new-key slack (what the GPU runs of dp-h200-kv had)
REPLAY_VARIANTS = (*VARIANTS, "asyncbatch-noseats", "asyncbatch-noshare",
                   "asyncbatch-nonewkey")
BASELINE = "stock"
ROUTING_ON = "data-parallel prefix routing on"
ROUTING_OFF = "data-parallel prefix routing off"
# Prometheus counters read per engine, before and after every run
COUNTERS = {
    "vllm:request_success_total": "requests",
    "vllm:prompt_tokens_total": "prompt_tokens",
    "vllm:generation_tokens_total": "generation_tokens",
    "vllm:prefix_cache_queries_total": "prefix_cache_queries",
    "vllm:prefix_cache_hits_total": "prefix_cache_hits",
    "vllm:num_preemptions_total": "preemptions",
}
GAUGES = {"vllm:num_requests_running": "running", "vllm:num_requests_waiting": "waiting"}


# ------------------------------------------------------------------ workloads

@dataclass(frozen=True)
class Req:
    prompt: list[int]
    max_tokens: int
    group: int  # -1: no group


@dataclass(frozen=True)
class Shape:
    groups: int = 64
    members: int = 8
    prefix_len: int = 2048
    suffix_len: int = 128
    output_len: int = 128
    seed: int = 0
    vocab: int = 32000


def prefix_workload(s: Shape) -> list[Req]:
    """`PrefixSharedWorkload` (shuffled), each request tagged with its group."""
    workload = PrefixSharedWorkload(num_groups=s.groups, group_size=s.members,
                                    prefix_len=s.prefix_len, suffix_len=s.suffix_len,
                                    output_len=s.output_len, seed=s.seed)
    # request ids are "g{group}m{member}"
    return [Req(r.prompt_token_ids, r.max_tokens, int(r.request_id[1:].split("m")[0]))
            for r in workload.requests(s.vocab)]


def random_workload(s: Shape) -> list[Req]:
    """`RandomWorkload` of as many prompts, each as long as a prefix request's."""
    workload = RandomWorkload(num_requests=s.groups * s.members,
                              input_len=s.prefix_len + s.suffix_len,
                              output_len=s.output_len, seed=s.seed + 1)
    return [Req(r.prompt_token_ids, r.max_tokens, -1) for r in workload.requests(s.vocab)]


def hot_workload(s: Shape, hot_share: float = 0.5) -> list[Req]:
    """``groups * members`` requests: ``hot_share`` of them share one prefix, the
    rest are spread evenly over ``groups`` other prefixes; shuffled."""
    rng = random.Random(s.seed + 2)
    n = s.groups * s.members
    num_hot = round(n * hot_share)
    prefixes = [random_tokens(rng, s.prefix_len, s.vocab) for _ in range(s.groups + 1)]
    groups = [0] * num_hot + [1 + i % s.groups for i in range(n - num_hot)]
    rng.shuffle(groups)
    return [Req(prefixes[g] + random_tokens(rng, s.suffix_len, s.vocab), s.output_len, g)
            for g in groups]


WORKLOADS: dict[str, Callable[[Shape], list[Req]]] = {
    "prefix": prefix_workload, "random": random_workload, "hot": hot_workload}


def header_rank(prompt: Sequence[int], num_ranks: int, key_tokens: int = 64) -> int:
    """The ``hash-header`` client's rank: a stable hash of the first ``key_tokens``
    tokens, modulo the number of ranks (no load bound)."""
    data = b"".join(t.to_bytes(4, "little") for t in prompt[:key_tokens])
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") % num_ranks


def arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Send times (s from the start): Poisson at ``rate``; all at 0 for ``inf``."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


# ------------------------------------------------------------------ client

@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""


async def _one(session: Any, url: str, model: str, req: Req, headers: dict[str, str],
               timeout_s: float) -> Result:
    import aiohttp

    body = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = None
    out_tokens = 0
    try:
        async with session.post(url, json=body, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                return Result(False, error=f"HTTP {resp.status}: {(await resp.text())[:200]}")
            buffer = b""
            async for chunk in resp.content.iter_any():
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    line = line.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        continue
                    msg = json.loads(data)
                    if msg.get("error"):
                        # vLLM reports an error that happens mid-stream as an event
                        # of an HTTP 200 response, then [DONE]
                        return Result(False, error=f"error event: {str(msg['error'])[:200]}")
                    if msg.get("choices") and ttft is None:
                        ttft = time.perf_counter() - t0
                    usage = msg.get("usage")
                    if usage:
                        out_tokens = int(usage.get("completion_tokens") or 0)
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as e:
        return Result(False, error=f"{type(e).__name__}: {e}")
    latency = time.perf_counter() - t0
    return Result(True, ttft if ttft is not None else latency, latency,
                  out_tokens or req.max_tokens, len(req.prompt))


async def _drive(port: int, model: str, reqs: list[Req], rate: float, *, seed: int,
                 rank_header: int | None, max_concurrency: int | None,
                 timeout_s: float) -> tuple[list[Result], float]:
    import aiohttp

    url = f"http://{HOST}:{port}/v1/completions"
    sem = asyncio.Semaphore(max_concurrency or len(reqs) or 1)
    times = arrivals(len(reqs), rate, seed)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()

        async def send(i: int) -> Result:
            delay = times[i] - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            headers = {}
            if rank_header:
                headers["X-data-parallel-rank"] = str(header_rank(reqs[i].prompt, rank_header))
            async with sem:
                return await _one(session, url, model, reqs[i], headers, timeout_s)

        results = await asyncio.gather(*(send(i) for i in range(len(reqs))))
        return list(results), time.perf_counter() - start


def run_client(port: int, model: str, reqs: list[Req], rate: float, **kw: Any
               ) -> tuple[list[Result], float]:
    return asyncio.run(_drive(port, model, reqs, rate, **kw))


# ------------------------------------------------------------------ metrics

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str, names: dict[str, str]) -> dict[str, dict[str, float]]:
    """``{engine: {short name: value}}`` of the named series in Prometheus text,
    summed over the other labels (``engine`` "" when a series has none).  A
    gauge reported by several API server processes (a ``pid`` label) counts
    once per engine: the largest."""
    out: dict[str, dict[str, float]] = {}
    per_pid: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m or m.group(1) not in names:
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        engine = labels.get("engine", "")
        short = names[m.group(1)]
        if "pid" in labels:
            key = (engine, short)
            per_pid[key] = max(per_pid.get(key, 0.0), value)
            continue
        out.setdefault(engine, {})
        out[engine][short] = out[engine].get(short, 0.0) + value
    for (engine, short), value in per_pid.items():
        out.setdefault(engine, {})[short] = value
    return out


def scrape(port: int, names: dict[str, str]) -> dict[str, dict[str, float]]:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as r:
            return parse_metrics(r.read().decode(), names)
    except (urllib.error.URLError, OSError):
        return {}


def gpu_utilization_reader(num_gpus: int) -> Callable[[], list[float]] | None:
    """NVML busy % of the GPUs of data-parallel ranks ``0..num_gpus-1`` (the
    devices ``CUDA_VISIBLE_DEVICES`` names, in order, else devices 0..), or None
    without NVML.  NVML numbers devices in PCI bus order, CUDA by default fastest
    first; on a host of identical GPUs (the case here) the two agree, elsewhere
    set ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` for the servers."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    try:
        indices = ([int(x) for x in visible.split(",")][:num_gpus] if visible
                   else list(range(num_gpus)))
        import pynvml

        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        if len(handles) < num_gpus:
            return None

        def read() -> list[float]:
            return [float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu) for h in handles]

        read()
        return read
    except Exception:  # no NVML, no such device, or CUDA_VISIBLE_DEVICES by UUID
        return None


class GaugeSampler:
    """Samples running/waiting per engine every ``period_s`` in a thread, and the
    engines' GPUs' NVML busy % where ``gpu_reader`` is given."""

    def __init__(self, port: int, period_s: float,
                 gpu_reader: Callable[[], list[float]] | None = None) -> None:
        self.port, self.period_s = port, period_s
        self.samples: list[dict[str, dict[str, float]]] = []
        self.gpu_reader = gpu_reader
        self.gpu_samples: list[list[float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            sample = scrape(self.port, GAUGES)
            if sample:
                self.samples.append(sample)
            if self.gpu_reader is not None:
                with contextlib.suppress(Exception):
                    self.gpu_samples.append(self.gpu_reader())

    def mean_gpu_busy(self) -> dict[str, float]:
        """Per engine (rank = GPU): mean NVML busy % over the samples."""
        if not self.gpu_samples:
            return {}
        n = len(self.gpu_samples[0])
        return {str(i): sum(s[i] for s in self.gpu_samples) / len(self.gpu_samples)
                for i in range(n)}

    def __enter__(self) -> GaugeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def mean_load(self) -> dict[str, float]:
        """Per engine: mean of running + waiting over the samples."""
        sums: dict[str, float] = {}
        for sample in self.samples:
            for engine, values in sample.items():
                sums[engine] = sums.get(engine, 0.0) + values.get("running", 0.0) + values.get(
                    "waiting", 0.0)
        return {e: v / len(self.samples) for e, v in sums.items()} if self.samples else {}


def engine_deltas(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
                  ) -> dict[str, dict[str, float]]:
    out = {}
    for engine in sorted(set(before) | set(after)):
        if engine == "":
            continue
        a, b = after.get(engine, {}), before.get(engine, {})
        out[engine] = engine_record({k: a.get(k, 0.0) - b.get(k, 0.0)
                                     for k in COUNTERS.values()})
    return out


def engine_record(counters: dict[str, float]) -> dict[str, float]:
    """One engine's counters of a run (`COUNTERS`' short names) with the figures
    derived from them: prompt tokens computed (not from the prefix cache), all
    tokens computed, and the hit rate."""
    d = dict(counters)
    d["computed_prompt_tokens"] = d["prompt_tokens"] - d["prefix_cache_hits"]
    d["computed_tokens"] = d["computed_prompt_tokens"] + d["generation_tokens"]
    d["hit_rate"] = (d["prefix_cache_hits"] / d["prefix_cache_queries"]
                     if d["prefix_cache_queries"] else 0.0)
    return d


def imbalance(values: Sequence[float]) -> float:
    """max / min over engines (inf if an engine got nothing while another did)."""
    values = list(values)
    if not values or max(values) == 0:
        return 1.0
    return max(values) / min(values) if min(values) > 0 else math.inf


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def run_record(results: list[Result], duration: float, engines: dict[str, dict[str, float]],
               mean_load: dict[str, float]) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    return {
        "num_requests": len(results), "completed": len(ok),
        "errors": [r.error for r in results if not r.ok][:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration else 0.0,
        "ttft_p50_ms": 1000 * percentile([r.ttft for r in ok], 50),
        "ttft_p99_ms": 1000 * percentile([r.ttft for r in ok], 99),
        "latency_p50_ms": 1000 * percentile([r.latency for r in ok], 50),
        "latency_p99_ms": 1000 * percentile([r.latency for r in ok], 99),
        "engines": engines,
        "engine_mean_load": mean_load,
        "prefix_cache_hits": sum(e["prefix_cache_hits"] for e in engines.values()),
        "prefix_cache_queries": sum(e["prefix_cache_queries"] for e in engines.values()),
        "computed_prompt_tokens": sum(e["computed_prompt_tokens"] for e in engines.values()),
        "imbalance_requests": imbalance([e["requests"] for e in engines.values()]),
        "imbalance_computed_tokens": imbalance(
            [e["computed_tokens"] for e in engines.values()]),
        "imbalance_mean_load": imbalance(list(mean_load.values())),
    }


# ------------------------------------------------------------------ servers

@dataclass
class Config:
    model: ModelSpec
    out: Path
    dp: int = 2
    shape: Shape = field(default_factory=Shape)
    rates: list[float] = field(default_factory=lambda: [8.0, 16.0, math.inf])
    random_rates: list[float] = field(default_factory=lambda: [math.inf])
    hot_rates: list[float] = field(default_factory=lambda: [16.0, math.inf])
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    repeats: int = 2
    repeat_offset: int = 0
    max_concurrency: int | None = None
    max_num_seqs: int = 256
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.9
    api_server_count: int | None = None
    enforce_eager: bool = False
    extra_serve_args: list[str] = field(default_factory=list)
    sample_s: float = 0.5
    health_timeout_s: float = 1200.0
    request_timeout_s: float = 1800.0
    warmup_requests: int = 16
    # seconds to wait before a run (the DP coordinator's counts settle) and after
    # it (the last engine stats reach /metrics)
    settle_s: float = 1.0

    def plan(self) -> list[tuple[str, float]]:
        return ([("prefix", r) for r in self.rates] + [("random", r) for r in self.random_rates]
                + [("hot", r) for r in self.hot_rates])


def plugin_env(work_dir: Path) -> dict[str, str]:
    """Environment of the servers: asyncbatch importable and its entry point
    visible (an entry-point record on PYTHONPATH when asyncbatch is not installed)."""
    from importlib import metadata

    paths = [str(ROOT / "plugin")]
    installed = any(ep.value == "asyncbatch:register"
                    for ep in metadata.entry_points(group="vllm.general_plugins"))
    if not installed:
        record = work_dir / "entry-point" / "asyncbatch_dp_ab-0.0.dist-info"
        record.mkdir(parents=True, exist_ok=True)
        (record / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: asyncbatch-dp-ab\nVersion: 0.0\n")
        (record / "entry_points.txt").write_text(
            "[vllm.general_plugins]\nasyncbatch = asyncbatch:register\n")
        paths.append(str(record.parent))
    old = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths + ([old] if old else [])),
            "VLLM_NO_USAGE_STATS": "1"}


def serve_cmd(cfg: Config, variant: str, port: int) -> list[str]:
    cmd = [*VLLM_CLI, "serve", cfg.model.path, "--host", HOST, "--port", str(port),
           "--tokenizer", cfg.model.path, "--load-format", cfg.model.load_format,
           "--data-parallel-size", str(cfg.dp), "--max-num-seqs", str(cfg.max_num_seqs),
           "--max-model-len", str(cfg.max_model_len), "--block-size", "16",
           "--enable-prefix-caching", "--gpu-memory-utilization",
           str(cfg.gpu_memory_utilization), "--seed", "0", "--disable-uvicorn-access-log"]
    if cfg.api_server_count is not None:
        cmd += ["--api-server-count", str(cfg.api_server_count)]
    if cfg.enforce_eager:
        cmd.append("--enforce-eager")
    if variant.startswith("asyncbatch"):
        routing = "off" if variant == "asyncbatch-norouting" else "auto"
        cmd += ["--scheduler-cls", "asyncbatch.Scheduler", "--additional-config",
                json.dumps({"asyncbatch": {"dp_routing": routing}})]
    return cmd + cfg.extra_serve_args


def check_routing_log(variant: str, log_path: Path) -> str:
    """The asyncbatch servers' log says routing is on (off for -norouting)."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    on, off = ROUTING_ON in text, ROUTING_OFF in text
    if variant == "asyncbatch" and not on:
        raise BenchError(f"{variant}: the server log {log_path} does not say "
                         f"{ROUTING_ON!r}; is asyncbatch's vllm.general_plugins entry point "
                         "visible to the server?")
    if variant == "asyncbatch-norouting" and (on or not off):
        raise BenchError(f"{variant}: the server log {log_path} should say {ROUTING_OFF!r}")
    return "on" if on else ("off" if off else "stock")


# The server each variant runs on: hash-header is a client of the stock server.
SERVER_OF = {"hash-header": "stock"}


def server_sessions(variants: Sequence[str], repeats: int, offset: int = 0
                    ) -> tuple[list[tuple[str, int]], list[tuple[str, int, list[str]]]]:
    """The run order of the variants, and the servers to start for it: variants
    that share a server (`SERVER_OF`) run on one, one after the other for each
    workload, in alternating order across repeats.  Returns ``(variant, repeat)``
    in run order and ``(server kind, repeat, variants)`` per server started.
    ``offset`` continues a series: repeats ``offset .. offset + repeats - 1``
    of the same alternating order (a series split over several commands)."""
    kinds = list(dict.fromkeys(SERVER_OF.get(v, v) for v in variants))
    order: list[tuple[str, int]] = []
    sessions: list[tuple[str, int, list[str]]] = []
    for kind, k in abba_order(kinds, repeats, offset):
        clients = [v for v in variants if SERVER_OF.get(v, v) == kind]
        if k % 2:
            clients.reverse()
        sessions.append((kind, k, clients))
        order += [(v, k) for v in clients]
    return order, sessions


def run_all(cfg: Config, *, server_cmd: Callable[[str, int], list[str]] | None = None,
            env: dict[str, str] | None = None, progress: Callable[[str], None] = print
            ) -> dict[str, Any]:
    cfg.out.mkdir(parents=True, exist_ok=True)
    work = cfg.out / "work"
    work.mkdir(exist_ok=True)
    earlier = cfg.out / "runs-partial.json"
    if earlier.exists():  # a stopped command's runs: kept for --merge, not overwritten
        kept = cfg.out / time.strftime("runs-partial-%Y%m%d-%H%M%S.json",
                                       time.localtime(earlier.stat().st_mtime))
        earlier.rename(kept)
        progress(f"kept the runs of an earlier command in {kept}")
    env = env if env is not None else plugin_env(work)
    unknown = [v for v in cfg.variants if v not in VARIANTS]
    if unknown:
        raise BenchError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)} "
                         f"({', '.join(sorted(set(REPLAY_VARIANTS) - set(VARIANTS)))} only "
                         "with --replay)")
    workloads = {name: make(cfg.shape) for name, make in WORKLOADS.items()}
    warmup = random_workload(Shape(groups=1, members=cfg.warmup_requests, prefix_len=64,
                                   suffix_len=16, output_len=8, seed=99,
                                   vocab=cfg.shape.vocab))
    order, sessions = server_sessions(cfg.variants, cfg.repeats, cfg.repeat_offset)
    record = config_record(cfg, order)
    gpu_reader = gpu_utilization_reader(cfg.dp) if server_cmd is None else None
    runs: list[dict[str, Any]] = []
    for i, (kind, k, clients) in enumerate(sessions):
        port = free_port()
        cmd = server_cmd(kind, port) if server_cmd else serve_cmd(cfg, kind, port)
        log = work / f"server{i:02d}-{kind}-{k}.log"
        progress(f"[{i + 1}/{len(sessions)}] starting {' + '.join(clients)} (repeat {k + 1})")
        t0 = time.monotonic()
        with running_server_env(cmd, port, log, cfg.health_timeout_s, env) as startup_s:
            if cfg.warmup_requests:
                done, _ = run_client(port, cfg.model.path, warmup, math.inf, seed=0,
                                     rank_header=None, max_concurrency=None,
                                     timeout_s=cfg.request_timeout_s)
                failed = [r.error for r in done if not r.ok]
                if failed:
                    raise BenchError(f"{kind}: {len(failed)} of {len(done)} warm-up requests "
                                     f"failed, first: {failed[0]} (server log {log})")
            routing = check_routing_log(kind, log) if server_cmd is None else "n/a"
            for name, rate in cfg.plan():
                reqs = workloads[name]
                for variant in clients:
                    reset_prefix_cache(port)
                    time.sleep(cfg.settle_s)  # the coordinator's counts settle
                    before = scrape(port, COUNTERS)
                    with GaugeSampler(port, cfg.sample_s, gpu_reader) as sampler:
                        results, duration = run_client(
                            port, cfg.model.path, reqs, rate, seed=k * 1000 + 7,
                            rank_header=cfg.dp if variant == "hash-header" else None,
                            max_concurrency=cfg.max_concurrency,
                            timeout_s=cfg.request_timeout_s)
                    time.sleep(cfg.settle_s)  # the last stats reach /metrics
                    after = scrape(port, COUNTERS)
                    rec = run_record(results, duration, engine_deltas(before, after),
                                     sampler.mean_load())
                    gpu_busy = sampler.mean_gpu_busy()
                    rec["gpu_busy_pct"] = gpu_busy
                    rec["imbalance_gpu_busy"] = (imbalance(list(gpu_busy.values()))
                                                 if gpu_busy else math.nan)
                    rec.update(variant=variant, server=kind, repeat=k, order=i, workload=name,
                               rate=rate, startup_s=startup_s, routing=routing)
                    runs.append(rec)
                    progress(f"  {variant} {name}@{rate:g}: {rec['completed']}/"
                             f"{rec['num_requests']} done, "
                             f"{rec['request_throughput']:.2f} req/s, TTFT p50 "
                             f"{rec['ttft_p50_ms']:.0f} ms, hits "
                             f"{rec['prefix_cache_hits']:.0f}/{rec['prefix_cache_queries']:.0f}, "
                             f"imbalance {rec['imbalance_requests']:.2f}")
                    # what --merge needs of a stopped command: its runs and their settings
                    (cfg.out / "runs-partial.json").write_text(json.dumps(
                        {"config": record, "runs": runs}, indent=1, default=_json_default))
        progress(f"  server {kind} done in {time.monotonic() - t0:.0f} s")
    result = {"config": record, "runs": runs, "summary": summarize(runs, cfg.variants)}
    write_outputs(result, cfg.out)
    return result


# ------------------------------------------------------------------ replay

@dataclass(frozen=True)
class ReplaySettings:
    """The simulated engines of ``--replay`` (`asyncbatch.sim.dp`)."""

    num_kv_blocks: int = 56_057  # 896,912 tokens: an H200's KV cache at 8B, 0.9 utilization
    max_num_batched_tokens: int = 8192
    calibration: str | None = None  # default: asyncbatch.bench.replay's
    publish_s: float = 0.1
    # API servers, each its own front end (None: the config's api_server_count, else
    # vLLM's default for one node, one per engine)
    api_servers: int | None = None
    # seconds over which requests sent at once reach the servers (asyncbatch.sim.dp)
    burst_s: float = 0.0


def replay_route(variant: str, cfg: Config, client_count: int = 1,
                 client_index: int = 0) -> Any:
    """The front end of one API server of ``variant`` (the ``client_index``-th of
    ``client_count``): the installed vLLM's own data-parallel client, with
    asyncbatch's routing hook for the routed variants."""
    from asyncbatch.dp.frontend import Router
    from asyncbatch.sim import dp as sim_dp

    def client(**kw: Any) -> Any:
        return sim_dp.VllmFrontEnd(cfg.dp, client_count=client_count,
                                   client_index=client_index, **kw)

    if variant in ("stock", "asyncbatch-norouting"):
        return client()
    if variant == "hash-header":
        return client(rank_of=lambda prompt: header_rank(prompt, cfg.dp))
    return client(router=Router(
        block_size=16, prefix_tokens=DEFAULT_PREFIX_TOKENS, load_bound=DEFAULT_LOAD_BOUND,
        seats=None if variant == "asyncbatch-noseats" else cfg.max_num_seqs,
        slack=DEFAULT_LOAD_SLACK,
        key_share=1.0 if variant == "asyncbatch-noshare" else DEFAULT_KEY_SHARE,
        new_key_slack=None if variant == "asyncbatch-nonewkey" else DEFAULT_NEW_KEY_SLACK))


def replay_api_servers(cfg: Config, settings: ReplaySettings) -> int:
    """API servers of the replay: as set, else the GPU runs' (vLLM's default: one per
    local engine)."""
    n = settings.api_servers or cfg.api_server_count or cfg.dp
    if n < 1:
        raise BenchError(f"the replay needs at least one API server, got {n}")
    return n


def replay_all(cfg: Config, settings: ReplaySettings, *,
               progress: Callable[[str], None] = print) -> dict[str, Any]:
    """The same A/B on CPU: each variant's scheduler (vLLM's or asyncbatch's, the
    real classes) on ``cfg.dp`` simulated engines behind its front end's routing,
    step times from a calibrated cost model (`asyncbatch.sim.dp`).  SIMULATED:
    deterministic, one run per point; per-engine hits are the prompt tokens the
    prefix cache held at each request's admission."""
    from asyncbatch.bench.replay import VARIANTS as ENGINES
    from asyncbatch.bench.replay import load_cost_model, replay_model_dir
    from asyncbatch.bench.variants import variant_settings
    from asyncbatch.sim import dp as sim_dp

    unknown = [v for v in cfg.variants if v not in REPLAY_VARIANTS]
    if unknown:
        raise BenchError(f"unknown variant(s) {unknown}; choose from "
                         f"{', '.join(REPLAY_VARIANTS)}")
    try:
        cost_model, cost_path = load_cost_model(settings.calibration)
    except (OSError, ValueError) as e:
        raise BenchError(f"cost model: {e}") from e
    model_dir = replay_model_dir()
    workloads = {name: make(cfg.shape) for name, make in WORKLOADS.items()}
    servers = replay_api_servers(cfg, settings)
    runs: list[dict[str, Any]] = []
    for n, (variant, (name, rate)) in enumerate(
            (v, point) for point in cfg.plan() for v in cfg.variants):
        reqs = workloads[name]
        times = arrivals(len(reqs), rate, 7)
        arrival_list = [sim_dp.Arrival(t, f"{name}-{j}", r.prompt, r.max_tokens)
                        for j, (t, r) in enumerate(zip(times, reqs, strict=True))]
        asyncbatch = variant.startswith("asyncbatch")
        additional = ({"asyncbatch": variant_settings("asyncbatch", None)}
                      if asyncbatch else None)
        t0 = time.monotonic()
        sim = sim_dp.simulate(
            arrival_list, [replay_route(variant, cfg, servers, c) for c in range(servers)],
            num_engines=cfg.dp,
            scheduler_cls=ENGINES["asyncbatch" if asyncbatch else "async"]["scheduler_cls"],
            cost_model=cost_model, model_dir=model_dir, num_blocks=settings.num_kv_blocks,
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            max_model_len=cfg.max_model_len, additional_config=additional,
            publish_s=settings.publish_s, burst_s=settings.burst_s)
        results = []
        for a, r in zip(arrival_list, reqs, strict=True):
            rt = sim.requests[a.request_id]
            results.append(Result(True, (rt.first_token_s or 0.0) - rt.arrival_s,
                                  (rt.finish_s or 0.0) - rt.arrival_s, rt.output_tokens,
                                  len(r.prompt)))
        engines = {
            str(e): {**engine_record({
                "requests": float(c.requests), "prompt_tokens": float(c.prompt_tokens),
                "generation_tokens": float(c.generation_tokens),
                "prefix_cache_queries": float(c.prompt_tokens),
                "prefix_cache_hits": float(c.cached_prompt_tokens),
                "preemptions": float(c.preemptions)}),
                "gpu_busy_s": c.busy_s, "max_running": float(c.max_running)}
            for e, c in enumerate(sim.engines)}
        rec = run_record(results, sim.duration_s, engines,
                         {str(e): v for e, v in enumerate(sim.mean_load)})
        rec["imbalance_gpu_busy"] = imbalance([c.busy_s for c in sim.engines])
        rec.update(variant=variant, server=variant, repeat=0, order=n, workload=name,
                   rate=rate, startup_s=0.0, routing="simulated", simulated=True,
                   replay_cpu_s=time.monotonic() - t0)
        runs.append(rec)
        progress(f"  {variant} {name}@{rate:g}: {rec['request_throughput']:.2f} req/s "
                 f"(simulated), TTFT p50 {rec['ttft_p50_ms']:.0f} ms, computed prompt "
                 f"{rec['computed_prompt_tokens']:.0f}, requests per engine "
                 f"{[int(e['requests']) for e in engines.values()]}, max running "
                 f"{[int(e['max_running']) for e in engines.values()]} "
                 f"({rec['replay_cpu_s']:.0f} s)")
    order = [(v, 0) for v in cfg.variants]
    config = {**config_record(cfg, order), "replay": {**asdict(settings),
                                                      "calibration": cost_path,
                                                      "api_servers": servers}}
    # what the replay does not use: one deterministic run per point, no server
    config.update(serve_args={}, repeats=1, repeat_offset=0, extra_serve_args=[],
                  gpu_memory_utilization=None, max_concurrency=None,
                  model={"path": str(model_dir), "shape": None, "dummy": True,
                         "load_format": "simulated"})
    result = {"config": config, "runs": runs, "summary": summarize(runs, cfg.variants)}
    write_outputs(result, cfg.out)
    return result


def write_outputs(result: dict[str, Any], out: Path) -> None:
    """``results.json``, ``summary.md`` and (with matplotlib) ``summary.png``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1, default=_json_default))
    (out / "summary.md").write_text(summary_markdown(result))
    with contextlib.suppress(ImportError):
        plot(result, out / "summary.png")


def load_runs(paths: Sequence[Path], configs: list[dict[str, Any]] | None = None
              ) -> list[dict[str, Any]]:
    """The runs recorded in each file (a ``results.json`` or a ``runs-partial.json``
    left by a run that was stopped), each tagged with its ``source`` file (kept
    where an earlier merge set it).  The ``config`` each file recorded (every
    ``results.json``, and ``runs-partial.json`` since it carries one) is appended
    to ``configs``."""
    runs: list[dict[str, Any]] = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise BenchError(f"cannot read runs from {path}: {e}") from e
        found = data.get("runs") if isinstance(data, dict) else data
        if not isinstance(found, list) or not found or not all(
                isinstance(r, dict) and {"variant", "workload", "rate", "repeat"} <= set(r)
                for r in found):
            raise BenchError(f"{path}: no dp_ab runs in it (expected results.json or "
                             "runs-partial.json)")
        if configs is not None and isinstance(data, dict) and isinstance(
                data.get("config"), dict):
            configs.append(data["config"])
        source = f"{Path(path).parent.name}/{Path(path).name}"
        for r in found:
            try:
                rate = float(r["rate"])
                int(r["repeat"])
            except (TypeError, ValueError):
                raise BenchError(f"{path}: a run with rate {r['rate']!r} and repeat "
                                 f"{r['repeat']!r}") from None
            if r["workload"] not in WORKLOADS or r["variant"] not in REPLAY_VARIANTS or \
                    not rate > 0:
                raise BenchError(f"{path}: a run of unknown variant, workload or rate: "
                                 f"{r['variant']!r} {r['workload']!r}@{r['rate']!r}")
            runs.append({**r, "rate": rate, "source": r.get("source", source)})
    return runs


# The settings that make runs comparable: runs made with different ones do not merge
# (the model by its shape and load format, not by where its folder was).
MERGE_KEYS = ("model", "dp", "shape", "max_num_seqs", "max_model_len", "gpu_memory_utilization",
              "max_concurrency", "api_server_count", "enforce_eager", "extra_serve_args",
              "replay")


def _merge_view(config: dict[str, Any], key: str) -> str:
    value = config[key]
    if key == "model" and isinstance(value, dict):
        value = {k: v for k, v in value.items() if k != "path"}
    return json.dumps(value, sort_keys=True, default=str)


def merge(cfg: Config, paths: Sequence[Path]) -> dict[str, Any]:
    """One result from the runs of several commands (a series split over
    commands, or a run stopped part way): the summary compares variants only
    where they ran, and says where they ran in different sources.  The files'
    recorded settings (`MERGE_KEYS`) must agree; files without any (older
    ``runs-partial.json``) take the command line's."""
    resolved = [Path(p).resolve() for p in paths]
    twice = sorted({str(p) for p in resolved if resolved.count(p) > 1})
    if twice:
        raise BenchError(f"the same file given twice: {', '.join(twice)}")
    configs: list[dict[str, Any]] = []
    runs = load_runs(paths, configs)
    for key in MERGE_KEYS:
        seen = [_merge_view(c, key) for c in configs if key in c]
        if len(set(seen)) > 1:
            raise BenchError(f"cannot merge runs made with different {key!r}: "
                             f"{' vs '.join(dict.fromkeys(seen))}")
    # one run in two files (a results.json and the runs-partial.json of the same
    # command, or a repeat made twice) would count twice in the medians
    source_of: dict[tuple[str, int, str, float], str] = {}
    for r in runs:
        point = (r["variant"], int(r["repeat"]), r["workload"], r["rate"])
        first = source_of.setdefault(point, r["source"])
        if first != r["source"]:
            raise BenchError(f"{point[0]} {point[2]}@{_rate(point[3])} repeat {point[1]} is "
                             f"in both {first} and {r['source']}: merge each run once "
                             "(a series' parts continue with --repeat-offset)")
    simulated = {bool(r.get("simulated")) for r in runs}
    if len(simulated) > 1:
        raise BenchError("cannot merge --replay runs (simulated) with GPU runs")
    variants = [v for v in REPLAY_VARIANTS if any(r["variant"] == v for r in runs)]
    order = list(dict.fromkeys((r["variant"], int(r["repeat"])) for r in runs))
    # the configuration the runs were made with, where a results.json recorded it
    repeats = sorted({k for _, k in order})
    config = {**(configs[0] if configs else config_record(cfg, order)), "order": order,
              "variants": variants, "repeats": len(repeats),
              "repeat_offset": repeats[0] if repeats else 0,
              "merged_from": [str(p) for p in paths]}
    if simulated == {True} and "replay" not in config:
        config["replay"] = next((c["replay"] for c in configs if "replay" in c),
                                {"calibration": "?", "num_kv_blocks": "?", "publish_s": "?"})
    result = {"config": config, "runs": runs, "summary": summarize(runs, variants)}
    write_outputs(result, cfg.out)
    return result


@contextlib.contextmanager
def running_server_env(cmd: list[str], port: int, log: Path, timeout_s: float,
                       env: dict[str, str]) -> Any:
    old = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        with running_server(cmd, port=port, log_path=log, health_timeout_s=timeout_s) as s:
            os.environ.clear()
            os.environ.update(old)
            yield s
    finally:
        os.environ.clear()
        os.environ.update(old)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return str(value)


def config_record(cfg: Config, order: list[tuple[str, int]]) -> dict[str, Any]:
    return {"model": {**asdict(cfg.model), "load_format": cfg.model.load_format},
            "dp": cfg.dp, "shape": asdict(cfg.shape),
            "rates": [str(r) for r in cfg.rates],
            "random_rates": [str(r) for r in cfg.random_rates],
            "hot_rates": [str(r) for r in cfg.hot_rates], "variants": cfg.variants,
            "repeats": cfg.repeats, "repeat_offset": cfg.repeat_offset, "order": order,
            "max_concurrency": cfg.max_concurrency,
            "max_num_seqs": cfg.max_num_seqs, "max_model_len": cfg.max_model_len,
            "gpu_memory_utilization": cfg.gpu_memory_utilization,
            "api_server_count": cfg.api_server_count, "enforce_eager": cfg.enforce_eager,
            "extra_serve_args": cfg.extra_serve_args,
            "serve_args": {v: serve_cmd(cfg, v, 0)[len(VLLM_CLI):] for v in cfg.variants}}


# ------------------------------------------------------------------ summary

METRICS = ("request_throughput", "output_throughput", "ttft_p50_ms", "ttft_p99_ms",
           "prefix_cache_hits", "computed_prompt_tokens", "imbalance_requests",
           "imbalance_computed_tokens", "imbalance_mean_load", "imbalance_gpu_busy")


def summarize(runs: list[dict[str, Any]], variants: list[str]) -> dict[str, Any]:
    """Per (workload, rate): each variant's medians over repeats, its ratios to
    ``stock``, and the acceptance checks."""
    out: dict[str, Any] = {}
    keys = sorted({(r["workload"], r["rate"]) for r in runs},
                  key=lambda x: (list(WORKLOADS).index(x[0]), x[1]))
    for workload, rate in keys:
        section: dict[str, Any] = {}
        for v in variants:
            rs = [r for r in runs if r["workload"] == workload and r["rate"] == rate
                  and r["variant"] == v]
            if not rs:
                continue
            # NaN where a run did not record a metric (GPU busy time without NVML,
            # runs of older files): the median of the runs that did
            section[v] = {m: _median([float(r.get(m, math.nan)) for r in rs])
                          for m in METRICS}
            section[v]["n"] = len(rs)
            section[v]["sources"] = sorted({str(r.get("source", "")) for r in rs})
            section[v]["throughput_range"] = [min(r["request_throughput"] for r in rs),
                                              max(r["request_throughput"] for r in rs)]
            section[v]["per_engine_hits"] = [
                {e: d["prefix_cache_hits"] for e, d in sorted(r["engines"].items())}
                for r in rs]
        base = section.get(BASELINE)
        for s in section.values():
            if base and base["request_throughput"]:
                s["throughput_vs_stock"] = s["request_throughput"] / base["request_throughput"]
        out[f"{workload}@{_rate(rate)}"] = section
    out["checks"] = checks(out)
    incomplete = [f"{r['variant']} {r['workload']}@{_rate(r['rate'])} repeat {r['repeat']}"
                  for r in runs if r["completed"] < r["num_requests"]]
    out["checks"]["every request completed"] = {
        "value": float(len(incomplete)), "pass": not incomplete, "runs": incomplete}
    return out


def _median(values: list[float]) -> float:
    present = [v for v in values if not math.isnan(v)]
    return statistics.median(present) if present else math.nan


def _rate(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def checks(summary: dict[str, Any]) -> dict[str, Any]:
    """The issue's acceptance checks, for the ``asyncbatch`` variant."""
    result: dict[str, Any] = {}
    for key, section in summary.items():
        a = section.get("asyncbatch") if isinstance(section, dict) else None
        if not a:
            continue
        if key.startswith("random@") and "throughput_vs_stock" in a:
            result[f"{key} throughput >= 0.98x stock"] = {
                "value": a["throughput_vs_stock"], "pass": a["throughput_vs_stock"] >= 0.98}
        if key.startswith("hot@"):
            # busier = GPU busy time (NVML on GPUs, the cost model in --replay); where
            # it was not sampled, the larger of requests and tokens computed
            busy = a.get("imbalance_gpu_busy", math.nan)
            if not math.isnan(busy):
                result[f"{key} busiest engine <= 1.3x (GPU busy)"] = {
                    "value": busy, "pass": busy <= 1.3}
            else:
                worst = max(a["imbalance_requests"], a["imbalance_computed_tokens"])
                result[f"{key} busiest engine <= 1.3x (requests, tokens computed)"] = {
                    "value": worst, "pass": worst <= 1.3}
        if key.startswith("prefix@") and "stock" in section:
            result[f"{key} prefix-cache hits vs stock"] = {
                "value": (a["prefix_cache_hits"] / section["stock"]["prefix_cache_hits"]
                          if section["stock"]["prefix_cache_hits"] else math.inf),
                "pass": a["prefix_cache_hits"] >= section["stock"]["prefix_cache_hits"]}
    return result


def summary_markdown(result: dict[str, Any]) -> str:
    cfg, summary = result["config"], result["summary"]
    replay = cfg.get("replay")
    lines = [
        "# Data-parallel A/B: prefix routing vs vLLM's balancing"
        + (" (SIMULATED)" if replay else ""), ""]
    if replay:
        lines += [
            f"SIMULATED: the real schedulers on {cfg['dp']} simulated engines "
            f"(`asyncbatch.sim.dp`), step times from `{Path(replay['calibration']).name}`, "
            f"{replay['num_kv_blocks']} KV blocks per engine, coordinator updates every "
            f"{replay['publish_s']} s.", ""]
    model = (f"Model `{cfg['model']['path']}` ({cfg['model']['load_format']} weights)"
             if not replay else "The schedulers' model folder "
             f"`{Path(cfg['model']['path']).name}` (no weights: the engines are simulated)")
    lines += [
        f"{model}, data-parallel size {cfg['dp']}, variants in order "
        f"{' '.join(v for v, _ in cfg['order'])}; workload shape {cfg['shape']}.",
        "Medians over repeats; throughput range in brackets; TTFT in ms; hits and computed "
        "prompt tokens summed over engines; imbalance = busiest / least busy engine "
        "(requests finished, tokens computed, mean running + waiting, and GPU busy time "
        "where sampled: NVML, or the cost model's in a replay).", ""]
    for key, section in summary.items():
        if key == "checks":
            continue
        lines += [f"## {key}", "",
                  "| variant | req/s | vs stock | out tok/s | TTFT p50 | TTFT p99 | hits | "
                  "computed prompt | imbalance req / tok / load (/ GPU busy) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for v, s in section.items():
            lo, hi = s["throughput_range"]
            lines.append(
                f"| {v} | {s['request_throughput']:.2f} [{lo:.2f}..{hi:.2f}] | "
                f"{s.get('throughput_vs_stock', float('nan')):.3f} | "
                f"{s['output_throughput']:.0f} | {s['ttft_p50_ms']:.0f} | "
                f"{s['ttft_p99_ms']:.0f} | {s['prefix_cache_hits']:.0f} | "
                f"{s['computed_prompt_tokens']:.0f} | {s['imbalance_requests']:.2f} / "
                f"{s['imbalance_computed_tokens']:.2f} / {s['imbalance_mean_load']:.2f}"
                + ("" if math.isnan(s.get("imbalance_gpu_busy", math.nan))
                   else f" / {s['imbalance_gpu_busy']:.2f}") + " |")
        sources = {tuple(s.get("sources", ())) for s in section.values()}
        if len(sources) > 1:
            lines += ["", "Variants measured in different commands (separate server starts, "
                      "possibly on another machine): " + "; ".join(
                          f"{v}: {', '.join(s.get('sources', ()))}" for v, s in section.items())]
        lines.append("")
    lines += ["## Checks (asyncbatch)", ""]
    for name, c in summary["checks"].items():
        lines.append(f"- {name}: {c['value']:.3f} -> {'pass' if c['pass'] else 'FAIL'}")
    return "\n".join(lines) + "\n"


def _panel_value(row: dict[str, Any], metric: str) -> float:
    """``row[metric]``; for the GPU busy imbalance where GPU busy time was not
    sampled (NaN), the larger of the request and computed-token imbalances, as
    the hot-prefix check reads it."""
    value = row.get(metric, math.nan)
    if metric == "imbalance_gpu_busy" and (value is None or math.isnan(value)):
        value = max(row.get("imbalance_requests", math.nan),
                    row.get("imbalance_computed_tokens", math.nan))
    return math.nan if value is None else float(value)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = {k: v for k, v in result["summary"].items() if k != "checks"}
    keys = list(summary)
    variants = result["config"]["variants"]
    panels = [("request_throughput", "requests/s"), ("ttft_p50_ms", "TTFT p50 (ms)"),
              ("ttft_p99_ms", "TTFT p99 (ms)"), ("prefix_cache_hits", "prefix-cache hit tokens"),
              ("imbalance_gpu_busy", "busiest/least engine\n(GPU busy, else requests\n"
                                     "or tokens computed)")]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 1.6 * len(keys)), 3 * len(panels)))
    width = 0.8 / max(1, len(variants))
    for ax, (metric, label) in zip(axes, panels, strict=True):
        for j, v in enumerate(variants):
            ys = [_panel_value(summary[k].get(v, {}), metric) for k in keys]
            ax.bar([i + j * width for i in range(len(keys))], ys, width, label=v)
        ax.set_ylabel(label)
        ax.set_xticks([i + width * (len(variants) - 1) / 2 for i in range(len(keys))])
        ax.set_xticklabels(keys, fontsize=8)
        if metric == "imbalance_gpu_busy":  # the hot-prefix check's limit
            ax.axhline(1.3, color="k", lw=0.8, ls="--")
    handles, labels = axes[0].get_legend_handles_labels()
    rows = -(-len(variants) // 4)
    fig.legend(handles, labels, loc="upper center", ncol=min(4, len(variants)), fontsize=8,
               bbox_to_anchor=(0.5, 1.0 - 0.4 / fig.get_figheight()))
    fig.suptitle(("SIMULATED " if result["config"].get("replay") else "")
                 + f"data parallel {result['config']['dp']}: "
                 f"{Path(result['config']['model']['path']).name}", y=0.999)
    # room at the top for the title and the legend's rows
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.45 + 0.22 * rows) / fig.get_figheight()))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------ CLI

def _rates(text: str) -> list[float]:
    """A comma-separated list of request rates: numbers > 0, or ``inf`` (all at once)."""
    rates = []
    for x in (x.strip() for x in text.split(",")):
        if not x:
            continue
        try:
            rate = float(x)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a request rate: {x!r}") from None
        if not rate > 0:  # also NaN
            raise argparse.ArgumentTypeError(f"a request rate must be > 0 or inf, got {x!r}")
        rates.append(rate)
    return rates


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dummy:llama-8b",
                   help="dummy:SHAPE (config + tokenizer written locally, dummy weights) or "
                        "a local model folder (default dummy:llama-8b)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/dp")
    p.add_argument("--dp", type=int, default=2, help="--data-parallel-size (default 2)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--repeats", type=int, default=2,
                   help="servers per variant, in alternating order (default 2: A B C D D C B A)")
    p.add_argument("--groups", type=int, default=64)
    p.add_argument("--members", type=int, default=8)
    p.add_argument("--prefix-len", type=int, default=2048)
    p.add_argument("--suffix-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--rates", type=_rates, default=[8.0, 16.0, math.inf],
                   help="prefix workload request rates, req/s; inf = all at once "
                        "(default 8,16,inf)")
    p.add_argument("--random-rates", type=_rates, default=[math.inf])
    p.add_argument("--hot-rates", type=_rates, default=[16.0, math.inf])
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--api-server-count", type=int, default=None,
                   help="vLLM's default: one per data-parallel rank")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--serve-arg", action="append", default=[],
                   help="extra vllm serve argument (repeatable), e.g. "
                        "--serve-arg=--kv-cache-dtype=fp8")
    p.add_argument("--repeat-offset", type=int, default=0,
                   help="continue an alternating series started by an earlier command: "
                        "run repeats K .. K + --repeats - 1 of it (default 0)")
    p.add_argument("--merge", type=Path, nargs="+", metavar="RUNS_JSON",
                   help="start no server: summarize the runs in these files (results.json "
                        "or runs-partial.json of earlier commands) into --out")
    p.add_argument("--replay", action="store_true",
                   help="no GPU: the same A/B with the real schedulers on simulated engines "
                        "(asyncbatch.sim.dp); SIMULATED numbers")
    p.add_argument("--replay-kv-blocks", type=int, default=ReplaySettings.num_kv_blocks,
                   help="--replay: KV blocks of 16 tokens per engine (default %(default)s, "
                        "an H200 at 8B; smaller puts the engines under KV pressure)")
    p.add_argument("--replay-burst-s", type=float, default=0.0,
                   help="--replay: requests sent at once reach the API servers evenly over "
                        "this many seconds (default 0: all at the same instant); the "
                        "coordinator publishes new counts during the burst every 0.1 s")
    p.add_argument("--calibration", default=None,
                   help="--replay: cost model JSON (default: the replay's h100-llama-8b)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny model shape, 4 groups x 4 members of 256-token "
                        "prefixes, one rate and saturation, one server per variant, eager")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.repeat_offset < 0:
        p.error("--repeats must be >= 1 and --repeat-offset >= 0")
    if args.replay_burst_s < 0 or not math.isfinite(args.replay_burst_s):
        p.error(f"--replay-burst-s must be a finite number >= 0, got {args.replay_burst_s}")
    if args.merge and (args.replay or args.quick):
        p.error("--merge summarizes runs already made: no --replay or --quick with it")
    if not args.merge and not args.quick and not (
            args.rates or args.random_rates or args.hot_rates):
        p.error("nothing to run: --rates, --random-rates and --hot-rates are all empty")
    if args.repeat_offset and (args.replay or args.quick):
        p.error("--repeat-offset continues a GPU series: not with --replay (deterministic, "
                "one run) or --quick (one repeat)")
    return args


def config_from_args(args: argparse.Namespace) -> Config:
    if args.quick:
        model = resolve_model("dummy:tiny" if args.model == "dummy:llama-8b" else args.model)
        shape = Shape(groups=4, members=4, prefix_len=256, suffix_len=32, output_len=16,
                      vocab=1000)
        return Config(model=model, out=args.out, dp=args.dp, shape=shape, rates=[8.0, math.inf],
                      random_rates=[math.inf], hot_rates=[math.inf],
                      variants=args.variants.split(","), repeats=1, max_num_seqs=64,
                      max_model_len=1024, gpu_memory_utilization=0.3,
                      api_server_count=args.api_server_count, enforce_eager=True,
                      extra_serve_args=args.serve_arg, warmup_requests=4)
    model = resolve_model(args.model)
    vocab = 1000 if model.shape == "tiny" else 32000
    shape = Shape(groups=args.groups, members=args.members, prefix_len=args.prefix_len,
                  suffix_len=args.suffix_len, output_len=args.output_len, vocab=vocab)
    return Config(model=model, out=args.out, dp=args.dp, shape=shape, rates=args.rates,
                  random_rates=args.random_rates, hot_rates=args.hot_rates,
                  variants=args.variants.split(","), repeats=args.repeats,
                  repeat_offset=args.repeat_offset, max_concurrency=args.max_concurrency,
                  max_num_seqs=args.max_num_seqs,
                  max_model_len=args.max_model_len,
                  gpu_memory_utilization=args.gpu_memory_utilization,
                  api_server_count=args.api_server_count, enforce_eager=args.enforce_eager,
                  extra_serve_args=args.serve_arg)


def main(argv: list[str] | None = None) -> int:
    from asyncbatch.bench.models import ModelError

    args = parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ModelError as e:
        print(f"dp_ab: {e}", file=sys.stderr)
        return 2
    with procs.sigterm_raises():
        try:
            if args.merge:
                result = merge(cfg, args.merge)
            elif args.replay:
                result = replay_all(cfg, ReplaySettings(num_kv_blocks=args.replay_kv_blocks,
                                                        calibration=args.calibration,
                                                        burst_s=args.replay_burst_s))
            else:
                result = run_all(cfg)
        except BenchError as e:
            print(f"dp_ab: {e}", file=sys.stderr)
            return 1
    print((cfg.out / "summary.md").read_text())
    failed = [k for k, c in result["summary"]["checks"].items() if not c["pass"]]
    print(f"results: {cfg.out / 'results.json'}; {len(failed)} check(s) failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

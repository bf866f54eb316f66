# SPDX-License-Identifier: Apache-2.0
"""Serve soak: `vllm serve` with asyncbatch on loopback under a bounded load of
concurrent streaming clients, a share of which disconnect mid-stream, abort
right after the response starts, send very short requests or bad ones.

Checks, after the load:

- every request is accounted for: clients that read a whole stream (finish
  reason stop/length) <= vllm:request_success_total delta <= those plus the
  clients that disconnected (a disconnect may land after the last token);
- vllm:num_requests_running and vllm:num_requests_waiting are back to 0 and
  vllm:kv_cache_usage_perc to 0 (no KV block held by a finished request);
- bad requests got HTTP 400 and nothing else failed (no 5xx, no broken stream);
- the server is alive (/health) and GPU memory is back near its idle level.

Writes a JSON of the figures under --result-dir and exits non-zero on any
failure; the server's process group is always killed.

    python3 benchmarks/serve_soak.py            # dummy Llama-1B-shaped model
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugin"))

from asyncbatch.bench import procs  # noqa: E402

KINDS = ("full", "short", "disconnect", "abort", "bad")


@dataclass
class ClientResult:
    kind: str
    status: int | None = None
    num_chunks: int = 0
    finish_reason: str | None = None
    # the client closed the stream on purpose
    closed_early: bool = False
    error: str | None = None


@dataclass
class Figures:
    command: str
    server_cmd: list[str]
    num_requests_sent: int = 0
    num_by_kind: dict[str, int] = field(default_factory=dict)
    num_completed: int = 0
    num_disconnected: int = 0
    num_rejected_400: int = 0
    num_unexpected_errors: int = 0
    unexpected_errors: list[str] = field(default_factory=list)
    num_output_chunks: int = 0
    load_s: float = 0.0
    startup_s: float = 0.0
    metrics_before: dict[str, float] = field(default_factory=dict)
    metrics_after: dict[str, float] = field(default_factory=dict)
    num_success_delta: float = 0.0
    num_preemptions_delta: float = 0.0
    gpu_memory_idle_mib: int | None = None
    gpu_memory_after_mib: int | None = None
    server_alive: bool = False
    failures: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpu_memory_mib() -> int | None:
    """Used memory summed over the visible GPUs, or None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    cmd = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        cmd.append(f"--id={visible}")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True)
    except (subprocess.SubprocessError, OSError):
        return None
    return sum(int(x) for x in out.stdout.split())


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
    except OSError:
        return 0, ""


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)")


def read_metrics(base: str) -> dict[str, float]:
    """vLLM's Prometheus samples we check, summed over labels."""
    status, text = http_get(f"{base}/metrics", timeout=10)
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    wanted = ("vllm:request_success_total", "vllm:num_requests_running",
              "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
              "vllm:num_preemptions_total", "vllm:e2e_request_latency_seconds_count")
    out = dict.fromkeys(wanted, 0.0)
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(1) in out:
            out[m.group(1)] += float(m.group(3))
        if m and m.group(1) == "vllm:request_success_total":
            reason = re.search(r'finished_reason="(\w+)"', m.group(2) or "")
            if reason:
                key = f"vllm:request_success_total:{reason.group(1)}"
                out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def wait_healthy(base: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} during start-up")
        if http_get(f"{base}/health", timeout=2)[0] == 200:
            return
        time.sleep(1.0)
    raise RuntimeError(f"server not healthy after {timeout_s:.0f} s")


# --------------------------------------------------------------------- load


def plan_requests(args: argparse.Namespace) -> list[tuple[str, dict]]:
    rng = random.Random(args.seed)
    prefixes = [[rng.randrange(10, 30000) for _ in range(rng.randint(64, 512))]
                for _ in range(8)]
    shares = {"short": args.short_share, "disconnect": args.disconnect_share,
              "abort": args.abort_share, "bad": args.bad_share}
    shares["full"] = 1.0 - sum(shares.values())
    plan = []
    for _ in range(args.num_requests):
        kind = rng.choices(list(shares), weights=list(shares.values()))[0]
        if kind == "short":
            prompt = [rng.randrange(10, 30000) for _ in range(rng.randint(1, 4))]
            body = {"prompt": prompt, "max_tokens": 1}
        elif kind == "bad":
            if rng.random() < 0.5:
                body = {"prompt": [], "max_tokens": 8}
            else:
                prompt = [rng.randrange(10, 30000) for _ in range(args.max_model_len + 8)]
                body = {"prompt": prompt, "max_tokens": 8}
        else:
            prompt = (rng.choice(prefixes) if rng.random() < 0.6 else []) + [
                rng.randrange(10, 30000) for _ in range(rng.randint(1, 256))]
            body = {"prompt": prompt, "max_tokens": rng.randint(1, args.max_tokens)}
        body.update(model=args.served_model_name, stream=True, ignore_eos=True,
                    temperature=0.0)
        plan.append((kind, body))
    return plan


async def one_request(session, url: str, kind: str, body: dict,
                      rng: random.Random) -> ClientResult:
    import aiohttp

    result = ClientResult(kind)
    stop_after = rng.randint(1, 8) if kind == "disconnect" else None
    try:
        async with session.post(url, json=body) as resp:
            result.status = resp.status
            if resp.status != 200:
                await resp.read()
                return result
            if kind == "abort":
                result.closed_early = True
                resp.close()
                return result
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"stream error: {chunk['error']}"
                    return result
                result.num_chunks += 1
                for choice in chunk.get("choices", ()):
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
                if stop_after is not None and result.num_chunks >= stop_after \
                        and result.finish_reason is None:
                    result.closed_early = True
                    resp.close()
                    return result
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


async def run_load(base: str, plan: list[tuple[str, dict]], args: argparse.Namespace,
                   ) -> list[ClientResult]:
    import aiohttp

    url = f"{base}/v1/completions"
    rng = random.Random(args.seed + 1)
    sem = asyncio.Semaphore(args.concurrency)
    deadline = time.monotonic() + args.max_load_s
    timeout = aiohttp.ClientTimeout(total=args.request_timeout_s)
    connector = aiohttp.TCPConnector(limit=args.concurrency, force_close=True)
    results: list[ClientResult] = []

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        async def worker(kind: str, body: dict) -> None:
            async with sem:
                if time.monotonic() > deadline:
                    return
                results.append(await one_request(session, url, kind, body, rng))

        await asyncio.gather(*(worker(k, b) for k, b in plan))
    return results


# ---------------------------------------------------------------------- main


def server_command(args: argparse.Namespace, model: str, port: int) -> list[str]:
    if args.server_cmd:
        return shlex.split(args.server_cmd.format(port=port, model=model))
    cmd = [args.python, "-m", "vllm.entrypoints.cli.main", "serve", model,
           "--scheduler-cls", "asyncbatch.Scheduler", "--load-format", "dummy",
           "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", args.served_model_name,
           "--max-model-len", str(args.max_model_len),
           "--max-num-seqs", str(args.max_num_seqs),
           "--gpu-memory-utilization", str(args.gpu_memory_utilization),
           "--num-gpu-blocks-override", str(args.num_gpu_blocks)]
    if args.asyncbatch_config:
        cmd += ["--additional-config", json.dumps({"asyncbatch": json.loads(
            args.asyncbatch_config)})]
    return cmd + shlex.split(args.server_args)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model folder; default: a dummy llama-1b folder")
    p.add_argument("--served-model-name", default="soak")
    p.add_argument("--num-requests", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=96)
    p.add_argument("--max-tokens", type=int, default=384)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=128)
    # a small KV cache, so that the load also causes preemptions
    p.add_argument("--num-gpu-blocks", type=int, default=2048)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--short-share", type=float, default=0.15)
    p.add_argument("--disconnect-share", type=float, default=0.2)
    p.add_argument("--abort-share", type=float, default=0.1)
    p.add_argument("--bad-share", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--asyncbatch-config", default="",
                   help="asyncbatch settings as a JSON object")
    p.add_argument("--server-args", default="", help="more `vllm serve` arguments")
    p.add_argument("--server-cmd", default="",
                   help="replace the server command ({port} and {model} are filled in)")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--startup-timeout-s", type=float, default=240)
    p.add_argument("--max-load-s", type=float, default=150,
                   help="no new request is started after this many seconds")
    p.add_argument("--request-timeout-s", type=float, default=120)
    p.add_argument("--drain-timeout-s", type=float, default=60)
    p.add_argument("--gpu-memory-slack-mib", type=int, default=1024)
    p.add_argument("--result-dir", default=str(ROOT / "benchmarks/results/serve-soak"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="asyncbatch-serve-soak-"))
    model = args.model
    if model is None:
        from asyncbatch.sim.model_dir import write_model_dir

        model = str(write_model_dir(workdir / "model", "llama-1b"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = server_command(args, model, port)
    figures = Figures(command=shlex.join([sys.executable, *sys.argv]), server_cmd=cmd)
    log_path = workdir / "server.log"
    env = dict(os.environ, VLLM_NO_USAGE_STATS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "plugin"),
                                                      env.get("PYTHONPATH")]))
    print(f"starting: {shlex.join(cmd)}", flush=True)
    proc = procs.start(cmd, log_path, env=env, cwd=workdir)
    try:
        with procs.sigterm_raises():
            soak(args, base, proc, figures)
    except Exception as e:  # noqa: BLE001 - recorded as a failure, then reported
        figures.failures.append(f"{type(e).__name__}: {e}")
    finally:
        procs.kill_group(proc)
    figures.failures += [] if figures.server_alive else ["server not alive after the load"]
    result_dir = Path(args.result_dir)
    result_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = result_dir / f"serve-soak-{stamp}.json"
    out.write_text(json.dumps(asdict(figures), indent=1) + "\n")
    (result_dir / f"serve-soak-{stamp}.log").write_text(procs.tail(log_path, 200) + "\n")
    print(summary(figures))
    print(f"figures: {out}")
    if figures.failures:
        print("FAILED:\n  " + "\n  ".join(figures.failures), flush=True)
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def soak(args: argparse.Namespace, base: str, proc: subprocess.Popen, f: Figures) -> None:
    t0 = time.monotonic()
    wait_healthy(base, proc, args.startup_timeout_s)
    f.startup_s = time.monotonic() - t0
    # one request first, so that lazily made buffers count as idle memory
    asyncio.run(run_load(base, [("full", {"model": args.served_model_name, "prompt": [11, 12],
                                          "max_tokens": 4, "stream": True})], args))
    f.gpu_memory_idle_mib = gpu_memory_mib()
    f.metrics_before = before = read_metrics(base)

    plan = plan_requests(args)
    t0 = time.monotonic()
    results = asyncio.run(run_load(base, plan, args))
    f.load_s = time.monotonic() - t0
    f.num_requests_sent = len(results)
    f.num_by_kind = {k: sum(r.kind == k for r in results) for k in KINDS}
    for r in results:
        f.num_output_chunks += r.num_chunks
        if r.kind == "bad":
            if r.status == 400:
                f.num_rejected_400 += 1
            else:
                f.unexpected_errors.append(f"bad request answered {r.status} ({r.error})")
        elif r.error is not None or r.status != 200:
            f.unexpected_errors.append(f"{r.kind}: status {r.status}, {r.error}")
        elif r.closed_early:
            f.num_disconnected += 1
        elif r.finish_reason in ("stop", "length"):
            f.num_completed += 1
        else:
            f.unexpected_errors.append(f"{r.kind}: stream ended without a finish reason")
    f.num_unexpected_errors = len(f.unexpected_errors)
    del f.unexpected_errors[20:]
    if f.num_unexpected_errors:
        f.failures.append(f"{f.num_unexpected_errors} unexpected client errors")

    deadline = time.monotonic() + args.drain_timeout_s
    while True:
        after = read_metrics(base)
        idle = (after["vllm:num_requests_running"] == 0
                and after["vllm:num_requests_waiting"] == 0
                and after["vllm:kv_cache_usage_perc"] == 0)
        settled = after["vllm:request_success_total"] - before["vllm:request_success_total"] \
            >= f.num_completed
        if (idle and settled) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    f.metrics_after = after
    f.num_success_delta = after["vllm:request_success_total"] - before[
        "vllm:request_success_total"]
    f.num_preemptions_delta = after["vllm:num_preemptions_total"] - before[
        "vllm:num_preemptions_total"]
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc"):
        if after[name] != 0:
            f.failures.append(f"{name} = {after[name]} after the load (expected 0)")
    if not f.num_completed <= f.num_success_delta <= f.num_completed + f.num_disconnected:
        f.failures.append(
            f"vllm:request_success_total rose by {f.num_success_delta:.0f}; clients completed "
            f"{f.num_completed} and disconnected {f.num_disconnected}")

    f.server_alive = proc.poll() is None and http_get(f"{base}/health")[0] == 200
    f.gpu_memory_after_mib = gpu_memory_mib()
    if f.gpu_memory_idle_mib is not None and f.gpu_memory_after_mib is not None:
        grown = f.gpu_memory_after_mib - f.gpu_memory_idle_mib
        if grown > args.gpu_memory_slack_mib:
            f.failures.append(f"GPU memory {grown} MiB above its idle level after the load")
    if f.num_requests_sent < args.num_requests:
        f.failures.append(f"only {f.num_requests_sent} of {args.num_requests} requests sent "
                          f"within --max-load-s {args.max_load_s:.0f}")


def summary(f: Figures) -> str:
    return (
        f"sent {f.num_requests_sent} {f.num_by_kind}; completed {f.num_completed}, "
        f"disconnected/aborted {f.num_disconnected}, rejected 400 {f.num_rejected_400}, "
        f"unexpected errors {f.num_unexpected_errors}; request_success_total +"
        f"{f.num_success_delta:.0f}, preemptions +{f.num_preemptions_delta:.0f}; "
        f"running {f.metrics_after.get('vllm:num_requests_running')}, waiting "
        f"{f.metrics_after.get('vllm:num_requests_waiting')}, kv usage "
        f"{f.metrics_after.get('vllm:kv_cache_usage_perc')}; GPU memory "
        f"{f.gpu_memory_idle_mib} -> {f.gpu_memory_after_mib} MiB; server alive "
        f"{f.server_alive}; start-up {f.startup_s:.0f} s, load {f.load_s:.0f} s"
    )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)

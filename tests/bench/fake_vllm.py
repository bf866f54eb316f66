# SPDX-License-Identifier: Apache-2.0
"""Stands in for ``python -m vllm.entrypoints.cli.main`` (``serve`` and ``bench serve``)
and for ``python -m asyncbatch.bench.offline_worker`` in the CPU tests.

With ``FAKE_VLLM_PIDS=FILE`` every process starts a sleeping child, as vLLM
starts engine and worker processes, and appends ``ROLE PID CHILD_PID`` to FILE,
so a test can check that none is left.  ``FAKE_VLLM_FAIL=ROLE:VARIANT`` (role
``worker`` or ``bench``) makes that process fail, and ``FAKE_VLLM_HANG=bench:VARIANT``
makes that bench run hang.
"""

import http.server
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

THROUGHPUT = {"sync": 70.0, "async": 100.0, "asyncbatch": 101.0, "worker": 110.0,
              "full": 111.0}


def flag(argv, name, default=None):
    return argv[argv.index(name) + 1] if name in argv else default


def record(role):
    path = os.environ.get("FAKE_VLLM_PIDS")
    if path:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(path, "a") as f:
            f.write(f"{role} {os.getpid()} {child.pid}\n")


def fail_if_asked(role, variant):
    if os.environ.get("FAKE_VLLM_FAIL") == f"{role}:{variant}":
        print(f"RuntimeError: {role} {variant} failed (fake)", flush=True)
        sys.exit(1)


def serve(argv):
    record("serve")
    port = int(flag(argv, "--port"))
    counters = {"hits": 0.0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/metrics":
                counters["hits"] += 10
                body = (f'# HELP x\nvllm:prefix_cache_hits_total{{engine="0"}} {counters["hits"]}\n'
                        f'vllm:prefix_cache_queries_total{{engine="0"}} {counters["hits"] * 2}\n'
                        'vllm:num_preemptions_total{engine="0"} 0.0\n').encode()
                self.send_response(200)
                self.end_headers()
                self.wfile.write(body)
                return
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def do_POST(self):
            self.send_response(200 if self.path == "/reset_prefix_cache" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()


def bench(argv):
    port = flag(argv, "--port")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        assert r.status == 200
    variant = flag(argv, "--label").split("-")[0]
    record("bench")
    fail_if_asked("bench", variant)
    if os.environ.get("FAKE_VLLM_HANG") == f"bench:{variant}":
        time.sleep(600)
    rate = float(flag(argv, "--request-rate"))
    tput = THROUGHPUT[variant] * min(rate, 10.0)
    result = {"duration": 10.0, "completed": 8, "failed": 0, "request_throughput": 0.8,
              "output_throughput": tput, "total_token_throughput": 2 * tput,
              "median_ttft_ms": 50.0, "p99_ttft_ms": 90.0, "median_tpot_ms": 5.0,
              "p99_tpot_ms": 8.0, "p99_itl_ms": 9.0, "mean_e2el_ms": 400.0,
              "p99_e2el_ms": 700.0, "ttfts": [0.05] * 8, "generated_texts": ["x"] * 8,
              "dataset": flag(argv, "--dataset-name"),
              "num_prompts": int(flag(argv, "--num-prompts"))}
    out = Path(flag(argv, "--result-dir")) / flag(argv, "--result-filename")
    out.write_text(json.dumps(result))


def worker(argv):
    spec = json.loads(Path(argv[0]).read_text())
    args = spec["engine_args"]
    if args.get("fail"):
        print("RuntimeError: CUDA out of memory (fake)", flush=True)
        sys.exit(1)
    plugins = (args.get("scheduler_cls"), args.get("worker_cls"))
    variant = {("asyncbatch.Scheduler", None): "asyncbatch",
               ("asyncbatch.Scheduler", "asyncbatch.Worker"): "full"}.get(plugins)
    if variant == "full" and args.get("additional_config", {}).get("asyncbatch", {}).get(
            "policy") == "fcfs":
        variant = "worker"  # three in flight, pass-through policy
    variant = variant or ("sync" if args.get("async_scheduling") is False else "async")
    record("worker")
    fail_if_asked("worker", variant)
    jitter = (os.getpid() % 5) / 5
    results = []
    for w in spec["workloads"]:
        n = len(json.loads(Path(w["requests_file"]).read_text()))
        tput = THROUGHPUT[variant] + jitter
        results.append({"workload": w["label"], "elapsed_time": 10 * n / tput,
                        "num_requests": n, "output_throughput": tput,
                        "total_token_throughput": 3 * tput, "request_throughput": tput / 10,
                        "num_preemptions": 0, "prefix_cache_hit_rate": 0.5})
    effective = {"async_scheduling": args.get("async_scheduling", True)
                 if not args.get("lie") else False}
    Path(argv[1]).write_text(json.dumps({"startup_s": 1.0, "gpu": "Fake GPU",
                                         "effective_config": effective,
                                         "results": results, "finished_at": time.time()}))


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[0] == "serve":
        serve(argv)
    elif argv[:2] == ["bench", "serve"]:
        bench(argv)
    else:
        worker(argv)

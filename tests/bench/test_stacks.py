# SPDX-License-Identifier: Apache-2.0
"""The stack sampler behind ``benchmarks/worker_ab.py --stacks`` (pure Python)."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from asyncbatch.bench.stacks import StackSampler, summarize

ROOT = Path(__file__).resolve().parents[2]


def spin_here(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def sleep_here(seconds):
    time.sleep(seconds)


def test_counts_where_the_sampled_thread_is(tmp_path):
    sampler = StackSampler(tmp_path, interval_s=0.001, thread_id=threading.get_ident())
    sampler.start()
    spin_here(0.3)
    sleep_here(0.3)
    sampler.stop()
    data = json.loads(sampler.path.read_text())
    n = data["samples"]
    spin = data["inclusive"].get("bench/test_stacks.py:spin_here", 0)
    sleep = data["inclusive"].get("bench/test_stacks.py:sleep_here", 0)
    # both seen, each in a good share of the samples; the test function in all
    assert n > 20 and spin > 0.1 * n and sleep > 0.2 * n
    assert data["inclusive"]["bench/test_stacks.py:test_counts_where_the_sampled_thread_is"] == n
    assert data["leaf"].get("bench/test_stacks.py:spin_here", 0) > 0


def test_samples_only_while_the_gate_file_exists(tmp_path):
    gate = tmp_path / "gate"
    sampler = StackSampler(tmp_path, interval_s=0.001, thread_id=threading.get_ident(),
                           gate=gate)
    sampler.start()
    sleep_here(0.2)
    closed = sampler.samples
    gate.touch()
    sleep_here(0.2)
    sampler.stop()
    assert closed == 0 and sampler.samples > 20


def test_summarize_leaves_out_short_processes_and_orders_by_samples(tmp_path):
    for pid, name, n in ((1, "VLLM::Worker", 400), (2, "VLLM::EngineCore", 800), (3, "x", 3)):
        (tmp_path / f"stacks-{pid}.json").write_text(json.dumps(
            {"pid": pid, "process": name, "samples": n, "interval_s": 0.005,
             "inclusive": {"a.py:f": n, "a.py:g": n // 4}, "leaf": {"a.py:g": n // 4}}))
    rows = summarize(tmp_path)
    assert [r["process"] for r in rows] == ["VLLM::EngineCore", "VLLM::Worker"]
    assert rows[0]["inclusive_pct"] == {"a.py:f": 100.0, "a.py:g": 25.0}
    assert rows[0]["leaf_pct"] == {"a.py:g": 25.0}


def run_with_sampling(code, out_dir):
    """Run ``code`` in a fresh Python with the benchmark's sampling environment."""
    env = {**os.environ, "ASYNCBATCH_STACK_SAMPLES": str(out_dir),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks/stack_sampling"),
                                          str(ROOT / "plugin")])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, timeout=60)
    assert proc.returncode == 0


def test_sitecustomize_samples_every_process_started_with_the_environment(tmp_path):
    """What worker_ab.py --stacks relies on: a child Python process (as the
    engine's processes are) samples itself with no change to its code."""
    code = ("import time\n"
            "def busy_child():\n"
            "    end = time.perf_counter() + 0.5\n"
            "    while time.perf_counter() < end: pass\n"
            "busy_child(); time.sleep(2.5)\n")
    run_with_sampling(code, tmp_path)
    (path,) = tmp_path.glob("stacks-*.json")
    data = json.loads(path.read_text())
    assert data["inclusive"].get("<string>:busy_child", 0) > 0.1 * data["samples"]


def test_sitecustomize_samples_forked_children_too(tmp_path):
    """vLLM forks its EngineCore and worker processes; a thread does not survive
    fork(), so each child must start its own sampler."""
    code = ("import os, time\n"
            "def busy_forked_child():\n"
            "    end = time.perf_counter() + 0.5\n"
            "    while time.perf_counter() < end: pass\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    busy_forked_child(); time.sleep(2.5); os._exit(0)\n"
            "os.waitpid(pid, 0)\n")
    run_with_sampling(code, tmp_path)
    files = sorted(tmp_path.glob("stacks-*.json"))
    assert len(files) == 2, files  # the parent's and the child's
    child = [json.loads(p.read_text()) for p in files]
    seen = [d for d in child if "<string>:busy_forked_child" in d["inclusive"]]
    assert len(seen) == 1 and seen[0]["inclusive"]["<string>:busy_forked_child"] > 10

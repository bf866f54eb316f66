# SPDX-License-Identifier: Apache-2.0
"""benchmarks/serve_soak.py against a stand-in server (the real run needs a GPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("aiohttp")

ROOT = Path(__file__).resolve().parents[2]
FAKE = Path(__file__).with_name("fake_serve.py")


def serve_soak(tmp_path, mode, *extra):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "serve_soak.py"),
           "--server-cmd", f"{sys.executable} {FAKE} {{port}} {mode}",
           "--num-requests", "120", "--concurrency", "16", "--max-tokens", "12",
           "--startup-timeout-s", "30", "--drain-timeout-s", "3", "--max-load-s", "60",
           "--bad-share", "0.1", "--result-dir", str(tmp_path), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    [result] = tmp_path.glob("serve-soak-*.json")
    return proc, json.loads(result.read_text())


def test_passes_on_a_healthy_server(tmp_path):
    proc, f = serve_soak(tmp_path, "ok")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f["failures"] == [] and f["server_alive"]
    assert f["num_requests_sent"] == 120
    by_kind = f["num_by_kind"]
    assert f["num_rejected_400"] == by_kind["bad"] > 0
    # a client that meant to disconnect may have read the whole (short) stream first
    assert f["num_disconnected"] >= by_kind["abort"] > 0
    assert f["num_completed"] + f["num_disconnected"] == 120 - by_kind["bad"]
    assert f["num_completed"] <= f["num_success_delta"]


def test_fails_when_a_request_stays_running(tmp_path):
    proc, f = serve_soak(tmp_path, "leak")
    assert proc.returncode == 1
    assert any("vllm:num_requests_running" in x for x in f["failures"])


def test_fails_when_the_server_dies(tmp_path):
    proc, f = serve_soak(tmp_path, "crash")
    assert proc.returncode == 1
    assert not f["server_alive"] and f["num_unexpected_errors"] > 0

# SPDX-License-Identifier: Apache-2.0
"""asyncbatch-bench: clear errors on bad input, and the CPU replay end to end."""

import json
import socket
import tempfile

import pytest

from asyncbatch.bench.cli import main


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_unknown_workload_lists_the_known_ones(capsys):
    rc, _, err = run(capsys, "replay", "--workload", "nope")
    assert rc == 2
    assert "unknown workload 'nope'" in err and "prefix-shared" in err and "replay-kv" in err


def test_unknown_variant(capsys):
    rc, _, err = run(capsys, "replay", "--variants", "async,turbo")
    assert rc == 2 and "turbo" in err and "asyncbatch" in err


def test_replay_runs_the_worker_three_deep_and_says_what_it_models(capsys, tmp_path):
    rc, out, err = run(capsys, "replay", "--variants", "async,worker",
                       "-w", "random:num_requests=24,input_len=64,output_len=16",
                       "--result-dir", str(tmp_path), "--name", "r", "--no-progress")
    assert rc == 0 and "| worker |" in out
    assert "three batches in flight" in err and "not" in err
    result = json.loads((tmp_path / "r.json").read_text())
    depth = {r["variant"]: r["max_batches_in_flight"] for r in result["runs"]}
    assert depth == {"async": 2, "worker": 3}


def test_missing_model_folder_says_how_to_make_a_dummy(capsys, tmp_path):
    rc, _, err = run(capsys, "offline", "--model", str(tmp_path / "missing"))
    assert rc == 2 and "does not exist" in err and "--model dummy:llama-8b" in err
    rc, _, err = run(capsys, "online", "--model", "dummy:llama-99b")
    assert rc == 2 and "dummy:llama-8b" in err


def test_one_repeat_is_refused(capsys):
    rc, _, err = run(capsys, "offline", "--repeats", "1")
    assert rc == 2 and "at least 2" in err


def test_online_port_in_use(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNCBATCH_CACHE", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rc, _, err = run(capsys, "online", "--model", "dummy:tiny", "--port", str(port),
                         "--result-dir", str(tmp_path / "res"), "--no-progress")
    assert rc == 2 and f"port {port}" in err and "already in use" in err
    assert not (tmp_path / "tmp").exists()  # refused before anything was made


def test_workloads_lists_and_sizes(capsys):
    rc, out, _ = run(capsys, "workloads")
    assert rc == 0 and "replay-kv" in out and "sharegpt" in out
    rc, out, _ = run(capsys, "workloads", "prefix-shared:num_groups=2,group_size=3")
    assert rc == 0 and "6 requests" in out


def test_replay_end_to_end(capsys, tmp_path):
    pytest.importorskip("vllm")
    rc, out, _ = run(capsys, "replay", "--workload",
                     "replay-kv:num_groups=4,group_size=3,prefix_len=64,suffix_len=16,output_len=8",
                     "--num-kv-blocks", "24", "--max-num-seqs", "8",
                     "--result-dir", str(tmp_path), "--name", "t", "--no-progress")
    assert rc == 0
    assert "SIMULATED" in out
    rows = [line.split("|")[1].strip() for line in out.splitlines()
            if line.startswith("| ") and "variant" not in line]
    assert rows == ["sync", "async", "asyncbatch"]
    result = json.loads((tmp_path / "t.json").read_text())
    assert result["simulated"] is True
    assert {r["variant"] for r in result["runs"]} == {"sync", "async", "asyncbatch"}
    for r in result["runs"]:
        assert r["num_requests"] == 12 and r["total_output_tokens"] == 12 * 8
        assert r["elapsed_time"] > 0 and r["output_throughput"] > 0
    # two steps in flight hide host time: async is faster than sync in simulated time
    by = {r["variant"]: r for r in result["runs"]}
    assert by["async"]["elapsed_time"] < by["sync"]["elapsed_time"]
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "SIMULATED" in (tmp_path / "t.md").read_text()

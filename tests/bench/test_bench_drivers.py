# SPDX-License-Identifier: Apache-2.0
"""The offline and online drivers end to end on the CPU, with vLLM's processes stood
in for by tests/bench/fake_vllm.py: run order, results files, failures."""

import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from asyncbatch.bench import offline, online
from asyncbatch.bench.cli import main

FAKE = str(Path(__file__).with_name("fake_vllm.py"))


def work_dir(stderr: str) -> Path:
    return Path(re.search(r"logs in (\S+)", stderr).group(1))


@pytest.fixture
def fake_vllm(monkeypatch, tmp_path):
    monkeypatch.setattr(offline, "WORKER", [sys.executable, FAKE])
    monkeypatch.setattr(online, "VLLM_CLI", [sys.executable, FAKE])
    monkeypatch.setenv("ASYNCBATCH_CACHE", str(tmp_path / "cache"))
    # work folders (kept after a failure) go under tmp_path
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def test_offline_ab_runs_abba_and_writes_results(fake_vllm, tmp_path, capsys):
    rc = main(["offline", "--model", "dummy:tiny", "--workload", "random:num_requests=4",
               "--workload", "replay-kv:num_groups=2,group_size=2", "--repeats", "2",
               "--result-dir", str(tmp_path / "res"), "--name", "o", "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert not work_dir(err).exists()  # logs are dropped after a success
    result = json.loads((tmp_path / "res" / "o.json").read_text())
    order = [(r["variant"], r["repeat"]) for r in result["runs"]
             if r["workload"] == "random.num_requests=4"]
    assert order == [("sync", 0), ("async", 0), ("asyncbatch", 0),
                     ("asyncbatch", 1), ("async", 1), ("sync", 1)]
    assert result["environment"]["gpu"] == "Fake GPU"
    assert result["environment"]["model_shape"] == "tiny"
    assert result["environment"]["command"].startswith("asyncbatch-bench offline")
    args = result["config"]["engine_args"]
    assert args["asyncbatch"]["scheduler_cls"] == "asyncbatch.Scheduler"
    assert args["sync"]["async_scheduling"] is False
    assert all(a["distributed_executor_backend"] == "mp" for a in args.values())
    summary = result["summary"]["random.num_requests=4"]
    assert summary["sync"]["output_throughput"]["verdict"] == "worse"
    assert "workload `replay-kv.num_groups=2.group_size=2`" in out
    assert (tmp_path / "res" / "o.png").is_file() and (tmp_path / "res" / "o.md").is_file()


def test_offline_worker_failure_is_reported_with_its_log(fake_vllm, tmp_path, capsys):
    rc = main(["offline", "--model", "dummy:tiny", "--workload", "random:num_requests=2",
               "--engine-arg", "fail=true", "--result-dir", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "exited with code 1" in err and "CUDA out of memory (fake)" in err
    logs = work_dir(err)
    assert any(p.suffix == ".log" for p in logs.iterdir())  # kept after a failure
    shutil.rmtree(logs)


def test_offline_refuses_a_variant_that_did_not_run_async(fake_vllm, tmp_path, capsys):
    rc = main(["offline", "--model", "dummy:tiny", "--workload", "random:num_requests=2",
               "--variants", "async,asyncbatch", "--engine-arg", "lie=true",
               "--result-dir", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "async_scheduling=False" in err


def test_online_ab_two_rates(fake_vllm, tmp_path, capsys):
    rc = main(["online", "--model", "dummy:tiny", "--request-rates", "2,20",
               "--workload", "replay-kv:num_groups=2,group_size=2",
               "--result-dir", str(tmp_path / "res"), "--name", "on", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    result = json.loads((tmp_path / "res" / "on.json").read_text())
    runs = result["runs"]
    assert len(runs) == 2 * 2 * 2  # variants x repeats x rates
    assert {r["workload"] for r in runs} == {"replay-kv.num_groups=2.group_size=2@2rps",
                                             "replay-kv.num_groups=2.group_size=2@20rps"}
    assert all("ttfts" not in r and r["median_ttft_ms"] == 50.0 for r in runs)
    assert all(r["dataset"] == "prefix_repetition" for r in runs)
    assert all(r["prefix_cache_hit_rate"] == pytest.approx(0.5) for r in runs)
    raw = list((tmp_path / "res" / "vllm-bench" / "on").glob("*.json"))
    assert len(raw) == 8  # one folder per result set: a later run overwrites nothing
    assert "TTFT p50 ms" in out and "asyncbatch" in out


def test_online_run_that_hangs_is_stopped_and_finished_runs_are_kept(fake_vllm, tmp_path,
                                                                    monkeypatch):
    """A stuck `vllm bench serve` is stopped after its stall time, not the whole
    --timeout; the error says so and points at the records of the runs before it."""
    from asyncbatch.bench.models import resolve_model
    from asyncbatch.bench.offline import BenchError
    from asyncbatch.bench.online import run_online, run_timeout
    from asyncbatch.bench.variants import EngineProfile
    from asyncbatch.bench.workloads import parse_workload

    assert run_timeout(30, 2.0, 900) == 120 + 6 * 15
    assert run_timeout(30, 2.0, 60) == 60  # never beyond --timeout
    assert run_timeout(30, float("inf"), 900) == 900
    monkeypatch.setenv("FAKE_VLLM_HANG", "bench:asyncbatch")
    model = resolve_model("dummy:tiny", cache_dir=tmp_path / "models")
    t0 = time.monotonic()
    with pytest.raises(BenchError, match="no result after") as e:
        run_online(model, [("random", parse_workload("random:num_requests=4"))],
                   ["async", "asyncbatch"], EngineProfile(), request_rates=[4.0],
                   max_concurrency=4, repeats=1, work_dir=tmp_path / "work",
                   result_dir=tmp_path / "res", duration_s=1.0, bench_timeout_s=900,
                   stall_slack_s=3.0, progress=False)
    assert time.monotonic() - t0 < 60
    assert "1 online runs completed" in str(e.value)
    kept = json.loads((tmp_path / "res" / "vllm-bench" / "completed-runs.json").read_text())
    assert [r["variant"] for r in kept] == ["async"]

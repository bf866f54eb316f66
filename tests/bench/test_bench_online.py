# SPDX-License-Identifier: Apache-2.0
"""Server lifecycle of the online A/B, with a stand-in server: ready, failing, hanging,
port in use, and never a stray process afterwards."""

import os
import socket
import sys
import urllib.request
from pathlib import Path

import pytest
from proc_support import alive

from asyncbatch.bench.models import resolve_model
from asyncbatch.bench.offline import BenchError
from asyncbatch.bench.online import free_port, run_online, running_server, serve_cmd
from asyncbatch.bench.variants import EngineProfile
from asyncbatch.bench.workloads import parse_workload

FAKE = str(Path(__file__).with_name("fake_server.py"))


def pids(pidfile: Path) -> list[int]:
    return [int(p) for p in pidfile.read_text().split()]


def test_server_ready_then_whole_group_stopped(tmp_path):
    port, pidfile = free_port(), tmp_path / "pids"
    cmd = [sys.executable, FAKE, "ok", str(port), str(pidfile)]
    with running_server(cmd, port=port, log_path=tmp_path / "log",
                        health_timeout_s=30) as startup_s:
        assert startup_s >= 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            assert r.status == 200
        server, child = pids(pidfile)
        assert alive(server) and alive(child)
    assert not alive(server) and not alive(child)


def test_server_that_exits_is_a_clear_error_with_its_log(tmp_path):
    port, pidfile = free_port(), tmp_path / "pids"
    cmd = [sys.executable, FAKE, "exit", str(port), str(pidfile)]
    with pytest.raises(BenchError, match=r"exited with code 3(.|\n)*cannot load model"), \
            running_server(cmd, port=port, log_path=tmp_path / "log", health_timeout_s=30):
        pytest.fail("must not get here")
    assert not any(alive(p) for p in pids(pidfile))


def test_server_that_never_gets_healthy_times_out_and_is_killed(tmp_path):
    port, pidfile = free_port(), tmp_path / "pids"
    cmd = [sys.executable, FAKE, "hang", str(port), str(pidfile)]
    with pytest.raises(BenchError, match="not healthy"), \
            running_server(cmd, port=port, log_path=tmp_path / "log", health_timeout_s=2):
        pass
    assert not any(alive(p) for p in pids(pidfile))


def test_body_failure_still_stops_the_server(tmp_path):
    port, pidfile = free_port(), tmp_path / "pids"
    cmd = [sys.executable, FAKE, "ok", str(port), str(pidfile)]
    with pytest.raises(RuntimeError, match="boom"), \
            running_server(cmd, port=port, log_path=tmp_path / "log", health_timeout_s=30):
        raise RuntimeError("boom")
    assert not any(alive(p) for p in pids(pidfile))


def test_port_in_use_is_refused_before_starting(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        marker = tmp_path / "pids"
        cmd = [sys.executable, FAKE, "ok", str(port), str(marker)]
        with pytest.raises(BenchError, match=f"port {port} .* already in use"), \
                running_server(cmd, port=port, log_path=tmp_path / "log", health_timeout_s=5):
            pass
        assert not marker.exists()


def test_run_online_stops_at_a_failing_server(tmp_path):
    pidfile = tmp_path / "pids"

    def server_cmd(variant, port):
        return [sys.executable, FAKE, "exit", str(port), str(pidfile)]

    model = resolve_model("dummy:tiny", cache_dir=tmp_path, create=False)
    with pytest.raises(BenchError, match="exited with code 3"):
        run_online(model, [("random", parse_workload("random"))], ["async", "asyncbatch"],
                   EngineProfile(), request_rates=[1.0], max_concurrency=4, repeats=2,
                   work_dir=tmp_path / "work", result_dir=tmp_path / "res",
                   server_cmd=server_cmd, health_timeout_s=10, progress=False)
    assert not any(alive(p) for p in pids(pidfile))


def test_serve_command_uses_python_module_and_variant_flags(tmp_path):
    model = resolve_model("dummy:llama-8b", cache_dir=tmp_path, create=False)
    profile = EngineProfile(num_kv_blocks=512, asyncbatch_config={"policy": "fcfs"})
    ours = serve_cmd(model, profile, "asyncbatch", 8123)
    assert ours[:4] == [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve"]
    assert ours[ours.index("--scheduler-cls") + 1] == "asyncbatch.Scheduler"
    assert ours[ours.index("--additional-config") + 1] == '{"asyncbatch": {"policy": "fcfs"}}'
    assert ours[ours.index("--num-gpu-blocks-override") + 1] == "512"
    assert ours[ours.index("--distributed-executor-backend") + 1] == "mp"
    assert ours[ours.index("--load-format") + 1] == "dummy"
    stock = serve_cmd(model, profile, "async", 8123)
    assert "--scheduler-cls" not in stock and "--no-async-scheduling" not in stock
    assert "--no-async-scheduling" in serve_cmd(model, profile, "sync", 8123)
    assert os.path.basename(model.path) == "dummy-llama-8b"


def test_engine_args_fit_max_model_len_to_a_small_kv_cache():
    assert EngineProfile(num_kv_blocks=512).engine_args("async")["max_model_len"] == 8192
    assert EngineProfile(num_kv_blocks=256).engine_args("sync")["max_model_len"] == 4096
    assert EngineProfile().engine_args("async")["max_model_len"] == 8192
    assert "num_gpu_blocks_override" not in EngineProfile().engine_args("async")


def test_worker_and_full_variants_load_the_worker_plugin(tmp_path):
    profile = EngineProfile(asyncbatch_config={"kv_headroom": 0.0})
    worker = profile.engine_args("worker")
    # the deeper pipeline needs both plugins; "worker" keeps the pass-through policy
    assert worker["worker_cls"] == "asyncbatch.Worker"
    assert worker["scheduler_cls"] == "asyncbatch.Scheduler"
    assert worker["additional_config"] == {"asyncbatch": {"kv_headroom": 0.0,
                                                          "policy": "fcfs"}}
    assert "async_scheduling" not in worker  # stock async scheduling, as the baseline
    full = profile.engine_args("full")
    assert full["worker_cls"] == "asyncbatch.Worker"
    assert full["scheduler_cls"] == "asyncbatch.Scheduler"
    assert full["additional_config"] == {"asyncbatch": {"kv_headroom": 0.0}}
    for stock in ("sync", "async"):
        assert "worker_cls" not in profile.engine_args(stock)
        assert "additional_config" not in profile.engine_args(stock)
    assert "worker_cls" not in profile.engine_args("asyncbatch")
    assert EngineProfile().engine_args("worker")["additional_config"] == {
        "asyncbatch": {"policy": "fcfs"}}
    assert "additional_config" not in EngineProfile().engine_args("full")

    model = resolve_model("dummy:llama-1b", cache_dir=tmp_path, create=False)
    cmd = serve_cmd(model, profile, "worker", 8123)
    assert cmd[cmd.index("--worker-cls") + 1] == "asyncbatch.Worker"
    assert cmd[cmd.index("--scheduler-cls") + 1] == "asyncbatch.Scheduler"
    assert "--no-async-scheduling" not in cmd
    cmd = serve_cmd(model, profile, "full", 8123)
    assert cmd[cmd.index("--worker-cls") + 1] == "asyncbatch.Worker"
    assert cmd[cmd.index("--scheduler-cls") + 1] == "asyncbatch.Scheduler"
    assert "--worker-cls" not in serve_cmd(model, profile, "asyncbatch", 8123)


def test_worker_variants_are_known_but_not_defaults(capsys):
    from asyncbatch.bench.cli import build_parser
    from asyncbatch.bench.variants import VariantError, check_variants

    assert check_variants(["async", "worker", "full"]) == ["async", "worker", "full"]
    with pytest.raises(VariantError, match="worker, full"):
        check_variants(["turbo"])
    for cmd in ("offline", "online", "ab", "replay"):
        args = build_parser().parse_args([cmd])
        assert "worker" not in args.variants and "full" not in args.variants

# SPDX-License-Identifier: Apache-2.0
"""benchmarks/dp_ab.py without a GPU: its workloads, metrics parsing, server
command lines, and a whole A/B against a fake two-engine server."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FAKE = Path(__file__).with_name("fake_dp_server.py")


@pytest.fixture(scope="module")
def dp_ab():
    spec = importlib.util.spec_from_file_location("dp_ab", ROOT / "benchmarks/dp_ab.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["dp_ab"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("dp_ab", None)


def test_workloads(dp_ab):
    shape = dp_ab.Shape(groups=8, members=4, prefix_len=64, suffix_len=8, output_len=4)
    prefix = dp_ab.prefix_workload(shape)
    assert len(prefix) == 32 and Counter(r.group for r in prefix) == dict.fromkeys(range(8), 4)
    assert [r.group for r in prefix] != sorted(r.group for r in prefix)  # interleaved
    by_group = {}
    for r in prefix:
        by_group.setdefault(r.group, set()).add(tuple(r.prompt[:64]))
    assert all(len(s) == 1 for s in by_group.values())
    hot = dp_ab.hot_workload(shape)
    assert Counter(r.group for r in hot)[0] == 16
    rnd = dp_ab.random_workload(shape)
    assert len({tuple(r.prompt[:16]) for r in rnd}) == 32
    assert all(len(r.prompt) == 72 for r in rnd + hot + prefix)
    assert dp_ab.prefix_workload(shape) == prefix  # a pure function of the shape


def test_arrivals_and_header_rank(dp_ab):
    assert dp_ab.arrivals(3, math.inf, 0) == [0.0, 0.0, 0.0]
    times = dp_ab.arrivals(2000, 10.0, 1)
    assert times == sorted(times) and 180 < times[-1] < 220
    prompt = list(range(2, 300))
    assert dp_ab.header_rank(prompt, 2) == dp_ab.header_rank(prompt[:64] + [5], 2)
    ranks = Counter(dp_ab.header_rank([i, i + 1] * 40, 2) for i in range(1000))
    assert 400 < ranks[0] < 600


def test_parse_metrics(dp_ab):
    text = "\n".join([
        "# HELP vllm:prefix_cache_hits_total hits",
        'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 10.0',
        'vllm:prefix_cache_hits_total{engine="1",model_name="m"} 3.0',
        'vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 2.0',
        'vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 5.0',
        'vllm:num_requests_running{engine="1",model_name="m",pid="11"} 4.0',
        'vllm:num_requests_running{engine="1",model_name="m",pid="12"} 6.0',
        'vllm:other_total{engine="0"} 99.0'])
    names = {**dp_ab.COUNTERS, **dp_ab.GAUGES}
    parsed = dp_ab.parse_metrics(text, names)
    assert parsed["0"] == {"prefix_cache_hits": 10.0, "requests": 7.0}
    assert parsed["1"] == {"prefix_cache_hits": 3.0, "running": 6.0}
    deltas = dp_ab.engine_deltas({"0": {"prefix_cache_hits": 4.0}}, parsed)
    assert deltas["0"]["prefix_cache_hits"] == 6.0 and deltas["1"]["requests"] == 0.0
    assert dp_ab.imbalance([3, 6]) == 2.0 and dp_ab.imbalance([0, 0]) == 1.0
    assert dp_ab.imbalance([0, 2]) == math.inf


def test_serve_commands(dp_ab, tmp_path):
    from asyncbatch.bench.models import ModelSpec

    cfg = dp_ab.Config(model=ModelSpec(str(tmp_path), "tiny", True), out=tmp_path)
    stock = dp_ab.serve_cmd(cfg, "stock", 8000)
    assert "--data-parallel-size" in stock and "--scheduler-cls" not in stock
    assert stock[stock.index("--load-format") + 1] == "dummy"
    assert dp_ab.serve_cmd(cfg, "hash-header", 8000) == stock
    routed = dp_ab.serve_cmd(cfg, "asyncbatch", 8000)
    assert routed[routed.index("--scheduler-cls") + 1] == "asyncbatch.Scheduler"
    assert json.loads(routed[routed.index("--additional-config") + 1]) == {
        "asyncbatch": {"dp_routing": "auto"}}
    off = dp_ab.serve_cmd(cfg, "asyncbatch-norouting", 8000)
    assert json.loads(off[off.index("--additional-config") + 1]) == {
        "asyncbatch": {"dp_routing": "off"}}


def test_routing_log_check(dp_ab, tmp_path):
    log = tmp_path / "server.log"
    log.write_text("INFO asyncbatch: data-parallel prefix routing on over 2 engines (...)\n")
    assert dp_ab.check_routing_log("asyncbatch", log) == "on"
    with pytest.raises(dp_ab.BenchError):
        dp_ab.check_routing_log("asyncbatch-norouting", log)
    log.write_text("INFO asyncbatch: data-parallel prefix routing off (dp_routing is off)\n")
    assert dp_ab.check_routing_log("asyncbatch-norouting", log) == "off"
    with pytest.raises(dp_ab.BenchError, match="entry point"):
        dp_ab.check_routing_log("asyncbatch", log)


def test_entry_point_record_makes_register_visible(dp_ab, tmp_path):
    env = dp_ab.plugin_env(tmp_path)
    code = ("from importlib import metadata; print(sorted(ep.value for ep in "
            "metadata.entry_points(group='vllm.general_plugins')))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert "asyncbatch:register" in out
    assert str(ROOT / "plugin") in env["PYTHONPATH"].split(os.pathsep)


def test_a_whole_ab_against_a_fake_server(dp_ab, tmp_path):
    from asyncbatch.bench.models import ModelSpec

    shape = dp_ab.Shape(groups=6, members=4, prefix_len=80, suffix_len=8, output_len=3)
    cfg = dp_ab.Config(model=ModelSpec(str(tmp_path), None, True), out=tmp_path / "out",
                       shape=shape, rates=[200.0, math.inf], random_rates=[math.inf],
                       hot_rates=[math.inf], variants=["stock", "hash-header"], repeats=2,
                       sample_s=0.05, health_timeout_s=60, warmup_requests=2,
                       settle_s=0.2)
    messages = []
    result = dp_ab.run_all(cfg, server_cmd=lambda variant, port: [sys.executable, str(FAKE),
                                                                   str(port)],
                           env=dict(os.environ), progress=messages.append)
    out = tmp_path / "out"
    assert (out / "results.json").is_file() and (out / "summary.md").is_file()
    assert (out / "summary.png").stat().st_size > 1000
    saved = json.loads((out / "results.json").read_text())
    assert [tuple(x) for x in saved["config"]["order"]] == [
        ("stock", 0), ("hash-header", 0), ("hash-header", 1), ("stock", 1)]
    runs = result["runs"]
    assert len(runs) == 4 * 4 and all(r["completed"] == r["num_requests"] == 24 for r in runs)
    for r in runs:
        reqs = {e: d["requests"] for e, d in r["engines"].items()}
        assert sum(reqs.values()) == 24 and set(reqs) == {"0", "1"}
        if r["variant"] == "stock":  # the fake server's round robin
            assert reqs == {"0": 12, "1": 12}
    # the hash-header client sends each group to one engine: every prefix is
    # computed once, so it hits more than round robin does
    summary = result["summary"]
    prefix = summary["prefix@inf"]
    assert prefix["hash-header"]["prefix_cache_hits"] > prefix["stock"]["prefix_cache_hits"]
    assert prefix["stock"]["throughput_vs_stock"] == 1.0
    assert all(r["ttft_p50_ms"] > 0 for r in runs)
    assert "## prefix@200" in (out / "summary.md").read_text()
    # one server per repeat: hash-header is a client of the stock server
    assert sum("starting" in m for m in messages) == 2
    assert any("starting stock + hash-header" in m for m in messages)
    # a command stopped part way leaves its runs with their settings, so that
    # --merge records what the runs were made with, not the merge command's
    partial = json.loads((out / "runs-partial.json").read_text())
    assert len(partial["runs"]) == len(runs)
    assert partial["config"]["extra_serve_args"] == saved["config"]["extra_serve_args"]
    assert partial["config"]["shape"]["prefix_len"] == 80
    other = dp_ab.Config(model=cfg.model, out=tmp_path / "merged")  # the defaults' shape
    merged = dp_ab.merge(other, [out / "runs-partial.json"])
    assert merged["config"]["shape"] == saved["config"]["shape"]
    # a later command into the same folder keeps the stopped command's runs
    dp_ab.run_all(dp_ab.Config(**{**cfg.__dict__, "rates": [], "hot_rates": [],
                                  "variants": ["stock"], "repeats": 1}),
                  server_cmd=lambda variant, port: [sys.executable, str(FAKE), str(port)],
                  env=dict(os.environ), progress=messages.append)
    kept = list(out.glob("runs-partial-*.json"))
    assert len(kept) == 1 and len(json.loads(kept[0].read_text())["runs"]) == len(runs)
    assert len(json.loads((out / "runs-partial.json").read_text())["runs"]) == 1


def test_an_error_event_mid_stream_fails_the_request(dp_ab, tmp_path):
    # vLLM answers HTTP 200 and reports a later error as an event of the stream
    port = dp_ab.free_port()
    with dp_ab.running_server([sys.executable, str(FAKE), str(port)], port=port,
                              log_path=tmp_path / "server.log", health_timeout_s=60):
        reqs = [dp_ab.Req(list(range(100)), 5, -1), dp_ab.Req(list(range(100, 200)), 7, -1)]
        done, _ = dp_ab.run_client(port, "fake", reqs, math.inf, seed=0, rank_header=None,
                                   max_concurrency=None, timeout_s=60)
    assert [r.ok for r in done] == [True, False]
    assert "fake engine error" in done[1].error
    assert done[0].output_tokens == 5


def test_server_sessions(dp_ab):
    order, sessions = dp_ab.server_sessions(list(dp_ab.VARIANTS), 2)
    assert [(kind, k) for kind, k, _ in sessions] == [
        ("stock", 0), ("asyncbatch", 0), ("asyncbatch-norouting", 0),
        ("asyncbatch-norouting", 1), ("asyncbatch", 1), ("stock", 1)]
    assert sessions[0][2] == ["stock", "hash-header"]
    assert sessions[-1][2] == ["hash-header", "stock"]
    assert sorted(order) == sorted((v, k) for v in dp_ab.VARIANTS for k in range(2))


def test_repeat_offset_continues_the_series(dp_ab):
    variants = ["stock", "hash-header", "asyncbatch"]
    whole, whole_sessions = dp_ab.server_sessions(variants, 3)
    parts = [dp_ab.server_sessions(variants, 1, k) for k in range(3)]
    assert [x for order, _ in parts for x in order] == whole
    assert [x for _, sessions in parts for x in sessions] == whole_sessions
    assert parts[1][1][0][0] == "asyncbatch"  # the second repeat runs backwards


def test_merge_summarizes_runs_of_several_commands(dp_ab, tmp_path):
    from asyncbatch.bench.models import ModelSpec

    def run(variant, workload, rate, req_s, hits, repeat=0):
        engines = {e: {"requests": 4.0, "prefix_cache_hits": hits / 2,
                       "computed_tokens": 10.0} for e in "01"}
        return {"variant": variant, "workload": workload, "rate": rate, "repeat": repeat,
                "num_requests": 8, "completed": 8, "request_throughput": req_s,
                "output_throughput": 10 * req_s, "ttft_p50_ms": 5.0, "ttft_p99_ms": 9.0,
                "prefix_cache_hits": hits, "computed_prompt_tokens": 100 - hits,
                "imbalance_requests": 1.0, "imbalance_computed_tokens": 1.0,
                "imbalance_mean_load": 1.0, "engines": engines}

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    # a stopped command's partial runs, then a whole one with another variant
    (a / "runs-partial.json").write_text(json.dumps(
        [run("stock", "prefix", math.inf, 10.0, 40.0), run("stock", "random", math.inf, 8.0, 0)]))
    (b / "results.json").write_text(json.dumps({"runs": [
        run("asyncbatch", "prefix", math.inf, 12.0, 60.0),
        run("asyncbatch", "random", math.inf, 7.6, 0)]}))
    cfg = dp_ab.Config(model=ModelSpec(str(tmp_path), None, True), out=tmp_path / "out")
    result = dp_ab.merge(cfg, [a / "runs-partial.json", b / "results.json"])
    summary = result["summary"]
    assert summary["prefix@inf"]["asyncbatch"]["throughput_vs_stock"] == pytest.approx(1.2)
    assert summary["prefix@inf"]["asyncbatch"]["sources"] == ["b/results.json"]
    random_check = summary["checks"]["random@inf throughput >= 0.98x stock"]
    assert random_check["value"] == pytest.approx(0.95) and not random_check["pass"]
    assert result["config"]["variants"] == ["stock", "asyncbatch"]
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "different commands" in text and "a/runs-partial.json" in text
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(dp_ab.BenchError, match="no dp_ab runs"):
        dp_ab.load_runs([tmp_path / "bad.json"])
    for bad in ({"rate": "fast"}, {"workload": "bogus"}, {"rate": 0}):
        (tmp_path / "bad.json").write_text(json.dumps(
            [{**run("stock", "random", math.inf, 8.0, 0), **bad}]))
        with pytest.raises(dp_ab.BenchError, match="bad.json: a run"):
            dp_ab.load_runs([tmp_path / "bad.json"])


def test_merge_refuses_runs_made_with_different_settings(dp_ab, tmp_path):
    from asyncbatch.bench.models import ModelSpec

    cfg = dp_ab.Config(model=ModelSpec(str(tmp_path), None, True), out=tmp_path / "out")
    run = {"variant": "stock", "workload": "random", "rate": "inf", "repeat": 0,
           "num_requests": 1, "completed": 1, "request_throughput": 1.0,
           "engines": {"0": {"prefix_cache_hits": 0.0}}}
    for name, extra in (("a", ["--num-gpu-blocks-override=6144"]), ("b", []),
                        ("c", ["--num-gpu-blocks-override=6144"])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(
            {"config": {**dp_ab.config_record(cfg, []), "extra_serve_args": extra},
             "runs": [run]}))
    with pytest.raises(dp_ab.BenchError, match="different 'extra_serve_args'"):
        dp_ab.merge(cfg, [tmp_path / "a" / "results.json", tmp_path / "b" / "results.json"])
    # the same run in two files would count twice
    with pytest.raises(dp_ab.BenchError, match="repeat 0 is in both"):
        dp_ab.merge(cfg, [tmp_path / "a" / "results.json", tmp_path / "c" / "results.json"])
    with pytest.raises(dp_ab.BenchError, match="same file given twice"):
        dp_ab.merge(cfg, [tmp_path / "a" / "results.json", tmp_path / "a" / ".." / "a" /
                          "results.json"])
    # a series' second part (repeat 1) merges, and the merged config says so
    saved = json.loads((tmp_path / "c" / "results.json").read_text())
    saved["config"]["model"]["path"] = "/elsewhere"  # another checkout's model folder
    saved["config"]["repeat_offset"] = 1
    saved["runs"] = [{**run, "repeat": 1}]
    (tmp_path / "c" / "results.json").write_text(json.dumps(saved))
    merged = dp_ab.merge(cfg, [tmp_path / "a" / "results.json",
                               tmp_path / "c" / "results.json"])
    assert merged["config"]["extra_serve_args"] == ["--num-gpu-blocks-override=6144"]
    assert (merged["config"]["repeats"], merged["config"]["repeat_offset"]) == (2, 0)
    assert merged["summary"]["random@inf"]["stock"]["n"] == 2


def test_bad_rates_and_an_empty_plan_are_refused(dp_ab, capsys):
    for rates in ("0", "-1", "nan", "fast"):
        with pytest.raises(SystemExit):
            dp_ab.parse_args(["--rates", rates])
        assert "--rates" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dp_ab.parse_args(["--rates=", "--random-rates=", "--hot-rates="])
    assert "nothing to run" in capsys.readouterr().err
    assert dp_ab.parse_args(["--rates", "8, inf"]).rates == [8.0, math.inf]
    assert dp_ab.main(["--model", "dummy:no-such-shape", "--merge", "x.json"]) == 2
    assert "dp_ab:" in capsys.readouterr().err


@pytest.mark.vllm
def test_replay_runs_the_same_ab_on_simulated_engines(dp_ab, tmp_path, model_dir):
    from asyncbatch.bench.models import ModelSpec

    shape = dp_ab.Shape(groups=6, members=4, prefix_len=128, suffix_len=16, output_len=4,
                        vocab=1000)
    cfg = dp_ab.Config(model=ModelSpec(str(tmp_path), None, True), out=tmp_path / "out",
                       shape=shape, rates=[100.0, math.inf], random_rates=[], hot_rates=[],
                       variants=["stock", "asyncbatch", "asyncbatch-noseats"],
                       max_num_seqs=12, max_model_len=1024)
    result = dp_ab.replay_all(cfg, dp_ab.ReplaySettings(num_kv_blocks=256, api_servers=1),
                              progress=lambda m: None)
    section = result["summary"]["prefix@100"]  # members arrive after their prefix is cached
    assert section["asyncbatch"]["computed_prompt_tokens"] < \
        section["stock"]["computed_prompt_tokens"]
    assert all(r["completed"] == 24 for r in result["runs"])
    runs = {r["variant"]: r for r in result["runs"] if math.isinf(r["rate"])}
    # 24 requests at once on two engines of 12 seats: the seats keep both at 12
    assert sorted(e["requests"] for e in runs["asyncbatch"]["engines"].values()) == [12, 12]
    text = (tmp_path / "out" / "summary.md").read_text()
    assert text.startswith("# Data-parallel A/B: prefix routing vs vLLM's balancing (SIMULATED)")
    # the replay's own model and one run per point, not the command line's
    assert str(tmp_path) not in text and "the engines are simulated" in text
    assert result["config"]["repeats"] == 1 and result["config"]["model"]["path"] != str(tmp_path)
    with pytest.raises(dp_ab.BenchError, match="only\\s+with --replay"):
        dp_ab.run_all(dp_ab.Config(model=cfg.model, out=tmp_path / "gpu",
                                   variants=["asyncbatch-noseats"]),
                      server_cmd=lambda v, p: [], env={})


@pytest.mark.vllm
def test_replay_has_the_gpu_runs_api_servers(dp_ab, tmp_path, model_dir):
    """By default the replay has as many API servers as the GPU runs (vLLM's
    default, one per engine), each its own front end; asyncbatch-nonewkey is
    the routing without the new-key slack."""
    from asyncbatch.bench.models import ModelSpec

    shape = dp_ab.Shape(groups=4, members=4, prefix_len=64, suffix_len=16, output_len=4,
                        vocab=1000)
    cfg = dp_ab.Config(model=ModelSpec(str(tmp_path), None, True), out=tmp_path / "out",
                       shape=shape, rates=[math.inf], random_rates=[math.inf], hot_rates=[],
                       variants=["stock", "asyncbatch", "asyncbatch-nonewkey"],
                       max_num_seqs=12, max_model_len=1024)
    assert dp_ab.replay_api_servers(cfg, dp_ab.ReplaySettings()) == 2
    assert dp_ab.replay_api_servers(cfg, dp_ab.ReplaySettings(api_servers=3)) == 3
    routes = [dp_ab.replay_route("asyncbatch-nonewkey", cfg, 2),
              dp_ab.replay_route("asyncbatch", cfg, 2)]
    assert [r.router.new_key_slack for r in routes] == [None, dp_ab.DEFAULT_NEW_KEY_SLACK]
    assert all(r.client_count == 2 for r in routes)
    result = dp_ab.replay_all(cfg, dp_ab.ReplaySettings(num_kv_blocks=256),
                              progress=lambda m: None)
    assert result["config"]["replay"]["api_servers"] == 2
    assert all(r["completed"] == 16 for r in result["runs"])


def test_gpu_busy_sampling_decides_the_hot_prefix_check(dp_ab):
    import time

    from asyncbatch.bench.online import free_port

    with dp_ab.GaugeSampler(free_port(), 0.01, lambda: [50.0, 80.0]) as sampler:
        time.sleep(0.2)
    assert sampler.mean_gpu_busy() == {"0": 50.0, "1": 80.0}
    section = {"asyncbatch": {"imbalance_gpu_busy": 1.6, "imbalance_requests": 1.0,
                              "imbalance_computed_tokens": 1.0}}
    checks = dp_ab.checks({"hot@inf": section})
    assert checks == {"hot@inf busiest engine <= 1.3x (GPU busy)": {"value": 1.6,
                                                                    "pass": False}}
    section["asyncbatch"]["imbalance_gpu_busy"] = math.nan
    assert list(dp_ab.checks({"hot@inf": section})) == [
        "hot@inf busiest engine <= 1.3x (requests, tokens computed)"]


def test_merge_keeps_replay_runs_apart_and_medians_skip_missing_values(dp_ab, tmp_path):
    from asyncbatch.bench.models import ModelSpec

    def run(variant, busy, simulated):
        return {"variant": variant, "workload": "hot", "rate": math.inf, "repeat": 0,
                "num_requests": 4, "completed": 4, "request_throughput": 1.0,
                "output_throughput": 1.0, "ttft_p50_ms": 1.0, "ttft_p99_ms": 1.0,
                "prefix_cache_hits": 1.0, "computed_prompt_tokens": 1.0,
                "imbalance_requests": 1.0, "imbalance_computed_tokens": 1.0,
                "imbalance_mean_load": 1.0, "imbalance_gpu_busy": busy, "engines": {},
                **({"simulated": True} if simulated else {})}

    replay = tmp_path / "replay"
    replay.mkdir()
    (replay / "results.json").write_text(json.dumps({
        "config": {"replay": {"calibration": "c.json", "num_kv_blocks": 64, "publish_s": 0.1},
                   "dp": 2, "model": {"path": "m", "load_format": "dummy"}, "shape": {},
                   "order": []},
        "runs": [run("asyncbatch-noseats", 1.2, True), run("stock", 1.0, True)]}))
    gpu = tmp_path / "gpu"
    gpu.mkdir()
    # one GPU run sampled NVML, another (an older file) did not
    (gpu / "runs-partial.json").write_text(json.dumps(
        [run("asyncbatch", 1.5, False), {**run("asyncbatch", 0, False),
                                         "imbalance_gpu_busy": float("nan")}]))
    cfg = dp_ab.Config(model=ModelSpec(str(tmp_path), None, True), out=tmp_path / "out")
    merged = dp_ab.merge(cfg, [replay / "results.json"])
    assert merged["config"]["variants"] == ["stock", "asyncbatch-noseats"]
    assert "(SIMULATED)" in (tmp_path / "out" / "summary.md").read_text()
    assert all(r["source"] == "replay/results.json" for r in merged["runs"])
    with pytest.raises(dp_ab.BenchError, match="replay"):
        dp_ab.merge(cfg, [replay / "results.json", gpu / "runs-partial.json"])
    merged = dp_ab.merge(cfg, [gpu / "runs-partial.json"])
    assert merged["summary"]["hot@inf"]["asyncbatch"]["imbalance_gpu_busy"] == 1.5


def test_the_imbalance_panel_reads_what_the_hot_check_reads(dp_ab):
    row = {"imbalance_gpu_busy": 1.1, "imbalance_requests": 1.5,
           "imbalance_computed_tokens": 1.2}
    assert dp_ab._panel_value(row, "imbalance_gpu_busy") == 1.1
    row["imbalance_gpu_busy"] = math.nan  # not sampled
    assert dp_ab._panel_value(row, "imbalance_gpu_busy") == 1.5
    row["imbalance_computed_tokens"] = 1.7
    assert dp_ab._panel_value(row, "imbalance_gpu_busy") == 1.7
    assert dp_ab._panel_value({"request_throughput": 3}, "request_throughput") == 3.0
    assert math.isnan(dp_ab._panel_value({}, "ttft_p50_ms"))

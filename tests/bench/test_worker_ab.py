# SPDX-License-Identifier: Apache-2.0
"""benchmarks/worker_ab.py without a GPU: its variants and its result file."""

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def worker_ab():
    spec = importlib.util.spec_from_file_location("worker_ab", ROOT / "benchmarks/worker_ab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variants(worker_ab):
    assert worker_ab.engine_args("async") == {"distributed_executor_backend": "mp", "seed": 0}
    deep = worker_ab.engine_args("depth3")
    assert deep["worker_cls"] == "asyncbatch.Worker"
    assert deep["additional_config"] == {"asyncbatch": {"policy": "fcfs", "pipeline_depth": 3}}
    vllm_graphs = worker_ab.engine_args("depth2-cg512")["additional_config"]["asyncbatch"]
    assert vllm_graphs == {"policy": "fcfs", "pipeline_depth": 2, "cuda_graph_max_tokens": 0}
    stock_graphs = worker_ab.engine_args("async+cg1024")
    assert stock_graphs["compilation_config"] == {"max_cudagraph_capture_size": 1024}
    assert "worker_cls" not in stock_graphs
    plain = worker_ab.engine_args("depth2-cg512-nofast")["additional_config"]["asyncbatch"]
    assert plain == {"policy": "fcfs", "pipeline_depth": 2, "cuda_graph_max_tokens": 0,
                     "decode_fast_path": False}
    slow_output = worker_ab.engine_args("depth3-nofastout")["additional_config"]["asyncbatch"]
    assert slow_output == {"policy": "fcfs", "pipeline_depth": 3, "decode_fast_output": False}
    alone = worker_ab.engine_args("sched+cg1024")
    assert alone["scheduler_cls"] == "asyncbatch.Scheduler" and "worker_cls" not in alone
    assert alone["additional_config"] == {"asyncbatch": {"policy": "fcfs"}}
    assert alone["compilation_config"] == {"max_cudagraph_capture_size": 1024}
    for bad in ("sync", "depth3-fast", "depthx"):
        with pytest.raises(SystemExit, match="unknown variant"):
            worker_ab.engine_args(bad)


def test_switch_interval_suffix(worker_ab):
    assert worker_ab.switch_interval_us("depth3") is None
    assert worker_ab.switch_interval_us("depth3~sw200") == 200
    assert worker_ab.switch_interval_us("async+cg1024~sw50") == 50
    # the suffix changes no engine argument
    assert worker_ab.engine_args("async+cg1024~sw50") == worker_ab.engine_args("async+cg1024")
    assert worker_ab.engine_args("depth3~sw200") == worker_ab.engine_args("depth3")
    for bad in ("depth3~sw", "depth3~sw0", "depth3~swfast"):
        with pytest.raises(SystemExit, match="unknown variant"):
            worker_ab.switch_interval_us(bad)


def test_sitecustomize_sets_the_switch_interval(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "ASYNCBATCH_SWITCH_INTERVAL_US": "250",
           "PYTHONPATH": str(ROOT / "benchmarks/stack_sampling")}
    env.pop("ASYNCBATCH_STACK_SAMPLES", None)
    out = subprocess.run([sys.executable, "-c", "import sys; print(sys.getswitchinterval())"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert float(out) == pytest.approx(250e-6)


def run(order, variant, tps, tokens, sync=False):
    return {"order": order, "variant": variant, "output_tok_s": tps, "nvml_util_steady": 70.0,
            "sync_check": sync, "parity_tokens": tokens}


def test_result_is_written_after_every_run(worker_ab, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "test GPU")
    a = argparse.Namespace(shape="llama-1b", num_prompts=10, input_len=4, output_len=2)
    path = tmp_path / "r.json"
    variants = ["async", "depth3"]
    runs = [run(0, "async", 100.0, [[1, 2]]), run(1, "depth3", 120.0, [[1, 3]])]
    doc = worker_ab.write_result(path, a, variants, runs[:1], complete=False)
    assert json.loads(path.read_text()) == doc
    assert not doc["complete"] and list(doc["summary"]) == ["async"]
    assert doc["summary"]["async"]["ratio_vs_async"] == 1.0

    runs.append(run(2, "depth3", 140.0, [[1, 2]]))
    doc = worker_ab.write_result(path, a, variants, runs, complete=True)
    assert doc["complete"] and doc["summary"]["depth3"]["runs"] == 2
    assert doc["summary"]["depth3"]["ratio_vs_async"] == pytest.approx(1.3)
    assert doc["parity_mismatches"] == {"1-depth3": [0]}  # the one run whose tokens differ
    assert all("parity_tokens" not in r for r in doc["runs"])
    assert doc["short_runs"] == []  # no --min-timed-s


def test_run_plan_continues_the_alternation(worker_ab):
    first = [v for v, _ in worker_ab.run_plan(["a", "b"], 2)]
    rest = [v for v, _ in worker_ab.run_plan(["a", "b"], 2, offset=2, sync_check=True)]
    assert first == ["a", "b", "b", "a"] and rest == ["a", "b", "b", "a", "b"]
    assert worker_ab.run_plan(["a", "b"], 1, offset=1) == [("b", {}), ("a", {})]
    assert worker_ab.run_plan(["a"], 1, sync_check=True)[-1] == (
        "a", {"VLLM_GPU_SYNC_CHECK": "error"})


def test_short_timed_runs_are_flagged(worker_ab, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "test GPU")
    a = argparse.Namespace(shape="llama-1b", num_prompts=10, input_len=4, output_len=2,
                           min_timed_s=30.0, repeat_offset=2)
    runs = [run(0, "async", 100.0, [[1]]), run(1, "depth3", 120.0, [[1]])]
    runs[0]["elapsed_s"], runs[1]["elapsed_s"] = 31.0, 29.5
    doc = worker_ab.write_result(tmp_path / "r.json", a, ["async", "depth3"], runs,
                                 complete=True)
    assert doc["short_runs"] == ["1-depth3"]
    assert doc["min_timed_s"] == 30.0 and doc["repeat_offset"] == 2


def test_allocator_probe_reads_torch_counters(worker_ab, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "memory_stats",
                        lambda: {"num_alloc_retries": 3, "num_device_alloc": 40, "other": 1})
    stats = worker_ab._worker_allocator_stats(None)
    assert stats["num_alloc_retries"] == 3 and stats["num_device_alloc"] == 40
    assert stats["num_ooms"] == 0 and "other" not in stats


def test_pool_results(worker_ab, tmp_path):
    def doc(runs, shape="llama-1b"):
        return {"shape": shape, "workload": {"num_prompts": 10}, "runs": runs}

    def timed(variant, tps, util, sync=False):
        return {"variant": variant, "output_tok_s": tps, "nvml_util_steady": util,
                "sync_check": sync}

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(doc([timed("async", 100.0, 60.0), timed("depth3", 130.0, 80.0),
                                 timed("depth3", 126.0, 79.0), timed("async", 104.0, 62.0),
                                 timed("depth3", 1.0, 1.0, sync=True)])))
    b.write_text(json.dumps(doc([timed("async", 90.0, 58.0), timed("depth3", 120.0, 88.0)])))
    pooled = worker_ab.pool_results([a, b], "async")
    rows = pooled["variants"]
    assert rows["async"]["runs"] == 3 and rows["async"]["output_tok_s_median"] == 100.0
    # the sync-check run is left out
    assert rows["depth3"]["runs"] == 3 and rows["depth3"]["output_tok_s_median"] == 126.0
    assert rows["depth3"]["output_tok_s_range"] == [120.0, 130.0]
    assert rows["depth3"]["nvml_util_steady_range"] == [79.0, 88.0]
    assert rows["depth3"]["ratio_vs_baseline"] == pytest.approx(1.26)
    table = worker_ab.format_pool(pooled)
    assert "| depth3 | 3 | 126 (120..130) | 79-88 | 1.260 |" in table

    with pytest.raises(SystemExit, match="no timed run of 'stock'"):
        worker_ab.pool_results([a], "stock")
    c = tmp_path / "c.json"
    c.write_text(json.dumps(doc([timed("async", 1.0, 1.0)], shape="llama-8b")))
    with pytest.raises(SystemExit, match="different shapes"):
        worker_ab.pool_results([a, c], "async")


def test_pool_refuses_what_would_mislead(worker_ab, tmp_path):
    run = {"variant": "async", "output_tok_s": 100.0, "nvml_util_steady": 60.0}
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps({"shape": "llama-1b", "workload": {}, "runs": [run],
                                "parity_mismatches": {}}))
    bad.write_text(json.dumps({"shape": "llama-1b", "workload": {}, "runs": [run],
                               "parity_mismatches": {"depth3": [3]}}))
    with pytest.raises(SystemExit, match="same file given twice"):
        worker_ab.pool_results([good, tmp_path / "." / "good.json"], "async")
    with pytest.raises(SystemExit, match="greedy outputs differed"):
        worker_ab.pool_results([good, bad], "async")
    assert worker_ab.pool_results([good], "async")["variants"]["async"]["runs"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--variants", "async,bogus"], "unknown variant 'bogus'"),
    (["--variants", "async,async+cgX"], "unknown variant 'async+cgX'"),
    (["--variants", "async,async"], "each variant once"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--num-prompts", "-5"], "--num-prompts must be >= 1"),
    (["--pool", "missing.json"], "not a readable result file"),
])
def test_bad_input_stops_before_any_engine_starts(argv, message, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/worker_ab.py"), *argv,
                           "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.glob("*.json"))


def test_a_run_past_its_timeout_is_killed_with_its_children(worker_ab, tmp_path):
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys, time; "
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); "
              "time.sleep(60)")
    t0 = time.monotonic()
    rc = worker_ab.run_child([sys.executable, "-c", script], tmp_path / "run.log", 3.0, {})
    assert rc is None and time.monotonic() - t0 < 30
    assert "started" in (tmp_path / "run.log").read_text()
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # the grandchild (an engine process) went with the session
        alive = subprocess.run(["ps", "-o", "stat=", "-p", str(grandchild)],
                               capture_output=True, text=True).stdout.strip()
        if not alive or alive.startswith("Z"):
            break
        time.sleep(0.1)
    assert not alive or alive.startswith("Z")
    assert worker_ab.run_child([sys.executable, "-c", "raise SystemExit(3)"],
                               tmp_path / "b.log", 30.0, {}) == 3


def test_nvml_reads_the_gpu_the_engine_runs_on(worker_ab, monkeypatch):
    class FakeNvml:
        @staticmethod
        def nvmlDeviceGetHandleByIndex(i):
            return ("index", i)

        @staticmethod
        def nvmlDeviceGetHandleByUUID(u):
            return ("uuid", u)

    for visible, handle in (("", ("index", 0)), ("1", ("index", 1)), ("3,0", ("index", 3)),
                            ("GPU-ab12", ("uuid", "GPU-ab12"))):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert worker_ab.nvml_handle(FakeNvml) == handle


def test_grouped_variant_is_the_scheduler_with_its_defaults(worker_ab):
    grouped = worker_ab.engine_args("grouped")
    assert grouped == {"distributed_executor_backend": "mp", "seed": 0,
                       "scheduler_cls": "asyncbatch.Scheduler"}


def test_workloads(worker_ab):
    a = argparse.Namespace(num_prompts=7, input_len=5, output_len=3)
    assert worker_ab.parse_workload("random", a) == {
        "kind": "random", "num_prompts": 7, "input_len": 5, "output_len": 3}
    prompts, max_tokens = worker_ab.workload_prompts(worker_ab.parse_workload("random", a), 0)
    assert max_tokens == 3 and len(prompts) == 7 and {len(p) for p in prompts} == {5}

    w = worker_ab.parse_workload("prefix:groups=6,size=4,prefix=32,suffix=3,out=9", a)
    assert w == {"kind": "prefix", "groups": 6, "size": 4, "prefix": 32, "suffix": 3, "out": 9}
    assert worker_ab.parse_workload("prefix", a)["groups"] == 256
    prompts, max_tokens = worker_ab.workload_prompts(w, seed=1)
    assert max_tokens == 9 and len(prompts) == 24 and {len(p) for p in prompts} == {35}
    by_prefix: dict[tuple[int, ...], int] = {}
    for p in prompts:
        by_prefix[tuple(p[:32])] = by_prefix.get(tuple(p[:32]), 0) + 1
    assert sorted(by_prefix.values()) == [4] * 6  # 6 groups of 4
    first = [tuple(p[:32]) for p in prompts[:4]]
    assert len(set(first)) > 1  # interleaved, not group by group
    assert worker_ab.workload_prompts(w, seed=1) == (prompts, 9)  # same seed, same part
    assert worker_ab.workload_prompts(w, seed=2)[0] != prompts

    for bad in ("prefix:groups=0", "prefix:size", "prefix:width=3", "random:num_prompts=3",
                "sharegpt"):
        with pytest.raises(SystemExit):
            worker_ab.parse_workload(bad, a)


FAKE_ENGINE = '''
import json, sys, time
from pathlib import Path

spec = json.loads(Path(sys.argv[-1]).read_text())
variant = spec["variant"]
if variant == "dies":
    print("engine failed to start: out of memory"); sys.exit(3)
import os
info = {"variant": variant, "startup_s": 0.1, "num_gpu_blocks": 10,
        "worker_cuda_graph_max_tokens": 0, "util": spec["gpu_memory_utilization"],
        "switch_us": os.environ.get("ASYNCBATCH_SWITCH_INTERVAL_US"),
        "parity_tokens": [[1, 2, 3 if variant != "wrong" else 4]]}
tmp = Path(spec["ready"] + ".tmp"); tmp.write_text(json.dumps(info))
tmp.replace(spec["ready"])
if variant == "quits":
    print("engine core died"); sys.exit(5)
speed = {"async": 100.0, "depth3": 150.0, "wrong": 50.0, "depth3~sw200": 140.0}[variant]
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd.get("quit"):
        break
    seen = Path(spec["ready"] + ".seen")
    with open(seen, "a") as f:
        f.write(json.dumps(cmd["seed"]) + "\\n")
    result = {"output_tok_s": speed + cmd["seed"], "elapsed_s": 31.0, "nvml_util_steady": 50.0,
              "workload_kind": cmd["workload"]["kind"]}
    tmp = Path(cmd["result"] + ".tmp"); tmp.write_text(json.dumps(result))
    tmp.replace(cmd["result"])
'''


def resident_args(tmp_path, variants, **kw):
    return argparse.Namespace(shape="llama-1b", num_prompts=10, input_len=4, output_len=2,
                              out=tmp_path, repeats=2, repeat_offset=0, timeout=30,
                              gpu_memory_utilization=None, min_timed_s=30.0, **kw)


@pytest.fixture
def fake_engines(worker_ab, tmp_path, monkeypatch):
    import sys

    import torch

    script = tmp_path / "fake_engine.py"
    script.write_text(FAKE_ENGINE)
    monkeypatch.setattr(worker_ab, "serve_command", lambda spec: [sys.executable, str(script),
                                                                  str(spec)])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "test GPU")
    return tmp_path


def test_resident_parts_alternate_between_engines_started_once(worker_ab, fake_engines,
                                                               capsys):
    a = resident_args(fake_engines, ["async", "depth3"])
    variants = ["async", "depth3"]
    workloads = [(worker_ab.parse_workload("random", a), variants),
                 (worker_ab.parse_workload("prefix:groups=2,size=2", a), variants)]
    assert worker_ab.run_resident(a, "m", variants, workloads, "t") == 0
    for kind in ("random", "prefix"):
        doc = json.loads((fake_engines / f"worker-ab-llama-1b-{kind}-resident-t.json")
                         .read_text())
        assert doc["complete"] and doc["resident"] and doc["workload"]["kind"] == kind
        assert [(r["variant"], r["repeat"]) for r in doc["runs"]] == [
            ("async", 0), ("depth3", 0), ("depth3", 1), ("async", 1)]
        assert {r["workload_kind"] for r in doc["runs"]} == {kind}
        assert doc["parity_mismatches"] == {} and doc["short_runs"] == []
        # medians 100.5 and 150.5: part k of each variant had seed k
        assert doc["summary"]["depth3"]["ratio_vs_async"] == pytest.approx(150.5 / 100.5)
        assert all(r["util"] == 0.44 for r in doc["runs"])  # 0.88 over two engines
    # each engine started once and saw parts 0, 1 of each workload
    for v in ("async", "depth3"):
        assert (fake_engines / f".ready-t-{v}.json.seen").read_text().split() == [
            "0", "1", "0", "1"]
        assert not (fake_engines / f".ready-t-{v}.json").exists()
    assert "parity: identical" in capsys.readouterr().out


def test_resident_parity_mismatch_fails_the_command(worker_ab, fake_engines):
    a = resident_args(fake_engines, ["async", "wrong"], )
    a.repeats = 1
    rc = worker_ab.run_resident(a, "m", ["async", "wrong"],
                                [(worker_ab.parse_workload("random", a), ["async", "wrong"])],
                                "t")
    assert rc == 1
    doc = json.loads((fake_engines / "worker-ab-llama-1b-random-resident-t.json").read_text())
    assert doc["parity_mismatches"] == {"1-wrong": [0]}


def test_resident_engine_that_dies_is_reported(worker_ab, fake_engines):
    a = resident_args(fake_engines, ["async", "dies"])
    with pytest.raises(RuntimeError, match="dies: engine process exited .rc 3. during engine "
                                           "start(.|\n)*out of memory"):
        worker_ab.run_resident(a, "m", ["async", "dies"],
                               [(worker_ab.parse_workload("random", a), ["async", "dies"])],
                               "t")


def test_resident_workload_on_some_variants(worker_ab, fake_engines):
    variants = ["async", "depth3", "wrong"]
    name, names = worker_ab.split_variants("prefix:groups=2@async,depth3", variants)
    assert (name, names) == ("prefix:groups=2", ["async", "depth3"])
    assert worker_ab.split_variants("random", variants) == ("random", variants)
    for bad in ("random@async,stock", "random@async,async", "random@"):
        with pytest.raises(SystemExit, match="must be distinct and among"):
            worker_ab.split_variants(bad, variants)
    a = resident_args(fake_engines, variants)
    a.repeats = 1
    workloads = [(worker_ab.parse_workload("random", a), ["depth3", "async"])]
    assert worker_ab.run_resident(a, "m", variants, workloads, "t") == 0
    doc = json.loads((fake_engines / "worker-ab-llama-1b-random-resident-t.json").read_text())
    assert [r["variant"] for r in doc["runs"]] == ["depth3", "async"]
    assert list(doc["summary"]) == ["depth3", "async"]  # ratios against depth3
    assert doc["summary"]["async"]["ratio_vs_depth3"] == pytest.approx(100 / 150)
    # the third engine was started (it shares the GPU) but ran nothing
    assert all(r["util"] == pytest.approx(0.293) for r in doc["runs"])
    assert not (fake_engines / ".ready-t-wrong.json.seen").exists()


def test_resident_engine_that_dies_while_idle_is_reported(worker_ab, fake_engines):
    a = resident_args(fake_engines, ["async", "quits"])
    with pytest.raises(RuntimeError, match="quits: engine process exited .rc 5. (.|\n)*"
                                           "engine core died"):
        worker_ab.run_resident(a, "m", ["async", "quits"],
                               [(worker_ab.parse_workload("random", a), ["async", "quits"])],
                               "t")
    # nothing left behind but the logs
    assert not list(fake_engines.glob("*.spec.json")) and not list(fake_engines.glob(".part*"))


def test_resident_workloads_of_one_kind_get_a_file_each(worker_ab, fake_engines):
    variants = ["async", "depth3~sw200"]
    a = resident_args(fake_engines, variants)
    a.repeats = 1
    workloads = [(worker_ab.parse_workload("prefix:groups=2", a), variants),
                 (worker_ab.parse_workload("prefix:groups=3", a), variants)]
    assert worker_ab.run_resident(a, "m", variants, workloads, "t") == 0
    docs = [json.loads((fake_engines / f"worker-ab-llama-1b-prefix{n}-resident-t.json")
                       .read_text()) for n in (0, 1)]
    assert [d["workload"]["groups"] for d in docs] == [2, 3]
    # the ~swN suffix reaches the resident engine's processes, as it does a fresh run's
    sw = {r["variant"]: r["switch_us"] for r in docs[0]["runs"]}
    assert sw == {"async": None, "depth3~sw200": "200"}

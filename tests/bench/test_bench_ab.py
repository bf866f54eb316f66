# SPDX-License-Identifier: Apache-2.0
"""``asyncbatch-bench ab`` end to end on the CPU, vLLM's processes stood in for by
tests/bench/fake_vllm.py: both result sets and the summary, the --quick plan,
failures in either part, bad input refused before anything starts, and never a
process left behind."""

import json
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import pytest
from proc_support import alive

from asyncbatch.bench import offline, online
from asyncbatch.bench.ab import AbPlan
from asyncbatch.bench.cli import main

FAKE = str(Path(__file__).with_name("fake_vllm.py"))


class Fake:
    """Where the stand-in processes log their pids, and what the test made."""

    def __init__(self, tmp_path: Path):
        self.pids = tmp_path / "pids"
        self.res = tmp_path / "res"
        self.tmp = tmp_path / "tmp"  # work folders (logs) go here
        self.tmp.mkdir()

    def started(self, role: str | None = None) -> list[tuple[str, int, int]]:
        if not self.pids.exists():
            return []
        rows = [line.split() for line in self.pids.read_text().splitlines()]
        return [(r, int(p), int(c)) for r, p, c in rows if role in (None, r)]

    def assert_nothing_left(self) -> None:
        left = [(role, pid) for role, p, c in self.started() for pid in (p, c) if alive(pid)]
        assert not left, f"processes left running: {left}"

    def work_dirs(self) -> list[Path]:
        return list(self.tmp.iterdir())


@pytest.fixture
def fake(monkeypatch, tmp_path):
    monkeypatch.setattr(offline, "WORKER", [sys.executable, FAKE])
    monkeypatch.setattr(online, "VLLM_CLI", [sys.executable, FAKE])
    monkeypatch.setenv("ASYNCBATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FAKE_VLLM_PIDS", str(tmp_path / "pids"))
    monkeypatch.delenv("FAKE_VLLM_FAIL", raising=False)
    f = Fake(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(f.tmp))
    yield f
    f.assert_nothing_left()


def ab(capsys, fake, *argv):
    rc = main(["ab", "--result-dir", str(fake.res), "--no-progress", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def links(markdown: str) -> list[str]:
    return re.findall(r"\]\(([^)]+)\)", markdown)


def test_ab_quick_writes_both_parts_and_a_summary_that_links_them(fake, capsys):
    rc, out, err = ab(capsys, fake, "--quick")
    assert rc == 0, err
    # the plan is printed before the first process starts
    assert "6 engine processes" in err and "4 servers" in err and "expected: 16 min" in err
    assert err.index("plan") < err.index("[1/2] offline") < err.index("[2/2] online")

    summaries = list(fake.res.glob("ab-llama-1b-*.md"))
    assert len(summaries) == 1
    stamp = summaries[0].stem.removeprefix("ab-llama-1b-")
    for mode in ("offline", "online"):
        for ext in ("json", "md", "png"):
            assert (fake.res / mode / f"{mode}-llama-1b-{stamp}.{ext}").is_file()

    off = json.loads((fake.res / "offline" / f"offline-llama-1b-{stamp}.json").read_text())
    assert list(off["config"]["workloads"]) == ["replay-kv.num_groups=64",
                                                "random.num_requests=384"]
    order = [(r["variant"], r["repeat"]) for r in off["runs"]
             if r["workload"] == "random.num_requests=384"]
    assert order == [("sync", 0), ("async", 0), ("asyncbatch", 0),
                     ("asyncbatch", 1), ("async", 1), ("sync", 1)]
    assert {r["num_requests"] for r in off["runs"]} == {512, 384}
    assert all(0 <= r["exit_s"] < 30 for r in off["runs"])  # exit of the process group

    on = json.loads((fake.res / "online" / f"online-llama-1b-{stamp}.json").read_text())
    assert on["config"]["variants"] == ["async", "asyncbatch"]  # sync left out by --quick
    assert on["config"]["duration_s"] == 15.0
    # each rate gets ~15 s of requests: 8 req/s x 15 s, 32 req/s x 15 s (whole groups of 8)
    assert on["config"]["requests_per_run"] == {"replay-kv@8rps": 120, "replay-kv@32rps": 480}
    assert sorted({r["num_prompts"] for r in on["runs"]}) == [120, 480]
    assert [(r["variant"], r["repeat"]) for r in on["runs"]][::2] == [
        ("async", 0), ("asyncbatch", 0), ("asyncbatch", 1), ("async", 1)]
    raw = fake.res / "online" / "vllm-bench" / f"online-llama-1b-{stamp}"
    assert len(list(raw.glob("*.json"))) == 8

    text = summaries[0].read_text()
    assert len(links(text)) == 6
    for link in links(text):
        assert (summaries[0].parent / link).is_file(), link
    assert "left out: sync" in text and "online leaves out sync" in text
    rows = [line for line in text.splitlines() if line.startswith("| o")]
    assert rows[0].startswith("| offline: `vllm.LLM`, a fresh process per run | sync, async, "
                              "asyncbatch (2 runs each, ABBA) | replay-kv.num_groups=64, "
                              "random.num_requests=384 | 6 engines, start median 1.0 s, "
                              "exit median ")
    assert rows[1].startswith("| online: `vllm serve` + `vllm bench serve` | async, asyncbatch "
                              "(2 runs each, ABBA); left out: sync | replay-kv at 8, 32 req/s, "
                              "~15 s per rate | 4 servers, start median ")
    # every verdict of both result sets, as their own summaries state it
    verdicts = []
    for mode, result in (("offline", off), ("online", on)):
        for workload, by_variant in result["summary"].items():
            for variant, entry in by_variant.items():
                if variant != "async":
                    m = entry["output_throughput"]
                    verdicts.append(m["verdict"])
                    assert (f"| {mode} | {workload} | {variant} | {m['ratio_vs_async']:.3f} "
                            f"{m['verdict']} |") in text
    assert len(verdicts) == 2 * 2 + 2  # offline: 2 workloads x 2 variants; online: 2 rates
    assert "| online | replay-kv@32rps | asyncbatch | 1.010 better | 1.000 same |" in text
    assert "- **sync** against async: output tok/s: 2 worse (of 2)" in text
    assert re.search(r"- \*\*asyncbatch\*\* against async: output tok/s: .*\(of 4\); "
                     r"TTFT p50 \(online\): 2 same \(of 2\)", text)
    assert "Fake GPU" in text and re.search(r"Command: `asyncbatch-bench ab .*--quick`", text)
    assert "summary: " in out and str(summaries[0]) in out

    assert len(fake.started("worker")) == 6 and len(fake.started("serve")) == 4
    assert fake.work_dirs() == []  # logs dropped after a success


def test_ab_offline_failure_is_clear_and_starts_no_server(fake, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_FAIL", "worker:asyncbatch")
    rc, out, err = ab(capsys, fake, "--model", "dummy:tiny", "--variants", "async,asyncbatch")
    assert rc == 2
    assert "ab: error: the offline part failed, so the online part was not started" in err
    assert "exited with code 1" in err and "worker asyncbatch failed (fake)" in err
    assert [r for r, _, _ in fake.started()] == ["worker", "worker"]  # async ran, then this
    assert not fake.started("serve")
    fake.assert_nothing_left()
    assert not (fake.res / "online").exists() and not list(fake.res.glob("ab-*.md"))
    logs = fake.work_dirs()
    assert len(logs) == 1 and str(logs[0]) in err  # kept after a failure, and named
    shutil.rmtree(logs[0])


def test_ab_online_failure_keeps_the_offline_results_and_stops_the_server(fake, capsys,
                                                                          monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_FAIL", "bench:asyncbatch")
    rc, _, err = ab(capsys, fake, "--model", "dummy:tiny", "--variants", "async,asyncbatch",
                    "--request-rates", "4", "--name", "t")
    assert rc == 2
    assert "the online part failed" in err and "bench asyncbatch failed (fake)" in err
    assert len(fake.started("serve")) == 2  # the async server, then the failing one's
    fake.assert_nothing_left()
    assert (fake.res / "offline" / "t-offline.json").is_file()
    assert not (fake.res / "online" / "t-online.json").exists()
    summary = (fake.res / "t.md").read_text()
    assert "**The online part failed**" in summary and "| offline | random |" in summary
    shutil.rmtree(fake.work_dirs()[0])


def _sharegpt(tmp_path: Path) -> str:
    path = tmp_path / "sg.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": "a b c d e"},
                                                   {"from": "gpt", "value": "f g h i j"}]}]))
    return f"sharegpt:path={path}"


@pytest.mark.parametrize("argv, message", [
    (["-w", "nope"], "unknown workload 'nope'"),
    (["--online-workload", "nope"], "unknown workload 'nope'"),
    (["--online-workload", "SHAREGPT"], "online runs take random and prefix-shared"),
    (["--model", "MISSING"], "does not exist"),
    (["--online-variants", "async,turbo"], "unknown variant(s) turbo"),
    (["--variants", "sync", "--quick"], "no variant left for the online part"),
    (["--repeats", "1"], "at least 2"),
    (["--request-rates", "8,fast"], "--request-rates wants numbers"),
    (["--duration", "-5"], "--duration must be 0 or more"),
])
def test_ab_refuses_bad_input_before_anything_starts(fake, capsys, tmp_path, argv, message):
    argv = [a.replace("SHAREGPT", _sharegpt(tmp_path)).replace("MISSING", str(tmp_path / "m"))
            for a in argv]
    if "--model" not in argv:
        argv += ["--model", "dummy:tiny"]
    rc, _, err = ab(capsys, fake, *argv)
    assert rc == 2 and "asyncbatch-bench ab: error:" in err and message in err
    assert not fake.started() and not fake.work_dirs() and not fake.res.exists()


def test_ab_refuses_a_port_in_use_before_the_offline_part(fake, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rc, _, err = ab(capsys, fake, "--model", "dummy:tiny", "--port", str(port))
    assert rc == 2 and f"port {port}" in err and "already in use" in err
    assert not fake.started() and not fake.work_dirs()


def test_quick_plan_and_its_expected_duration():
    plan = AbPlan(model="llama-1b", offline_variants=["sync", "async", "asyncbatch"],
                  online_variants=["async", "asyncbatch"],
                  offline_workloads=["replay-kv.num_groups=64", "random.num_requests=384"],
                  online_workloads=["replay-kv"], repeats=2, request_rates=[8.0, 32.0],
                  duration_s=15.0, offline_run_s=6.0)
    assert (plan.engine_processes, plan.servers, plan.bench_runs) == (6, 4, 8)
    # 6 engines, 4 servers; offline 6 x 2 x (6 + 0.5) s; online 8 x (25 + 15 + 1) s
    assert plan.estimate_s(30.0, 90.0) == pytest.approx(6 * 30 + 4 * 90 + 78 + 328)
    # 6 x 45 + 4 x 80 + 406 = 996 s; 6 x 70 + 4 x 150 + 406 = 1426 s
    assert "16 min 36 s to 23 min 46 s" in plan.describe()
    unknown = AbPlan(model="m", offline_variants=["async"], online_variants=["async"],
                     offline_workloads=["random"], online_workloads=["random"], repeats=2,
                     request_rates=[8.0], duration_s=15.0)
    assert unknown.estimate_s(30.0, 90.0) is None and "expected" not in unknown.describe()

# SPDX-License-Identifier: Apache-2.0
"""A/B statistics: ABBA order, median and spread, the "within noise" verdict, tables."""

import json

import pytest

from asyncbatch.bench.report import format_table, summarize_runs
from asyncbatch.bench.stats import WITHIN_NOISE, abba_order, ratio, summarize, verdict


def test_abba_order():
    assert abba_order(["a", "b"], 2) == [("a", 0), ("b", 0), ("b", 1), ("a", 1)]
    order = abba_order(["s", "a", "x"], 3)
    assert [v for v, _ in order] == ["s", "a", "x", "x", "a", "s", "s", "a", "x"]
    for v in "sax":
        assert [k for w, k in order if w == v] == [0, 1, 2]


def test_abba_order_offset_continues_the_series():
    whole = abba_order(["a", "b", "c"], 4)
    parts = [abba_order(["a", "b", "c"], 1, k) for k in range(4)]
    assert [x for part in parts for x in part] == whole
    assert abba_order(["a", "b", "c"], 2, 2) == whole[6:]
    with pytest.raises(ValueError, match="offset"):
        abba_order(["a"], 1, -1)


@pytest.mark.parametrize("variants, repeats", [([], 2), (["a"], 0), (["a", "a"], 2)])
def test_abba_order_rejects_bad_input(variants, repeats):
    with pytest.raises(ValueError):
        abba_order(variants, repeats)


def test_summary_median_and_spread():
    s = summarize([3.0, 1.0, 2.0, 10.0])
    assert s.median == 2.5 and s.min == 1.0 and s.max == 10.0 and s.spread == 9.0
    assert s.fmt(1) == "2.5 (1.0..10.0)"
    assert summarize([4.0]).fmt(2) == "4.00"


def test_verdicts():
    base = summarize([100.0, 110.0])
    assert verdict(summarize([105.0, 112.0]), base) == WITHIN_NOISE
    assert verdict(summarize([130.0, 135.0]), base) == "better"
    assert verdict(summarize([80.0, 85.0]), base) == "worse"
    # lower is better (latency)
    assert verdict(summarize([80.0, 85.0]), base, higher_is_better=False) == "better"
    # a wide spread hides a large difference of medians
    assert verdict(summarize([100.0, 200.0]), base) == WITHIN_NOISE
    # one measured run against a measured baseline has no spread to compare
    assert verdict(summarize([150.0]), base) == WITHIN_NOISE
    # deterministic simulation: one run each, any difference is real
    assert verdict(summarize([101.0]), summarize([100.0])) == "better"
    assert verdict(summarize([100.0]), summarize([100.0])) == "same"
    assert ratio(summarize([150.0]), summarize([100.0])) == 1.5


def _runs(values):
    return [{"workload": "w", "variant": v, "repeat": k, "output_throughput": x,
             "elapsed_time": 1000 / x, "num_preemptions": 0, "prefix_cache_hit_rate": 0.5}
            for v, xs in values.items() for k, x in enumerate(xs)]


def test_table_has_every_variant_ratio_and_noise_verdict():
    runs = _runs({"async": [100.0, 110.0], "sync": [70.0, 72.0], "asyncbatch": [104.0, 109.0]})
    table = format_table(runs, title="t")
    lines = {line.split("|")[1].strip(): line for line in table.splitlines()
             if line.startswith("| ") and "variant" not in line}
    assert set(lines) == {"async", "sync", "asyncbatch"}
    assert "1.00 (baseline)" in lines["async"]
    assert "within noise" in lines["asyncbatch"]
    assert "worse" in lines["sync"]
    assert "105.0 (100.0..110.0)" in lines["async"]
    assert "50.0" in lines["async"]  # hit rate in percent
    assert "SIMULATED" in format_table(runs, title="t", simulated=True)
    summary = summarize_runs(runs)
    assert summary["w"]["sync"]["output_throughput"]["verdict"] == "worse"
    assert summary["w"]["asyncbatch"]["output_throughput"]["ratio_vs_async"] == pytest.approx(
        106.5 / 105.0)


def test_compare_rankings(tmp_path):
    from asyncbatch.bench.compare import compare

    sim = {"runs": _runs({"async": [100.0], "sync": [80.0], "asyncbatch": [100.0]})}
    gpu_same = {"runs": _runs({"async": [100.0, 104.0], "sync": [70.0, 75.0],
                               "asyncbatch": [103.0, 105.0]})}
    gpu_diff = {"runs": _runs({"async": [100.0, 104.0], "sync": [120.0, 125.0],
                               "asyncbatch": [101.0, 103.0]})}
    paths = {}
    for name, data in (("sim", sim), ("same", gpu_same), ("diff", gpu_diff)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(data))
    table, agree = compare(paths["sim"], paths["same"])
    assert agree and "within noise" in table and "DIFFERS" not in table
    table, agree = compare(paths["sim"], paths["diff"])
    assert not agree and "DIFFERS" in table


def _write(tmp_path, name, values):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"runs": _runs(values)}))
    return path


def test_compare_judges_the_replay_at_the_gpu_resolution(tmp_path):
    """A deterministic replay at 1.0004 reads "better"; the GPU run at 1.032 with a
    6% spread reads "within noise".  Neither can rank asyncbatch, so they agree
    (compared verdict by verdict they did not)."""
    from asyncbatch.bench.compare import compare

    gpu = _write(tmp_path, "gpu", {"async": [100.0, 104.0], "asyncbatch": [102.0, 108.5]})
    tiny = _write(tmp_path, "tiny", {"async": [100.0], "asyncbatch": [100.04]})
    table, agree = compare(tiny, gpu)
    row = next(line for line in table.splitlines() if "| asyncbatch |" in line)
    assert "1.000 better" in row and "1.032 within noise" in row
    assert "within noise (noise ±6.4%)" in row
    assert agree and "DIFFERS" not in table

    # a replay difference the GPU run would have resolved, but did not see
    large = _write(tmp_path, "large", {"async": [100.0], "asyncbatch": [110.0]})
    table, agree = compare(large, gpu)
    assert not agree and "better (noise ±6.4%)" in table and "DIFFERS" in table

    # the GPU run resolves a gain that the replay does not compute
    resolved = _write(tmp_path, "resolved", {"async": [100.0, 100.4],
                                             "asyncbatch": [104.0, 104.2]})
    table, agree = compare(tiny, resolved)
    assert not agree and "1.039 better" in table
    same = _write(tmp_path, "same", {"async": [100.0], "asyncbatch": [100.0]})
    assert not compare(same, resolved)[1]
    assert compare(_write(tmp_path, "gain", {"async": [100.0], "asyncbatch": [105.0]}),
                   resolved)[1]


def test_detect_cpu_reads_the_model_name(tmp_path):
    from asyncbatch.bench.report import detect_cpu

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\n"
                    "model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t: fpu\n")
    assert detect_cpu(info) == "Intel(R) Xeon(R) Platinum 8480+"
    # no model name line (some ARM kernels): falls back to what platform knows, never empty
    info.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")
    assert detect_cpu(info) not in ("", "Intel(R) Xeon(R) Platinum 8480+")
    assert detect_cpu(tmp_path / "missing")

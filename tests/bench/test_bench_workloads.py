# SPDX-License-Identifier: Apache-2.0
"""Workload generation: shapes, shuffling, determinism, bad input."""

import json

import pytest

from asyncbatch.bench.workloads import (
    PrefixSharedWorkload,
    RandomWorkload,
    WorkloadError,
    parse_workload,
    to_text,
    vllm_dataset_args,
    workload_label,
    write_custom_jsonl,
)


def test_random_shapes_and_token_range():
    reqs = RandomWorkload(num_requests=20, input_len=50, output_len=7).requests(vocab_size=100)
    assert len(reqs) == 20
    assert all(len(r.prompt_token_ids) == 50 and r.max_tokens == 7 for r in reqs)
    assert all(2 <= t < 100 for r in reqs for t in r.prompt_token_ids)
    assert len({r.request_id for r in reqs}) == 20


def test_random_range_ratio_varies_lengths_within_bounds():
    reqs = RandomWorkload(num_requests=200, input_len=100, output_len=10,
                          range_ratio=0.5).requests()
    lens = {len(r.prompt_token_ids) for r in reqs}
    assert min(lens) >= 50 and max(lens) <= 150 and len(lens) > 10


def test_prefix_shared_groups_share_exact_prefix():
    w = PrefixSharedWorkload(num_groups=3, group_size=4, prefix_len=32, suffix_len=8,
                             output_len=5, order="sorted")
    reqs = w.requests()
    assert [r.request_id for r in reqs[:4]] == ["g0m0", "g0m1", "g0m2", "g0m3"]
    for g in range(3):
        members = [r for r in reqs if r.request_id.startswith(f"g{g}m")]
        assert len(members) == 4
        assert len({tuple(r.prompt_token_ids[:32]) for r in members}) == 1
        assert len({tuple(r.prompt_token_ids[32:]) for r in members}) == 4
        assert all(len(r.prompt_token_ids) == 40 and r.max_tokens == 5 for r in members)
    prefixes = {tuple(r.prompt_token_ids[:32]) for r in reqs}
    assert len(prefixes) == 3


def test_shuffled_is_a_permutation_of_sorted():
    kw = dict(num_groups=6, group_size=5, prefix_len=16, suffix_len=4, output_len=2)
    s = PrefixSharedWorkload(order="sorted", **kw).requests()
    sh = PrefixSharedWorkload(order="shuffled", **kw).requests()
    assert [r.request_id for r in s] != [r.request_id for r in sh]
    assert sorted(r.request_id for r in s) == sorted(r.request_id for r in sh)
    by_id = {r.request_id: r for r in s}
    assert all(by_id[r.request_id] == r for r in sh)


def test_deterministic_by_seed():
    a = parse_workload("prefix-shared:num_groups=4,group_size=3,prefix_len=16,seed=7").requests()
    b = parse_workload("prefix-shared:num_groups=4,group_size=3,prefix_len=16,seed=7").requests()
    c = parse_workload("prefix-shared:num_groups=4,group_size=3,prefix_len=16,seed=8").requests()
    assert a == b
    assert a != c


def test_parse_presets_and_overrides():
    w = parse_workload("prefix-sorted:num_groups=2")
    assert isinstance(w, PrefixSharedWorkload) and w.order == "sorted" and w.num_groups == 2
    w = parse_workload("random:input-len=10,range_ratio=0.25")
    assert isinstance(w, RandomWorkload) and w.input_len == 10 and w.range_ratio == 0.25


@pytest.mark.parametrize("text, message", [
    ("nonsense", "known workloads: random, prefix-shared"),
    ("random:colour=red", "parameters: num_requests"),
    ("random:input_len=abc", "not a valid int"),
    ("random:input_len=0", "positive integer"),
    ("random:range_ratio=1.5", "range_ratio"),
    ("prefix-shared:order=backwards", "shuffled"),
    ("random:input_len", "bad workload parameter"),
    ("sharegpt", "local JSON file"),
    ("sharegpt:path=/nonexistent/x.json", "not found"),
])
def test_bad_input_is_a_clear_error(text, message):
    with pytest.raises(WorkloadError, match=message):
        parse_workload(text)


def test_sharegpt_from_local_file(tmp_path):
    convs = [
        {"conversations": [{"from": "human", "value": "hello there how are you today"},
                           {"from": "gpt", "value": "fine thanks and you my friend"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        {"conversations": [{"from": "human", "value": "hello there how is the weather"},
                           {"from": "gpt", "value": " ".join(["w"] * 50)}]},
        {"id": "no turns"},
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(convs))
    reqs = parse_workload(f"sharegpt:path={path},shuffle=false,max_output_len=20").requests()
    assert [r.max_tokens for r in reqs] == [6, 20]  # the too-short conversation is skipped
    assert [len(r.prompt_token_ids) for r in reqs] == [6, 6]
    # shared words give shared tokens: the two prompts start alike
    assert reqs[0].prompt_token_ids[:2] == reqs[1].prompt_token_ids[:2]
    assert reqs[0].prompt_token_ids[2:] != reqs[1].prompt_token_ids[2:]


def test_sharegpt_bad_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(WorkloadError, match="cannot read"):
        parse_workload(f"sharegpt:path={path}").requests()


def test_vllm_dataset_args_match_parameters():
    args = vllm_dataset_args(parse_workload("prefix-shared:num_groups=5,group_size=3"))
    flags = dict(zip(args[::2], args[1::2], strict=False))
    assert flags["--dataset-name"] == "prefix_repetition"
    assert flags["--num-prompts"] == "15"
    assert flags["--prefix-repetition-num-prefixes"] == "5"
    assert flags["--prefix-repetition-prefix-len"] == "1024"
    assert "--disable-shuffle" in vllm_dataset_args(parse_workload("prefix-sorted"))
    args = vllm_dataset_args(parse_workload("random:input_len=99"))
    assert args[args.index("--random-input-len") + 1] == "99"


def test_custom_jsonl_roundtrip(tmp_path):
    reqs = parse_workload("random:num_requests=3,input_len=4,output_len=2").requests()
    path = write_custom_jsonl(reqs, tmp_path / "d.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 3
    assert rows[0]["prompt"] == to_text(reqs[0].prompt_token_ids)
    assert [int(t[1:]) for t in rows[0]["prompt"].split()] == reqs[0].prompt_token_ids
    assert rows[0]["output_tokens"] == 2


def test_labels_are_distinct_for_distinct_parameters():
    assert workload_label("random") == "random"
    assert workload_label("random:input_len=5") != workload_label("random:input_len=6")
    assert workload_label("replay-kv:order=sorted,seed=2") == "replay-kv.order=sorted.seed=2"
    assert "/" not in workload_label("sharegpt:path=/data/sg.json")
    long = workload_label("random:" + ",".join(f"input_len={i}" for i in range(20)))
    assert len(long) < 30 and long.startswith("random-")


def test_online_runs_are_sized_by_rate_and_duration():
    from asyncbatch.bench.online import for_rate
    from asyncbatch.bench.workloads import resized

    kv = parse_workload("replay-kv")  # 16 groups x 8
    assert for_rate(kv, 8.0, 15.0).num_requests == 120
    assert for_rate(kv, 32.0, 15.0).num_groups == 60
    assert for_rate(kv, 5.0, 1.0).num_groups == 1  # whole groups: at least one
    sized = for_rate(kv, 32.0, 15.0)
    assert (sized.group_size, sized.prefix_len, sized.order) == (8, 512, "shuffled")
    assert for_rate(kv, float("inf"), 15.0) == kv  # all at once: as given
    assert for_rate(kv, 8.0, None) == kv
    rnd = for_rate(parse_workload("random:input_len=64"), 2.5, 3.0)
    assert rnd.num_requests == 8 and rnd.input_len == 64
    assert len(rnd.requests()) == 8
    with pytest.raises(WorkloadError):
        resized(kv, 0)

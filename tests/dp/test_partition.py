# SPDX-License-Identifier: Apache-2.0
"""asyncbatch.partition_by_prefix: whole groups per engine, balanced by token cost."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncbatch
from asyncbatch.dp.routing import prefix_key


def make_prompts(group_sizes: list[int], prefix_len: int, seed: int,
                 suffix_len: int = 20) -> tuple[list[list[int]], list[int]]:
    """Prompts of groups with the given sizes, interleaved; and each prompt's group."""
    rng = random.Random(seed)
    prompts, group_of = [], []
    for g, size in enumerate(group_sizes):
        prefix = [rng.randrange(2, 30000) for _ in range(prefix_len)]
        for _ in range(size):
            prompts.append(prefix + [rng.randrange(2, 30000) for _ in range(suffix_len)])
            group_of.append(g)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    return [prompts[i] for i in order], [group_of[i] for i in order]


def group_cost(members: list[list[int]], prefix_len: int) -> float:
    return prefix_len + sum(len(p) - prefix_len for p in members)


@given(st.lists(st.integers(1, 12), min_size=1, max_size=30), st.integers(1, 4),
       st.integers(0, 10**6))
@settings(max_examples=50, deadline=None)
def test_whole_groups_each_index_once_lpt_balance(sizes, n, seed):
    prefix_len = 80
    prompts, group_of = make_prompts(sizes, prefix_len, seed)
    parts = asyncbatch.partition_by_prefix(prompts, n, split_large_groups=False)
    assert len(parts) == n
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(len(prompts)))
    # whole groups: every group on exactly one engine, its members adjacent, in input order
    engine_of_group: dict[int, int] = {}
    for e, part in enumerate(parts):
        for i in part:
            assert engine_of_group.setdefault(group_of[i], e) == e
        runs = [group_of[i] for i in part]
        for g in set(runs):
            pos = [j for j, x in enumerate(runs) if x == g]
            assert pos == list(range(pos[0], pos[0] + len(pos)))
            assert [part[j] for j in pos] == sorted(part[j] for j in pos)
    # LPT: the costliest engine is within one group of the mean, and within
    # 4/3 - 1/(3n) of the best split (found by brute force for few groups)
    costs = [group_cost([prompts[i] for i in range(len(prompts)) if group_of[i] == g],
                        prefix_len) for g in range(len(sizes))]
    loads = [0.0] * n
    for g, e in engine_of_group.items():
        loads[e] += costs[g]
    mean = sum(costs) / n
    assert max(loads) <= mean + max(costs) + 1e-9
    if len(costs) <= 7:
        assert max(loads) <= (4 / 3 - 1 / (3 * n)) * best_split(costs, n) + 1e-9


def best_split(costs: list[float], n: int) -> float:
    import itertools

    best = float("inf")
    for assignment in itertools.product(range(n), repeat=len(costs)):
        loads = [0.0] * n
        for c, e in zip(costs, assignment, strict=True):
            loads[e] += c
        best = min(best, max(loads))
    return best


def test_a_group_larger_than_an_engines_share_is_split():
    # one group is about 3/4 of the work; two engines
    prefix_len = 100
    prompts, group_of = make_prompts([60, 5, 5, 5, 5], prefix_len, seed=1, suffix_len=200)
    whole = asyncbatch.partition_by_prefix(prompts, 2, split_large_groups=False)
    split = asyncbatch.partition_by_prefix(prompts, 2)

    def cost(part):  # the prefix of a group once per engine, every suffix
        return sum(len(prompts[i]) - prefix_len for i in part) + prefix_len * len(
            {group_of[i] for i in part})

    assert max(cost(p) for p in whole) / min(cost(p) for p in whole) > 2
    assert max(cost(p) for p in split) / min(cost(p) for p in split) < 1.1
    # the small groups still stay whole
    for g in range(1, 5):
        assert sum(any(group_of[i] == g for i in part) for part in split) == 1


def test_prompt_forms_and_output_order():
    shared = " ".join(f"w{i}" for i in range(200))
    prompts = [shared + " a", {"prompt": shared + " b"}, {"prompt_token_ids": list(range(2, 90))},
               list(range(2, 95)), "short"]
    parts = asyncbatch.partition_by_prefix(prompts, 2, output_tokens=[5, 5, 5, 5, 5],
                                           split_large_groups=False)
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(5))
    placed = {i: e for e, p in enumerate(parts) for i in p}
    assert placed[0] == placed[1]  # same text prefix
    assert placed[2] == placed[3]  # same token prefix
    # outputs come back in input order
    outputs = [[f"out{i}" for i in p] for p in parts]
    result: list[str | None] = [None] * len(prompts)
    for part, outs in zip(parts, outputs, strict=True):
        for i, o in zip(part, outs, strict=True):
            result[i] = o
    assert result == [f"out{i}" for i in range(5)]


def test_a_tokenizer_turns_text_into_tokens():
    class Tok:
        def encode(self, text):
            return [hash(w) % 1000 + 2 for w in text.split()]

    shared = " ".join(f"w{i}" for i in range(40))
    parts = asyncbatch.partition_by_prefix([shared + " x", "other " * 40, shared + " y"], 3,
                                           tokenizer=Tok(), split_large_groups=False)
    placed = {i: e for e, p in enumerate(parts) for i in p}
    assert placed[0] == placed[2]


def test_the_key_is_the_routing_key():
    a = list(range(2, 100))
    b = list(range(2, 100))
    b[70] = 5  # differs past the first 64 tokens: same key, same group
    assert prefix_key(a) == prefix_key(b)
    parts = asyncbatch.partition_by_prefix([a, b, list(range(500, 600))], 2,
                                           split_large_groups=False)
    placed = {i: e for e, p in enumerate(parts) for i in p}
    assert placed[0] == placed[1] != placed[2]


def test_bad_arguments():
    with pytest.raises(ValueError):
        asyncbatch.partition_by_prefix([[1] * 20], 0)
    with pytest.raises(ValueError):
        asyncbatch.partition_by_prefix([[1] * 20], 2, output_tokens=[1, 2])
    assert asyncbatch.partition_by_prefix([], 3) == [[], [], []]

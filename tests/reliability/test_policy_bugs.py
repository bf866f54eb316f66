# SPDX-License-Identifier: Apache-2.0
"""Regression tests for defects the reliability tests found in
`PrefixGroupingPolicy`, as minimal reproductions."""


from asyncbatch.policy import RequestView
from asyncbatch.policy.prefix import PrefixGroupingPolicy, StepState


def policy(**kwargs) -> PrefixGroupingPolicy:
    return PrefixGroupingPolicy(block_size=4, num_total_blocks=64, **kwargs)


def view(rid: str, root: str = "shared") -> RequestView:
    return RequestView(rid, 1000.0, 0, num_prompt_tokens=8, max_tokens=4,
                       block_hashes=(root, f"{rid}-1"))


def test_iter_yields_only_waiting_requests():
    p = policy()
    p.add(view("a"))
    assert p.pop() == "a"
    p.prepend(view("a"))  # preempted
    assert p.pop() == "a"  # admitted again
    p.prepend(view("a"))
    p.add(view("b", root="other"))
    p.remove("a")  # aborted while preempted
    assert list(p) == ["b"]


def test_no_dead_units_left_resident():
    p = policy()
    for rid in ("a", "b"):
        p.add(view(rid))
    p.pop()
    p.pop()
    assert len(p) == 0
    assert not p._resident


def test_overdue_admissions_counts_admissions():
    p = policy(max_wait_steps=1, decode_first=True)
    p.add(RequestView("old", 1000.0, 0, 64, 1, ()))
    p.add(RequestView("new", 1001.0, 0, 4, 64, ()))
    p.begin_step(StepState(10**9, [], now=0.0))
    assert p.pop() == "new"  # decode-heavy first: "old" is overtaken once
    p.end_step()
    for _ in range(3):  # "old" is overdue now, but KV allocation fails three times
        p.begin_step(StepState(10**9, [], now=0.0))
        assert p.peek() == "old"
        p.end_step()
    assert p.stats.num_overdue_admissions == 0

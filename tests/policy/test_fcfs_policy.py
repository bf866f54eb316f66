# SPDX-License-Identifier: Apache-2.0
"""The FCFS and priority policies against reference models (no torch, no vLLM)."""

import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncbatch.policy import FcfsPolicy, PriorityPolicy, RequestView, make_policy


def view(rid: str, arrival: float = 0.0, priority: int = 0) -> RequestView:
    return RequestView(rid, arrival, priority, num_prompt_tokens=8, max_tokens=4)


def drain(policy) -> list[str]:
    out = []
    while len(policy):
        assert policy.peek() == policy.peek()
        out.append(policy.pop())
    return out


def test_fcfs_order_prepend_and_remove():
    p = FcfsPolicy()
    for i in range(5):
        p.add(view(f"r{i}"))
    p.remove("r1")
    p.prepend(view("pre"))
    assert list(p) == ["pre", "r0", "r2", "r3", "r4"]
    assert len(p) == 5 and "r1" not in p and "r2" in p
    assert drain(p) == ["pre", "r0", "r2", "r3", "r4"]
    with pytest.raises(IndexError):
        p.peek()
    with pytest.raises(IndexError):
        p.pop()


def test_duplicate_and_unknown_ids_are_errors():
    for p in (FcfsPolicy(), PriorityPolicy()):
        p.add(view("a"))
        with pytest.raises(ValueError, match="already waiting"):
            p.add(view("a"))
        with pytest.raises(KeyError):
            p.remove("nope")


def test_removed_then_readded_id_is_not_resurrected_twice():
    p = FcfsPolicy()
    p.add(view("a"))
    p.add(view("b"))
    p.remove("a")
    p.add(view("a"))  # same id comes back later: must come out once, after b
    assert drain(p) == ["b", "a"]


def test_priority_matches_vllm_request_order():
    p = PriorityPolicy()
    p.add(view("late-urgent", arrival=5.0, priority=-1))
    p.add(view("b", arrival=1.0, priority=0))
    p.add(view("a", arrival=1.0, priority=0))
    p.prepend(view("preempted", arrival=0.5, priority=0))
    assert drain(p) == ["late-urgent", "preempted", "a", "b"]


def test_make_policy():
    assert isinstance(make_policy("fcfs", vllm_policy="fcfs"), FcfsPolicy)
    assert isinstance(make_policy("fcfs", vllm_policy="priority"), PriorityPolicy)
    with pytest.raises(ValueError, match="unknown"):
        make_policy("fcfs", vllm_policy="lottery")


ops = st.lists(
    st.tuples(st.sampled_from(["add", "prepend", "pop", "remove"]), st.integers(0, 30),
              st.integers(-2, 2)),
    max_size=300,
)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_fcfs_equals_a_plain_list(operations):
    """Lazy deletion and compaction never change what a plain list would do."""
    p, ref = FcfsPolicy(), []
    for op, i, _ in operations:
        rid = f"r{i}"
        if op in ("add", "prepend") and rid not in ref:
            (p.add if op == "add" else p.prepend)(view(rid))
            ref.append(rid) if op == "add" else ref.insert(0, rid)
        elif op == "pop" and ref:
            assert p.pop() == ref.pop(0)
        elif op == "remove" and rid in ref:
            p.remove(rid)
            ref.remove(rid)
        assert len(p) == len(ref)
        assert list(p) == ref


@settings(max_examples=200, deadline=None)
@given(ops)
def test_priority_equals_sorted_keys(operations):
    p, ref = PriorityPolicy(), {}
    for op, i, prio in operations:
        rid = f"r{i}"
        if op in ("add", "prepend") and rid not in ref:
            arrival = float(i % 7)
            (p.add if op == "add" else p.prepend)(view(rid, arrival, prio))
            ref[rid] = (prio, arrival, rid)
        elif op == "pop" and ref:
            best = min(ref.values())[2]
            assert p.pop() == best
            del ref[best]
        elif op == "remove" and rid in ref:
            p.remove(rid)
            del ref[rid]
        assert list(p) == [k[2] for k in sorted(ref.values())]


def test_policy_room_imports_no_torch_or_vllm():
    import subprocess

    code = (
        "import sys, asyncbatch, asyncbatch.policy, asyncbatch.config;"
        "bad = [m for m in ('torch', 'vllm') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

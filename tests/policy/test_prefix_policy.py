# SPDX-License-Identifier: Apache-2.0
"""The prefix-grouping policy on its own (no torch, no vLLM)."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncbatch.policy.prefix import KVForecast, PrefixGroupingPolicy, StepState
from asyncbatch.policy.views import RequestView

BS = 4


def view(rid, prefix=(), suffix_blocks=1, max_tokens=8, priority=0, arrival=0.0, extra=0):
    """A request whose first blocks are `prefix` (hash names) plus own blocks."""
    hashes = [f"{'/'.join(prefix[:i + 1])}" for i in range(len(prefix))]
    hashes += [f"{rid}#{i}" for i in range(suffix_blocks)]
    return RequestView(rid, arrival, priority, num_prompt_tokens=len(hashes) * BS + extra,
                       max_tokens=max_tokens, block_hashes=hashes)


def policy(**kw):
    kw.setdefault("block_size", BS)
    kw.setdefault("num_total_blocks", 1000)
    kw.setdefault("kv_headroom", 0.0)
    return PrefixGroupingPolicy(**kw)


def drain(p):
    out = []
    while len(p):
        out.append(p.pop())
    return out


def test_siblings_are_admitted_together_in_group_arrival_order():
    p = policy(decode_first=False)
    arrivals = ["a1", "b1", "a2", "c1", "b2", "a3"]
    for rid in arrivals:
        p.add(view(rid, prefix=(rid[0],)))
    assert drain(p) == ["a1", "a2", "a3", "b1", "b2", "c1"]


def test_min_shared_blocks_and_deeper_siblings_adjacent():
    p = policy(min_shared_blocks=2, decode_first=False)
    p.add(view("x1", prefix=("s", "x", "p")))
    p.add(view("y1", prefix=("s", "y")))
    p.add(view("x2", prefix=("s", "x", "q")))
    p.add(view("x3", prefix=("s", "x", "p")))
    p.add(view("short", prefix=("s",), suffix_blocks=0))
    order = drain(p)
    # s/x is one unit (x1 and x3 share s/x/p, so they are adjacent, in arrival
    # order); s/y another; "short" has a single block: a unit of one.
    assert order == ["x1", "x3", "x2", "y1", "short"]


def test_grouping_off_is_arrival_order():
    p = policy(grouping=False)
    for rid in ["a1", "b1", "a2"]:
        p.add(view(rid, prefix=(rid[0],)))
    assert drain(p) == ["a1", "b1", "a2"]


def test_preempted_first_lifo_like_vllm():
    p = policy()
    p.add(view("a1", prefix=("a",)))
    p.prepend(view("p1"))
    p.prepend(view("p2"))
    assert drain(p) == ["p2", "p1", "a1"]


def test_decode_heavy_unit_first():
    p = policy()
    p.add(view("long-prompt", prefix=("a",), suffix_blocks=20, max_tokens=4))
    p.add(view("chatty", prefix=("b",), suffix_blocks=1, max_tokens=64))
    assert drain(p) == ["chatty", "long-prompt"]


def test_resident_prefix_is_reused_first():
    cached = {"b"}
    p = policy(decode_first=False, is_cached=lambda h: h in cached)
    p.add(view("a1", prefix=("a",)))
    p.add(view("b1", prefix=("b",)))
    assert drain(p) == ["b1", "a1"]


def test_priority_semantics():
    p = policy(use_priority=True, decode_first=False)
    p.add(view("low-a", prefix=("a",), priority=5, arrival=1.0))
    p.add(view("high-b", prefix=("b",), priority=0, arrival=2.0))
    p.add(view("low-a2", prefix=("a",), priority=5, arrival=3.0))
    p.add(view("high-a", prefix=("a",), priority=0, arrival=4.0))
    assert drain(p) == ["high-b", "high-a", "low-a", "low-a2"]


def test_equal_priorities_go_by_arrival_time_then_request_id():
    # vLLM's Request.__lt__: (priority, arrival_time, request_id), whatever order
    # add_request saw them in.
    p = policy(use_priority=True, decode_first=False, grouping=False)
    p.add(view("r0", priority=1, arrival=3.0))
    p.add(view("r1", priority=1, arrival=1.0))
    p.add(view("r3", priority=1, arrival=2.0))
    p.add(view("r2", priority=1, arrival=2.0))
    assert drain(p) == ["r1", "r2", "r3", "r0"]
    # Members of one prefix group too.
    p = policy(use_priority=True, decode_first=False)
    p.add(view("late", prefix=("a",), priority=0, arrival=9.0))
    p.add(view("early", prefix=("a",), priority=0, arrival=1.0))
    assert drain(p) == ["early", "late"]


def test_open_group_yields_to_a_more_urgent_request_and_is_admitted_after_it():
    p = policy(use_priority=True, decode_first=False)
    for i in range(3):
        p.add(view(f"g{i}", prefix=("a",), priority=1, arrival=float(i)))
    assert p.pop() == "g0"
    p.add(view("urgent", priority=0, arrival=9.0))
    assert drain(p) == ["urgent", "g1", "g2"]


def test_prompt_that_is_a_prefix_of_an_earlier_one_keeps_its_place():
    p = policy(decode_first=False)
    p.add(view("long", prefix=("a", "b", "c"), suffix_blocks=0))
    p.add(view("short", prefix=("a", "b"), suffix_blocks=0))
    p.add(view("branch", prefix=("a", "x"), suffix_blocks=0))
    assert drain(p) == ["long", "short", "branch"]


def test_remove_from_open_unit_and_readd():
    p = policy(decode_first=False)
    for rid in ["a1", "a2", "a3", "b1"]:
        p.add(view(rid, prefix=(rid[0],)))
    assert p.pop() == "a1"          # opens unit a
    p.remove("a2")
    p.add(view("a4", prefix=("a",)))  # joins the open unit
    assert drain(p) == ["a3", "a4", "b1"]
    with pytest.raises(KeyError):
        p.remove("a2")
    with pytest.raises(IndexError):
        p.peek()


def test_prefix_wanted():
    p = policy()
    p.add(view("a1", prefix=("a",)))
    assert p.prefix_wanted("a") and not p.prefix_wanted("b")
    p.pop()
    assert not p.prefix_wanted("a")


def test_wait_bound_puts_the_oldest_first():
    p = policy(max_wait_steps=2, decode_first=False)
    p.add(view("old", prefix=("z",)))
    # A stream of group "a" keeps arriving; each step admits one of them.
    p.add(view("a0", prefix=("z0",)))
    order = []
    for step in range(8):
        p.begin_step(StepState(num_free_blocks=1000, running=[], now=0.0))
        p.add(view(f"a{step + 1}", prefix=("z0",), arrival=step))
        order.append(p.pop())
        p.end_step()
    assert order[0] == "old"  # oldest unit first anyway
    q = policy(max_wait_steps=2, decode_first=True)
    q.add(view("old", prefix=("z",), suffix_blocks=30, max_tokens=1))  # decode-light: last
    admitted = []
    for step in range(10):
        q.begin_step(StepState(num_free_blocks=1000, running=[], now=0.0))
        q.add(view(f"chatty{step}", prefix=(f"c{step}",), max_tokens=64))
        admitted.append(q.pop())
        q.end_step()
    # Without the bound "old" would wait forever behind decode-heavy arrivals.
    assert "old" in admitted
    assert admitted.index("old") <= 2 + 2


def test_memory_gate_closes_and_never_blocks_an_idle_engine():
    p = policy(decode_first=False)
    for i in range(3):
        p.add(view(f"r{i}", suffix_blocks=10, max_tokens=40))
    # Nothing runs: the first is always admissible, even if it cannot fit.
    p.begin_step(StepState(num_free_blocks=5, running=[], now=0.0))
    assert p.admissible()
    p.pop()
    # 10 prompt blocks + 10 blocks of output each: the second does not fit in 30.
    assert not p.admissible()
    p.end_step()
    p.begin_step(StepState(num_free_blocks=200, running=[(40, 10)], now=0.0))
    assert p.admissible()
    p.end_step()


def test_kv_forecast_matches_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        bs = rng.choice([1, 4, 16])
        items = [(rng.randrange(0, 60), rng.randrange(0, 20)) for _ in range(rng.randrange(0, 8))]
        held, left = rng.randrange(0, 20), rng.randrange(0, 60)
        f = KVForecast(items, bs)
        everyone = items + [(left, held)]

        def demand(t, reqs=everyone, bs=bs):
            return sum(h + t / bs for r, h in reqs if r > t)

        times = {0.0} | {r - 1e-9 for r, _ in everyone if r > 0}
        brute = max([sum(h for _, h in everyone)] + [demand(t) for t in times])
        assert f.peak_with(held, left) == pytest.approx(brute, abs=1e-6)


# ------------------------------------------------------------------ properties

requests = st.lists(
    st.tuples(st.integers(0, 5), st.integers(0, 3), st.integers(1, 40), st.integers(0, 2)),
    min_size=1, max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(requests, st.integers(0, 6), st.integers(10, 400), st.integers(0, 2**32))
def test_every_request_is_admitted_once_and_the_bound_holds(reqs, max_wait, free, seed):
    """Random arrivals, removals and a tight memory gate: each request leaves the
    queue exactly once; no request is passed over by later arrivals in more
    than max_wait + 1 steps; the gate never stalls an idle engine."""
    rnd = random.Random(seed)
    p = policy(max_wait_steps=max_wait, use_priority=False)
    pending = [view(f"r{i}", prefix=(f"g{g}",), suffix_blocks=s, max_tokens=m)
               for i, (g, s, m, _) in enumerate(reqs)]
    arrival = {v.request_id: i for i, v in enumerate(pending)}
    left, running, passed_over = set(), [], {}
    waiting: set[str] = set()
    step = 0
    while pending or waiting:
        for _ in range(rnd.randrange(0, 4)):
            if pending:
                v = pending.pop(0)
                p.add(v)
                waiting.add(v.request_id)
        if waiting and rnd.random() < 0.1:
            victim = rnd.choice(sorted(waiting))
            p.remove(victim)
            waiting.discard(victim)
            left.add(victim)
        p.begin_step(StepState(num_free_blocks=free, running=list(running), now=0.0))
        admitted = []
        while p.admissible() and len(admitted) < 3:
            rid = p.pop()
            assert rid in waiting and rid not in left
            waiting.discard(rid)
            left.add(rid)
            admitted.append(rid)
        p.end_step()
        assert admitted or not waiting or running, "gate stalled an idle engine"
        newest = max((arrival[r] for r in admitted), default=-1)
        for rid in waiting:
            if arrival[rid] < newest:
                passed_over[rid] = passed_over.get(rid, 0) + 1
                assert passed_over[rid] <= max_wait + 1 + 3, (rid, passed_over[rid])
        running = [(r - 1, h) for r, h in running if r > 1]
        running += [(rnd.randrange(1, 20), 2) for _ in admitted]
        assert len(p) == len(waiting)
        step += 1
        assert step < 10_000
    assert left == set(arrival)


def test_gate_closure_counted_once_per_step():
    p = policy(decode_first=False)
    for i in range(3):
        p.add(view(f"r{i}", suffix_blocks=10, max_tokens=40))
    p.begin_step(StepState(num_free_blocks=5, running=[(10, 1)], now=0.0))
    assert not p.admissible() and not p.admissible()
    p.end_step()
    assert p.stats.num_gate_closures == 1


def test_admissible_is_answered_once_per_change(monkeypatch):
    """vLLM asks the gate several times per admission; the forecast is consulted once
    until the queue changes, and the answer follows the change."""
    p = policy(decode_first=False)
    for i in range(3):
        p.add(view(f"r{i}", suffix_blocks=10, max_tokens=40))
    p.begin_step(StepState(num_free_blocks=200, running=[(10, 1)], now=0.0))
    calls = []
    peak_with = KVForecast.peak_with
    monkeypatch.setattr(KVForecast, "peak_with",
                        lambda self, *a: calls.append(a) or peak_with(self, *a))
    assert all(p.admissible() for _ in range(5))
    assert len(calls) == 1
    p.pop()
    assert p.admissible() and len(calls) == 2
    p.add(view("big", suffix_blocks=300, max_tokens=40))
    p.remove("r1")
    p.remove("r2")
    # the only one left now cannot fit: the cached True must not survive the change
    assert not p.admissible() and len(calls) == 3
    p.end_step()
    assert p.admissible()


def test_admitting_in_arrival_order_is_no_deviation():
    """The wait-bound clock only runs when a later arrival is admitted first."""
    p = policy(decode_first=False)
    for i in range(6):
        p.add(view(f"r{i}", prefix=(f"g{i}",)))
    for _ in range(4):
        p.begin_step(StepState(num_free_blocks=1000, running=[], now=0.0))
        p.pop()
        p.end_step()
    p.begin_step(StepState(num_free_blocks=1000, running=[], now=0.0))
    assert p.stats.num_deviation_steps == 0
    # A later arrival overtaking r4 (its group is resident) is one.
    q = policy(decode_first=False, is_cached=lambda h: h == "b")
    q.add(view("a0", prefix=("a",)))
    q.add(view("b0", prefix=("b",)))
    q.begin_step(StepState(num_free_blocks=1000, running=[], now=0.0))
    assert q.pop() == "b0"
    q.end_step()
    q.begin_step(StepState(num_free_blocks=1000, running=[], now=0.0))
    assert q.stats.num_deviation_steps == 1

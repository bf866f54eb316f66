# SPDX-License-Identifier: Apache-2.0
"""Properties of `PrefixGroupingPolicy` on generated request streams (no vLLM).

A hypothesis state machine adds, prepends (preemption), removes (abort) and
admits requests step by step, as vLLM's scheduler does, and checks after every
operation against a plain model of the waiting set:

- no request is lost or duplicated, and the policy admits only waiting requests;
- requests put back by preemption come first (last put back first); under
  --scheduling-policy priority every admitted request has the most urgent
  priority waiting, and those put back come first within it, by vLLM's order;
- once a group is opened its waiting members follow (wait bound off), unless a
  more urgent priority arrives;
- a request is overtaken by requests after it in vLLM's order (arrival, or
  priority then arrival time) in at most ``max_wait_steps + 1`` scheduler steps;
- the memory gate never closes when nothing runs, nor with room to spare;
- when every request is gone, no internal state is left.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from asyncbatch.policy import RequestView
from asyncbatch.policy.prefix import PrefixGroupingPolicy, StepState

BLOCK_SIZE = 4
NUM_ROOTS = 3


@dataclass
class Waiting:
    view: RequestView
    # arrival order among new requests; None for one put back by preemption
    seq: int | None
    unit: tuple
    # scheduler steps in which a later arrival was admitted while this one waited
    num_bypassed: int = 0


class PrefixPolicyMachine(RuleBasedStateMachine):
    admitted = Bundle("admitted")

    @initialize(
        min_shared_blocks=st.integers(1, 2),
        max_wait_steps=st.sampled_from([0, 1, 3, 10_000]),
        grouping=st.booleans(),
        decode_first=st.booleans(),
        use_priority=st.booleans(),
        kv_headroom=st.sampled_from([-0.3, 0.0, 0.2]),
    )
    def setup(self, min_shared_blocks, max_wait_steps, grouping, decode_first, use_priority,
              kv_headroom):
        self.cached: set = set()
        self.k = min_shared_blocks
        self.grouping = grouping
        self.use_priority = use_priority
        self.max_wait_steps = max_wait_steps
        self.policy = PrefixGroupingPolicy(
            block_size=BLOCK_SIZE, num_total_blocks=64, min_shared_blocks=min_shared_blocks,
            max_wait_steps=max_wait_steps, kv_headroom=kv_headroom, decode_first=decode_first,
            use_priority=use_priority, grouping=grouping, is_cached=self.cached.__contains__)
        self.waiting: dict[str, Waiting] = {}
        self.num_made = 0
        self.num_seq = 0
        self.num_prepends = 0
        self.clock = 1000.0
        # unit of the last new request admitted, for the open-group property
        self.open_unit: tuple | None = None

    # ------------------------------------------------------------------ rules

    @rule(root=st.one_of(st.none(), st.integers(0, NUM_ROOTS - 1)),
          num_prefix_blocks=st.integers(1, 3), num_suffix_tokens=st.integers(0, 9),
          max_tokens=st.integers(1, 64), priority=st.integers(0, 2))
    def add(self, root, num_prefix_blocks, num_suffix_tokens, max_tokens, priority):
        rid = f"r{self.num_made}"
        self.num_made += 1
        self.clock += 1.0
        num_prefix_tokens = 0 if root is None else num_prefix_blocks * BLOCK_SIZE
        num_prompt_tokens = max(1, num_prefix_tokens + num_suffix_tokens)
        num_blocks = num_prompt_tokens // BLOCK_SIZE
        # chained hashes: a shared prefix gives shared leading hashes
        hashes = tuple(("p", root, i) if i < num_prefix_blocks and root is not None
                       else ("u", rid, i) for i in range(num_blocks))
        view = RequestView(rid, self.clock, priority, num_prompt_tokens, max_tokens, hashes)
        self.policy.add(view)
        prio = priority if self.use_priority else 0
        unit = ((prio, hashes[self.k - 1]) if self.grouping and len(hashes) >= self.k
                else (prio, rid))
        self.waiting[rid] = Waiting(view, self.num_seq, unit)
        self.num_seq += 1

    @rule(target=admitted, steps=st.lists(st.tuples(st.integers(0, 4), st.booleans()),
                                          min_size=1, max_size=3),
          tight=st.booleans(), free_blocks=st.integers(0, 40))
    def schedule(self, steps, tight, free_blocks):
        """Scheduler steps: each admits up to n requests while the gate allows."""
        out = []
        for n, running in steps:
            running_state = [(8, 2), (30, 3)] if running else []
            num_free = free_blocks if tight else 10**9
            self.policy.begin_step(StepState(num_free, list(running_state), now=self.clock))
            admitted_keys = []
            for i in range(n):
                if not self.waiting:
                    assert not self.policy.admissible()
                    break
                if not self.policy.admissible():
                    assert tight, "the gate closed with room to spare"
                    assert running or i > 0, "the gate closed with nothing running"
                    break
                rid = self.policy.peek()
                assert self.policy.pop() == rid
                self._check_admitted(rid)
                w = self.waiting.pop(rid)
                self._close_emptied_unit()
                if w.seq is not None:
                    admitted_keys.append(self._order_key(w))
                out.append(w.view)
            self.policy.end_step()
            if admitted_keys:
                latest = max(admitted_keys)
                for w in self.waiting.values():
                    if w.seq is not None and self._order_key(w) < latest:
                        w.num_bypassed += 1
                        assert w.num_bypassed <= self.max_wait_steps + 1, (
                            f"{w.view.request_id} overtaken in {w.num_bypassed} steps, "
                            f"max_wait_steps={self.max_wait_steps}")
        return out

    @rule(batch=consumes(admitted), data=st.data())
    def preempt(self, batch, data):
        """Put some admitted requests back, as preemption does (newest first)."""
        if not batch:
            return
        n = data.draw(st.integers(1, len(batch)))
        for view in reversed(batch[-n:]):
            if view.request_id in self.waiting:
                continue
            self.policy.prepend(view)
            self.num_prepends += 1
            self.waiting[view.request_id] = Waiting(view, None, ("front", self.num_prepends))

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(sorted(self.waiting)))
        self.policy.remove(rid)
        del self.waiting[rid]
        self._close_emptied_unit()

    @rule(root=st.integers(0, NUM_ROOTS - 1))
    def toggle_cached(self, root):
        key = ("p", root, self.k - 1)
        self.cached.symmetric_difference_update({key})

    @rule()
    def errors(self):
        with pytest.raises(KeyError):
            self.policy.remove("never-added")
        if self.waiting:
            rid = next(iter(self.waiting))
            with pytest.raises(ValueError):
                self.policy.add(self.waiting[rid].view)
        else:
            with pytest.raises(IndexError):
                self.policy.peek()
            with pytest.raises(IndexError):
                self.policy.pop()

    # ------------------------------------------------------------- properties

    def _order_key(self, w: Waiting) -> tuple:
        """vLLM's order of waiting requests (``Request.__lt__`` under priority)."""
        if self.use_priority:
            return (w.view.priority, w.view.arrival_time, w.view.request_id)
        return (w.seq,)

    def _check_admitted(self, rid: str) -> None:
        assert rid in self.waiting, f"admitted {rid}, which is not waiting"
        w = self.waiting[rid]
        fronts = [x for x in self.waiting.values() if x.seq is None]
        if self.use_priority:
            most_urgent = min(x.view.priority for x in self.waiting.values())
            assert w.view.priority == most_urgent, "a less urgent priority went first"
            fronts = [x for x in fronts if x.view.priority == most_urgent]
        if fronts:
            assert w.seq is None, "a new request went before one put back by preemption"
            if self.use_priority:
                best = min(fronts, key=lambda x: (x.view.priority, x.view.arrival_time,
                                                  x.view.request_id))
            else:
                best = max(fronts, key=lambda x: x.unit[1])
            assert w is best, "preempted requests out of order"
            return
        if self.max_wait_steps >= 10_000 and self.open_unit is not None:
            siblings = [x for x in self.waiting.values() if x.unit == self.open_unit]
            if siblings and w.unit[0] == self.open_unit[0]:
                assert w.unit == self.open_unit, "left an opened group with members waiting"
        self.open_unit = w.unit

    def _close_emptied_unit(self) -> None:
        if not any(w.unit == self.open_unit for w in self.waiting.values()):
            self.open_unit = None

    @invariant()
    def same_waiting_set(self):
        policy = self.policy
        assert len(policy) == len(self.waiting)
        for rid in self.waiting:
            assert rid in policy

    def teardown(self):
        policy = getattr(self, "policy", None)
        if policy is None:
            return
        policy.begin_step(StepState(10**9, [], now=self.clock))
        while self.waiting:
            rid = policy.pop()
            assert self.waiting.pop(rid) is not None
        policy.end_step()
        assert len(policy) == 0
        for name in ("_entries", "_units", "_roots", "_front_ids", "_by_uid"):
            assert not getattr(policy, name), f"{name} not empty after the last request"


PrefixPolicyMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_prefix_policy = PrefixPolicyMachine.TestCase


@settings(max_examples=200, deadline=None)
@given(
    max_wait_steps=st.integers(0, 4),
    grouping=st.booleans(),
    steps=st.lists(
        st.tuples(
            # arrivals: (root or None, max_tokens, suffix tokens)
            st.lists(st.tuples(st.one_of(st.none(), st.integers(0, NUM_ROOTS - 1)),
                               st.integers(1, 64), st.integers(0, 12)), max_size=3),
            st.integers(0, 2),
        ),
        min_size=1, max_size=80,
    ),
)
def test_wait_bound(max_wait_steps, grouping, steps):
    """A request is overtaken by later arrivals in at most max_wait_steps + 1 steps."""
    policy = PrefixGroupingPolicy(block_size=BLOCK_SIZE, num_total_blocks=64,
                                  max_wait_steps=max_wait_steps, grouping=grouping)
    # request_id -> [arrival seq, steps overtaken]
    waiting: dict[str, list[int]] = {}
    num_made = 0
    for arrivals, num_admit in steps:
        for root, max_tokens, num_suffix in arrivals:
            rid = f"r{num_made}"
            hashes = [("p", root, 0)] if root is not None else []
            hashes += [("u", rid, i) for i in range(len(hashes), num_suffix // BLOCK_SIZE)]
            num_prompt = max(1, len(hashes) * BLOCK_SIZE + num_suffix % BLOCK_SIZE)
            policy.add(RequestView(rid, 1000.0 + num_made, 0, num_prompt, max_tokens,
                                   tuple(hashes)))
            waiting[rid] = [num_made, 0]
            num_made += 1
        policy.begin_step(StepState(10**9, [], now=0.0))
        latest = -1
        for _ in range(num_admit):
            if not policy.admissible():
                break
            latest = max(latest, waiting.pop(policy.pop())[0])
        policy.end_step()
        for rid, w in waiting.items():
            if w[0] < latest:
                w[1] += 1
                assert w[1] <= max_wait_steps + 1, (rid, w[1])

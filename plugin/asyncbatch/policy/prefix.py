# SPDX-License-Identifier: Apache-2.0
"""Prefix-grouped, decode-first, memory-aware admission (the BatchLLM idea).

Waiting requests whose prompts share their first ``min_shared_blocks`` KV
blocks form a *unit*.  vLLM's block hashes are chained (hash ``i`` covers
tokens ``[0, (i + 1) * block_size)``), so the hash at depth
``min_shared_blocks - 1`` names the shared prefix exactly: no second hashing
pass and no token comparison.  Requests with a shorter prompt are units of one.

Admission order, first to last:

1. requests put back by preemption (vLLM puts them first too);
2. the oldest waiting request, once it is *overdue*: it has been passed over
   (a later arrival admitted before it) in ``max_wait_steps`` scheduler steps,
   or it has waited ``max_wait_s`` seconds.  The count is kept for the oldest
   request, which every deviation from arrival order passes over, so no
   request is passed over in more than ``max_wait_steps`` steps;
3. the rest of the *open* unit: once one member is admitted, its siblings
   follow, so the shared prefix is computed once, while it is resident;
4. the next unit: one whose prefix is cached right now (reuse before
   eviction), else the one with the most decode work per uncomputed prompt
   token (in factor-of-sqrt(2) buckets), ties by the arrival of its first
   member.  Under ``--scheduling-policy priority`` the priority comes first.

Memory: `begin_step` tells the policy how many KV blocks are free and how
many the running requests are forecast to still need (prompt + expected
output).  `admissible` closes admission for the step when the next request's
forecast does not fit, so that admitting it would later force a preemption.
With room to spare the gate never closes, so batches are not shrunk; requests
from 1. and 2. bypass it, and it never closes when nothing runs.

Queue operations are O(log n) in the number of waiting requests, except that
opening a unit sorts its members once.  The memory gate is not: its forecast is
built once per step over the r running requests (O(r log r)), and each admission
in that step rebuilds it (`KVForecast.add`, O(r)).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field

from asyncbatch.policy.base import WaitingPolicy
from asyncbatch.policy.views import RequestView


@dataclass(slots=True)
class StepState:
    """What the glue reports at the start of each scheduling step."""

    # KV blocks that can be allocated now (free, including evictable cached ones)
    num_free_blocks: int
    # per running request: (tokens still to compute until its expected end,
    # KV blocks it holds that no other request shares)
    running: list[tuple[int, int]]
    # seconds since the epoch (vLLM's arrival_time clock)
    now: float
    # largest (least urgent) vLLM priority among the running requests; None when
    # nothing runs or scheduling is not by priority
    lowest_running_priority: int | None = None


class KVForecast:
    """Peak KV demand of a set of requests that each grow by one token per step
    and free everything when they finish.

    With requests sorted by tokens left, ``r_1 <= ... <= r_n``, demand just
    before request ``j`` finishes is ``U_j = sum_{i >= j} held_i + (n - j + 1) *
    r_j / block_size``; the peak is ``max_j U_j``.  A candidate that holds ``c``
    blocks and finishes after ``r`` tokens adds ``c + t / block_size`` to every
    point ``t < r``.  Prefix and suffix maxima answer that in O(log n).
    """

    def __init__(self, items: list[tuple[int, int]], block_size: int) -> None:
        self.block_size = block_size
        self.items = sorted(items)
        self._build()

    def _build(self) -> None:
        bs = self.block_size
        items = self.items
        n = len(items)
        self.left = [r for r, _ in items]
        # suffix[j] = blocks held by requests j.. (still alive just before r_j ends)
        suffix = [0] * (n + 1)
        for j in range(n - 1, -1, -1):
            suffix[j] = suffix[j + 1] + items[j][1]
        self.suffix = suffix
        usage = [suffix[j] + (n - j) * items[j][0] / bs for j in range(n)]
        # pre[j] = max_{i < j} (U_i + r_i / bs); post[j] = max_{i >= j} U_i
        pre = [0.0] * (n + 1)
        for j in range(n):
            pre[j + 1] = max(pre[j], usage[j] + items[j][0] / bs)
        post = [0.0] * (n + 1)
        for j in range(n - 1, -1, -1):
            post[j] = max(post[j + 1], usage[j])
        self.pre, self.post = pre, post

    def peak_with(self, held: int, tokens_left: int) -> float:
        """Peak demand if a request holding ``held`` blocks and growing for
        ``tokens_left`` tokens joins."""
        bs = self.block_size
        j = bisect.bisect_left(self.left, tokens_left)
        n_alive = len(self.items) - j
        at_end = self.suffix[j] + n_alive * tokens_left / bs + held + tokens_left / bs
        return max(self.suffix[0] + held, self.pre[j] + held, at_end, self.post[j])

    def add(self, held: int, tokens_left: int) -> None:
        bisect.insort(self.items, (tokens_left, held))
        self._build()

    @property
    def capacity_used(self) -> int:
        return self.suffix[0]


@dataclass(slots=True)
class PolicyStats:
    num_units_opened: int = 0
    num_resident_picks: int = 0
    num_overdue_admissions: int = 0
    num_gate_closures: int = 0
    num_deviation_steps: int = 0


@dataclass(slots=True, eq=False)
class _Unit:
    uid: int
    # (priority, root block hash) for groups, (priority, request_id) for singletons
    key: Hashable
    root: Hashable | None
    priority: int
    # arrival key (see `_Entry.arrival`) of the member that formed the unit
    first_arrival: tuple
    # request ids, insertion ordered; a dict is an ordered set with O(1) removal
    members: dict[str, None] = field(default_factory=dict)
    num_max_tokens: int = 0
    num_prompt_tokens: int = 0
    version: int = 0
    # admission order of the members once opened
    order: deque[str] | None = None
    # a member was admitted since the unit was opened: its prefix is resident
    warmed: bool = False


@dataclass(slots=True, eq=False)
class _Entry:
    view: RequestView
    seq: int
    # vLLM's own order of waiting requests: the order `add` saw them under FCFS;
    # (priority, arrival_time, request_id) under priority scheduling (`Request.__lt__`).
    arrival: tuple
    unit: _Unit | None
    # value of the deviation-step counter when the request arrived
    deviations_at_entry: int


class PrefixGroupingPolicy(WaitingPolicy):
    """See the module docstring.

    Args:
        block_size: KV block size in tokens (vLLM's hash block size).
        num_total_blocks: KV blocks in the cache, for the headroom.
        min_shared_blocks: leading full blocks two prompts must share to be grouped.
        max_wait_steps: wait bound in deviating steps (see module docstring).
        max_wait_s: wait bound in seconds since arrival; None for none.
        kv_headroom: fraction of the KV cache the forecast keeps free.
        use_priority: order by vLLM priority first (--scheduling-policy priority).
        is_cached: whether a block hash is in vLLM's prefix cache now.
        grouping: False keeps arrival order (every request its own unit), with
            the memory gate and the wait bound still in force.
    """

    def __init__(
        self,
        *,
        block_size: int,
        num_total_blocks: int,
        min_shared_blocks: int = 1,
        max_wait_steps: int = 512,
        max_wait_s: float | None = None,
        kv_headroom: float = 0.0,
        decode_first: bool = True,
        use_priority: bool = False,
        grouping: bool = True,
        forecast_horizon: int = 1024,
        is_cached: Callable[[Hashable], bool] = lambda block_hash: False,
    ) -> None:
        if block_size < 1 or min_shared_blocks < 1 or max_wait_steps < 0:
            raise ValueError("block_size and min_shared_blocks must be >= 1, "
                             "max_wait_steps >= 0")
        self.block_size = block_size
        self.min_shared_blocks = min_shared_blocks
        self.max_wait_steps = max_wait_steps
        self.max_wait_s = max_wait_s
        self.decode_first = decode_first
        self.use_priority = use_priority
        self.grouping = grouping
        self.is_cached = is_cached
        self.headroom_blocks = int(kv_headroom * num_total_blocks)
        self.forecast_horizon = forecast_horizon
        self.stats = PolicyStats()

        # request_id -> entry, for every waiting request
        self._entries: dict[str, _Entry] = {}
        self._seq = itertools.count()
        self._uid = itertools.count()
        # unit key -> unit with waiting members
        self._units: dict[Hashable, _Unit] = {}
        # (priority, -decode bucket, first_arrival, uid, version): lazily invalidated
        self._heap: list[tuple[int, int, tuple, int, int]] = []
        # uid -> unit, for units in `_heap` (stale heap entries resolve to None)
        self._by_uid: dict[int, _Unit] = {}
        # uid -> unit whose prefix is believed cached (a member was admitted, or
        # its prefix was cached when the unit formed): candidates for reuse
        self._resident: dict[int, _Unit] = {}
        # root block hash -> priorities with a waiting unit for it
        self._roots: dict[Hashable, set[int]] = {}
        self._open: _Unit | None = None
        # preempted requests: heap of (priority or 0, order, request_id)
        self._front: list[tuple[int, float, str]] = []
        self._front_ids: set[str] = set()
        self._num_prepends = itertools.count()
        # heap of the non-front requests by arrival: (arrival key, request_id)
        self._fifo: list[tuple[tuple, str]] = []

        # wait-bound bookkeeping
        self._num_deviation_steps = 0
        self._deviated_this_step = False
        # memory gate
        self._state: StepState | None = None
        self._forecast: KVForecast | None = None
        self._capacity = 0.0
        self._num_admitted = 0
        self._gate_closed = False
        # expected output length / max_tokens, learned from finished requests
        self.output_ratio = 1.0
        # the answers of `peek` and `admissible`, until the next change (vLLM asks
        # each several times per admission)
        self._next: str | None = None
        self._admissible: bool | None = None
        # the request `peek` named because it is overdue
        self._overdue_pick: str | None = None

    # ------------------------------------------------------------------ events

    def add(self, view: RequestView) -> None:
        rid = view.request_id
        if rid in self._entries:
            raise ValueError(f"request {rid!r} is already waiting")
        seq = next(self._seq)
        arrival = (view.priority, view.arrival_time, rid) if self.use_priority else (seq,)
        unit = self._unit_for(view, arrival)
        self._entries[rid] = _Entry(view, seq, arrival, unit, self._num_deviation_steps)
        heapq.heappush(self._fifo, (arrival, rid))
        unit.members[rid] = None
        unit.num_max_tokens += view.max_tokens
        unit.num_prompt_tokens += view.num_prompt_tokens
        if unit.order is not None:
            unit.order.append(rid)
        else:
            self._push(unit)
        self._next = self._admissible = None

    def prepend(self, view: RequestView) -> None:
        rid = view.request_id
        if rid in self._entries:
            raise ValueError(f"request {rid!r} is already waiting")
        if self.use_priority:
            key = (view.priority, view.arrival_time, rid)
        else:
            # Last put back, first out: vLLM's deque.appendleft.
            key = (0, -float(next(self._num_prepends)), rid)
        heapq.heappush(self._front, key)
        self._front_ids.add(rid)
        self._entries[rid] = _Entry(view, next(self._seq), (), None, self._num_deviation_steps)
        self._next = self._admissible = None

    def remove(self, request_id: str) -> None:
        entry = self._entries.pop(request_id)
        self._forget(entry)
        self._next = self._admissible = None

    def pop(self) -> str:
        rid = self.peek()
        if rid == self._overdue_pick:
            self.stats.num_overdue_admissions += 1
        # Out of arrival order: the oldest waiting request (read before this one
        # leaves) is another one.  Preempted requests go first in vLLM too.
        oldest = self._fifo_oldest()
        entry = self._entries.pop(rid)
        if entry.unit is not None and oldest is not None and oldest != rid:
            self._deviated_this_step = True
        self._forget(entry)
        if entry.unit is not None:
            entry.unit.warmed = True
            if entry.unit.root is not None and entry.unit.members:
                self._resident[entry.unit.uid] = entry.unit
        if self._forecast is not None:
            self._forecast.add(*self._candidate(entry))
        self._num_admitted += 1
        self._next = self._admissible = None
        return rid

    def begin_step(self, state: StepState) -> None:
        """Start of a scheduling step: new memory figures, and the wait-bound clock."""
        if self._deviated_this_step:
            self._num_deviation_steps += 1
            self.stats.num_deviation_steps += 1
            self._deviated_this_step = False
        self._state = state
        self._forecast = None
        self._num_admitted = 0
        self._gate_closed = False
        self._next = self._admissible = None

    def end_step(self) -> None:
        self._state = None
        self._forecast = None
        self._admissible = None

    def on_finished(self, num_output_tokens: int, max_tokens: int) -> None:
        """A request finished: learn the expected output length as a share of
        max_tokens.  A moving average that rises fast and falls slowly, since
        under-forecasting costs a preemption and over-forecasting only delays
        an admission."""
        if max_tokens > 0:
            ratio = min(1.0, num_output_tokens / max_tokens)
            rate = 0.2 if ratio > self.output_ratio else 0.02
            self.output_ratio += rate * (ratio - self.output_ratio)
            self._admissible = None

    # ----------------------------------------------------------------- queries

    def peek(self) -> str:
        if self._next is None:
            self._next = self._choose()
        return self._next

    def admissible(self) -> bool:
        """Whether the request `peek` names may be admitted in this step."""
        answer = self._admissible
        if answer is None:
            answer = self._admissible = self._admissible_now()
        return answer

    def _admissible_now(self) -> bool:
        if not self._entries:
            return False
        state = self._state
        if state is None:
            return True
        rid = self.peek()
        entry = self._entries[rid]
        if entry.unit is None or self._is_overdue(entry, state):
            return True
        # Under priority scheduling vLLM lets a request displace (by preemption) the
        # running requests of lower priority: the forecast, which protects running
        # requests from preemption, does not hold it back from them.
        low = state.lowest_running_priority
        if self.use_priority and low is not None and entry.view.priority < low:
            return True
        if not state.running and self._num_admitted == 0:
            return True
        forecast = self._forecast
        if forecast is None:
            # Demand is forecast over the next `forecast_horizon` tokens of growth
            # only: a request asking for far more (an unset max_tokens is the
            # context length) must not hold back admissions for its whole life.
            h = self.forecast_horizon
            running = [(min(left, h), held) for left, held in state.running]
            forecast = self._forecast = KVForecast(running, self.block_size)
            self._capacity = state.num_free_blocks + forecast.capacity_used - self.headroom_blocks
        if forecast.peak_with(*self._candidate(entry)) <= self._capacity:
            return True
        # vLLM may ask again after its loop ends: count a closure once per step.
        if not self._gate_closed:
            self._gate_closed = True
            self.stats.num_gate_closures += 1
        return False

    def expected_tokens(self, num_prompt_tokens: int, max_tokens: int) -> int:
        """Tokens a request is expected to end with (prompt + expected output)."""
        return num_prompt_tokens + math.ceil(max_tokens * self.output_ratio)

    def prefix_wanted(self, root: Hashable) -> bool:
        """Whether a waiting request still needs the prefix whose last block hash is ``root``."""
        return bool(self._roots.get(root))

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._entries

    def __iter__(self) -> Iterator[str]:
        """Waiting ids in an order close to admission order (not for the hot path)."""
        seen: set[str] = set()
        for _, _, rid in sorted(self._front):
            entry = self._entries.get(rid)
            if rid in self._front_ids and entry is not None and entry.unit is None \
                    and rid not in seen:
                seen.add(rid)
                yield rid
        units = sorted(self._units.values(), key=self._unit_key)
        if self._open is not None and self._open.members:
            units.remove(self._open)
            units.insert(0, self._open)
        for unit in units:
            order = unit.order if unit.order is not None else unit.members
            for rid in list(order):
                if rid in self._entries and rid not in seen:
                    seen.add(rid)
                    yield rid

    # --------------------------------------------------------------- internals

    def _unit_for(self, view: RequestView, arrival: tuple) -> _Unit:
        priority = view.priority if self.use_priority else 0
        k = self.min_shared_blocks
        if self.grouping and len(view.block_hashes) >= k:
            root = view.block_hashes[k - 1]
            key: Hashable = (priority, root)
            self._roots.setdefault(root, set()).add(priority)
        else:
            root = None
            key = (priority, view.request_id)
        unit = self._units.get(key)
        if unit is None:
            unit = _Unit(uid=next(self._uid), key=key, root=root, priority=priority,
                         first_arrival=arrival)
            self._units[key] = unit
            if root is not None and self.is_cached(root):
                self._resident[unit.uid] = unit
        return unit

    def _decode_bucket(self, unit: _Unit) -> int:
        if not self.decode_first:
            return 0
        n = len(unit.members)
        shared = self.min_shared_blocks * self.block_size if unit.root is not None else 0
        uncomputed = max(1, unit.num_prompt_tokens - (n - 1) * shared)
        ratio = unit.num_max_tokens / uncomputed
        return -round(2 * math.log2(max(ratio, 1e-6)))

    def _unit_key(self, unit: _Unit) -> tuple[int, int, tuple]:
        return (unit.priority, self._decode_bucket(unit), unit.first_arrival)

    def _push(self, unit: _Unit) -> None:
        unit.version += 1
        self._by_uid[unit.uid] = unit
        heapq.heappush(self._heap, (*self._unit_key(unit), unit.uid, unit.version))

    def _forget(self, entry: _Entry) -> None:
        rid = entry.view.request_id
        unit = entry.unit
        if unit is None:
            self._front_ids.discard(rid)
            return
        # The fifo and unit.order skip ids that are gone; the unit's sums stay
        # exact, so its heap key is recomputed from live members only.
        del unit.members[rid]
        unit.num_max_tokens -= entry.view.max_tokens
        unit.num_prompt_tokens -= entry.view.num_prompt_tokens
        if not unit.members:
            self._drop_unit(unit)
        elif unit.order is None:
            self._push(unit)

    def _drop_unit(self, unit: _Unit) -> None:
        del self._units[unit.key]
        self._by_uid.pop(unit.uid, None)
        self._resident.pop(unit.uid, None)
        if unit.root is not None:
            prios = self._roots.get(unit.root)
            if prios is not None:
                prios.discard(unit.priority)
                if not prios:
                    del self._roots[unit.root]
        if self._open is unit:
            self._open = None

    def _fifo_oldest(self) -> str | None:
        """The id of the earliest arrival among the waiting (non-front) requests."""
        fifo, entries = self._fifo, self._entries
        while fifo:
            arrival, rid = fifo[0]
            entry = entries.get(rid)
            if entry is not None and entry.arrival == arrival and entry.unit is not None:
                return rid
            heapq.heappop(fifo)
        return None

    def _is_overdue(self, entry: _Entry, state: StepState | None) -> bool:
        if self._num_deviation_steps - entry.deviations_at_entry >= self.max_wait_steps:
            return True
        return (self.max_wait_s is not None and state is not None
                and state.now - entry.view.arrival_time > self.max_wait_s)

    def _choose(self) -> str:
        if not self._entries:
            raise IndexError("peek from an empty waiting queue")
        front = self._front
        while front:
            rid = front[0][2]
            if rid in self._front_ids and rid in self._entries:
                # Put back by preemption: first, as in vLLM; under priority scheduling
                # first among its priority (vLLM orders it by priority like the rest).
                if not self.use_priority or front[0][0] <= self._best_waiting_priority():
                    return rid
                break
            heapq.heappop(front)
        oldest = self._fifo_oldest()
        if oldest is not None and self._is_overdue(self._entries[oldest], self._state):
            self._overdue_pick = oldest
            return oldest
        # The open unit's members follow, unless (under priority scheduling) a more
        # urgent request now waits: then the open unit goes back among the others.
        unit = self._open
        if unit is not None:
            if not self.use_priority or unit.priority <= self._top_priority():
                member = self._next_member(unit)
                if member is not None:
                    return member
            elif unit.members:
                self._push(unit)
        unit = self._pick_unit()
        self._open = unit
        self.stats.num_units_opened += 1
        unit.order = deque(self._siblings_in_order(unit))
        first = self._next_member(unit)
        assert first is not None
        return first

    def _siblings_in_order(self, unit: _Unit) -> list[str]:
        """Members with the longest common prefix next to each other, and otherwise
        in arrival order: a depth-first walk of the members' block-hash trie in
        which each branch ranks by the first member (in arrival order) that takes
        it, and a member whose prompt ends at a node ranks there by its own
        arrival, so a prompt that is a prefix of an earlier one does not jump
        ahead of it.  Ranks never depend on hash values, which vLLM seeds at
        random."""
        entries = self._entries
        members = sorted(unit.members, key=lambda rid: entries[rid].arrival)
        if len(members) < 2 or unit.root is None:
            return members
        k = self.min_shared_blocks
        hashes = {rid: entries[rid].view.block_hashes[k:] for rid in members}
        # block hash -> index of the first member with it (hashes are chained, so a
        # hash is unique to its depth and to everything before it)
        first: dict[Hashable, int] = {}
        for i, rid in enumerate(members):
            for h in hashes[rid]:
                first.setdefault(h, i)
        rank = {rid: (*(first[h] for h in hashes[rid]), i) for i, rid in enumerate(members)}
        members.sort(key=rank.__getitem__)
        return members

    def _next_member(self, unit: _Unit) -> str | None:
        order = unit.order
        if order is None:
            return None
        while order:
            rid = order[0]
            entry = self._entries.get(rid)
            if entry is not None and entry.unit is unit:
                return rid
            order.popleft()
        return None

    def _pick_unit(self) -> _Unit:
        best: _Unit | None = None
        for uid, unit in list(self._resident.items()):
            if not unit.members or not self.is_cached(unit.root):
                del self._resident[uid]
                continue
            if best is None or self._unit_key(unit) < self._unit_key(best):
                best = unit
        if best is not None and (not self.use_priority or self._top_priority() >= best.priority):
            self.stats.num_resident_picks += 1
            del self._resident[best.uid]
            return best
        top = self._heap_top()
        if top is None:
            raise AssertionError("waiting requests but no unit")
        heapq.heappop(self._heap)
        return top

    def _heap_top(self) -> _Unit | None:
        """The unit at the top of the heap, after dropping stale entries."""
        heap = self._heap
        while heap:
            _, _, _, uid, version = heap[0]
            unit = self._by_uid.get(uid)
            if unit is not None and unit.version == version and unit.members:
                return unit
            heapq.heappop(heap)
        return None

    def _best_waiting_priority(self) -> int:
        """The most urgent priority among the waiting requests that are not in front."""
        best = self._top_priority()
        unit = self._open
        if unit is not None and unit.members and unit.priority < best:
            best = unit.priority
        return best

    def _top_priority(self) -> int:
        unit = self._heap_top()
        return unit.priority if unit is not None else 1 << 62

    def _candidate(self, entry: _Entry) -> tuple[int, int]:
        """(blocks its prompt takes, tokens it then grows by) for the forecast.
        A unit that already has a member in the cache shares its first blocks."""
        view = entry.view
        blocks = -(-view.num_prompt_tokens // self.block_size)
        unit = entry.unit
        if unit is not None and unit.root is not None and unit.warmed:
            blocks -= self.min_shared_blocks
        return max(blocks, 0), min(self.expected_tokens(0, view.max_tokens),
                                   self.forecast_horizon)

# SPDX-License-Identifier: Apache-2.0
"""vLLM's own orders, over request ids: first come first served, and priority."""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterator

from asyncbatch.policy.base import WaitingPolicy
from asyncbatch.policy.views import RequestView


class _LazyDeletion:
    """Shared bookkeeping: entries carry a generation; removal only forgets the
    id, and stale entries are skipped (and dropped) when they reach the front."""

    def __init__(self) -> None:
        # request_id -> generation of its live entry
        self._live: dict[str, int] = {}
        self._gen = itertools.count()

    def _enter(self, request_id: str) -> int:
        if request_id in self._live:
            raise ValueError(f"request {request_id!r} is already waiting")
        gen = next(self._gen)
        self._live[request_id] = gen
        return gen

    def _is_live(self, request_id: str, gen: int) -> bool:
        return self._live.get(request_id) == gen

    def remove(self, request_id: str) -> None:
        del self._live[request_id]

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._live


class FcfsPolicy(_LazyDeletion, WaitingPolicy):
    """Arrival order; preempted requests go back to the front (vLLM's FCFS)."""

    def __init__(self) -> None:
        super().__init__()
        # (request_id, generation), front = next to admit
        self._order: deque[tuple[str, int]] = deque()

    def add(self, view: RequestView) -> None:
        self._order.append((view.request_id, self._enter(view.request_id)))

    def prepend(self, view: RequestView) -> None:
        self._order.appendleft((view.request_id, self._enter(view.request_id)))

    def _front(self) -> str:
        order = self._order
        while order:
            rid, gen = order[0]
            if self._is_live(rid, gen):
                return rid
            order.popleft()
        raise IndexError("peek from an empty waiting queue")

    def peek(self) -> str:
        return self._front()

    def pop(self) -> str:
        rid = self._front()
        self._order.popleft()
        del self._live[rid]
        return rid

    def remove(self, request_id: str) -> None:
        super().remove(request_id)
        # Keep stale entries from piling up behind a long-lived front entry.
        if len(self._order) > 2 * len(self._live) + 64:
            self._order = deque(e for e in self._order if self._is_live(*e))

    def __iter__(self) -> Iterator[str]:
        return (rid for rid, gen in list(self._order) if self._is_live(rid, gen))


class PriorityPolicy(_LazyDeletion, WaitingPolicy):
    """Smallest (priority, arrival_time, request_id) first, as vLLM's
    ``Request.__lt__``; a preempted request simply re-enters by its key."""

    def __init__(self) -> None:
        super().__init__()
        # heap of (priority, arrival_time, request_id, generation)
        self._heap: list[tuple[int, float, str, int]] = []

    def add(self, view: RequestView) -> None:
        gen = self._enter(view.request_id)
        heapq.heappush(self._heap, (view.priority, view.arrival_time, view.request_id, gen))

    prepend = add

    def _front(self) -> str:
        heap = self._heap
        while heap:
            _, _, rid, gen = heap[0]
            if self._is_live(rid, gen):
                return rid
            heapq.heappop(heap)
        raise IndexError("peek from an empty waiting queue")

    def peek(self) -> str:
        return self._front()

    def pop(self) -> str:
        rid = self._front()
        heapq.heappop(self._heap)
        del self._live[rid]
        return rid

    def remove(self, request_id: str) -> None:
        super().remove(request_id)
        if len(self._heap) > 2 * len(self._live) + 64:
            self._heap = [e for e in self._heap if self._is_live(e[2], e[3])]
            heapq.heapify(self._heap)

    def __iter__(self) -> Iterator[str]:
        return (e[2] for e in sorted(self._heap) if self._is_live(e[2], e[3]))

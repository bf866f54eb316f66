# SPDX-License-Identifier: Apache-2.0
"""A vLLM ``RequestQueue`` whose order is decided by a `WaitingPolicy`.

vLLM's scheduler admits waiting requests by ``peek_request``/``pop_request`` on
``Scheduler.waiting`` and stops at the first one that does not fit, so the
order of this queue is the admission order.  On vLLM 0.26 as released the
scheduler replaces ``Scheduler.waiting`` with this queue after construction and
wraps ``schedule()`` only to hand the policy its per-step KV figures; with the
hooks proposed in ``patches/`` it needs neither.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import overload

from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.request_queue import RequestQueue
from vllm.v1.request import Request

from asyncbatch.policy import RequestView, WaitingPolicy


def request_view(request: Request) -> RequestView:
    return RequestView(
        request_id=request.request_id,
        arrival_time=request.arrival_time,
        priority=request.priority,
        num_prompt_tokens=request.num_prompt_tokens,
        max_tokens=request.max_tokens,
        block_hashes=request.block_hashes,
        num_preemptions=request.num_preemptions,
    )


class PolicyRequestQueue(RequestQueue):
    """While ``gated`` (during the waiting-admission part of ``schedule()``), the
    queue is falsy once the policy closes admission for the step, which ends
    vLLM's admission loop without an override of ``schedule()``.

    Where vLLM has the waiting-queue hooks (patches/0001), ``schedule()`` calls
    `begin_step`, `may_admit` and `end_step` itself: ``admission_gated`` then
    stands for ``gated`` and the queue never turns falsy."""

    def __init__(self, policy: WaitingPolicy) -> None:
        self.policy = policy
        self.gated = False
        self.admission_gated = False
        # Set by asyncbatch.Scheduler where vLLM has the waiting-queue hooks.
        self.on_begin_step: Callable[[], None] | None = None
        self.on_end_step: Callable[[SchedulerOutput], None] | None = None
        # request_id -> Request, for every request in the queue
        self._requests: dict[str, Request] = {}

    def add_request(self, request: Request) -> None:
        if request.request_id in self._requests:
            # vLLM's FCFS deque would hold it twice, the first copy in place, and
            # ``remove_requests`` would then drop both (vLLM 0.26 re-enqueues a
            # streaming-input session whose chunk ended while it was preempted, and
            # removes it right after): keep the one copy in place, do not raise.
            return
        self.policy.add(request_view(request))
        self._requests[request.request_id] = request

    def prepend_request(self, request: Request) -> None:
        if request.request_id in self._requests:
            self.remove_request(request)
        self.policy.prepend(request_view(request))
        self._requests[request.request_id] = request

    def prepend_requests(self, requests: RequestQueue) -> None:
        # Same order as vLLM's FCFS deque.extendleft: the last one ends up first.
        for request in requests:
            self.prepend_request(request)

    def peek_request(self) -> Request:
        return self._requests[self.policy.peek()]

    def pop_request(self) -> Request:
        return self._requests.pop(self.policy.pop())

    def remove_request(self, request: Request) -> None:
        # As vLLM's queues (``deque.remove``, ``list.remove``): absent is a ValueError.
        if request.request_id not in self._requests:
            raise ValueError(f"request {request.request_id!r} is not in the waiting queue")
        self.policy.remove(request.request_id)
        del self._requests[request.request_id]

    def remove_requests(self, requests: Iterable[Request]) -> None:
        # vLLM removes a finished request from `waiting` and `skipped_waiting` with the
        # same list (``Scheduler.finish_requests``): remove what is here, ignore the rest.
        held = self._requests
        for request in requests:
            if held.get(request.request_id) is request:
                self.remove_request(request)

    def __bool__(self) -> bool:
        if self.gated:
            return self.policy.admissible()
        return bool(self._requests)

    def begin_step(self, scheduler: object) -> None:
        if self.on_begin_step is not None:
            self.on_begin_step()

    def may_admit(self) -> bool:
        return self.policy.admissible() if self.admission_gated else True

    def end_step(self, scheduler_output: SchedulerOutput) -> None:
        if self.on_end_step is not None:
            self.on_end_step(scheduler_output)

    def __len__(self) -> int:
        return len(self._requests)

    def __iter__(self) -> Iterator[Request]:
        return (self._requests[rid] for rid in self.policy)

    @overload
    def __getitem__(self, index: int) -> Request: ...

    @overload
    def __getitem__(self, index: slice) -> list[Request]: ...

    def __getitem__(self, index: int | slice) -> Request | list[Request]:
        """The request(s) at ``index`` in admission order, as vLLM's FCFS queue (a
        deque) answers. O(n): for inspection, not for the scheduling path."""
        return list(self)[index]

    def __contains__(self, request: object) -> bool:
        return getattr(request, "request_id", None) in self._requests

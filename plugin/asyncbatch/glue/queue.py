# SPDX-License-Identifier: Apache-2.0
"""A vLLM ``RequestQueue`` whose order is decided by a `WaitingPolicy`.

vLLM's scheduler admits waiting requests by ``peek_request``/``pop_request`` on
``Scheduler.waiting`` and stops at the first one that does not fit, so the
order of this queue is the admission order.

Calls run one way: the scheduler calls the queue, and the queue reads what it
needs from the scheduler it is handed (`begin_step`).  With the waiting-queue
hooks proposed in ``patches/0001`` vLLM's ``schedule()`` itself calls
`begin_step`, `may_admit` (the memory gate) and `end_step`.  On vLLM as released,
``asyncbatch.Scheduler`` replaces ``Scheduler.waiting`` with this queue after
construction and wraps ``schedule()`` to call `begin_step` and `end_step`; the
gate then ends vLLM's admission loop by making the queue falsy while it is closed
(``gate_by_falsiness``), since that loop stops on an empty queue.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any, overload

from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.request_queue import RequestQueue
from vllm.v1.request import Request, RequestStatus

from asyncbatch.policy import RequestView, WaitingPolicy
from asyncbatch.policy.prefix import PrefixGroupingPolicy, StepState


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
    """The waiting queue, in the order of ``policy``.

    Args:
        policy: decides the order (`asyncbatch.policy`).
        memory_gate: with the prefix policy, let its KV forecast end admission for
            a step (`may_admit`).
        gate_by_falsiness: end admission by turning falsy while the gate is closed
            (vLLM without ``may_admit``, see the module docstring).
    """

    def __init__(self, policy: WaitingPolicy, *, memory_gate: bool = False,
                 gate_by_falsiness: bool = False) -> None:
        self.policy = policy
        # The per-step part (KV figures, gate) belongs to the prefix policy only.
        self.prefix_policy = policy if isinstance(policy, PrefixGroupingPolicy) else None
        self.memory_gate = memory_gate and self.prefix_policy is not None
        self.gate_by_falsiness = gate_by_falsiness
        # Between begin_step and end_step of a step the policy was told about.
        self.step_open = False
        # The memory gate is consulted: step_open and memory_gate.
        self.gated = False
        # request_id -> prompt tokens it found in the prefix cache when admitted, for
        # the running requests the policy was told about (their blocks are shared)
        self.num_cached_tokens: dict[str, int] = {}
        # request_id -> Request, for every request in the queue
        self._requests: dict[str, Request] = {}

    # ------------------------------------------------------------ vLLM's queue API

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

    def prepend_requests(self, requests: Iterable[Request]) -> None:  # type: ignore[override]
        # Same order as vLLM's FCFS deque.extendleft: the last one ends up first.
        # (vLLM passes a RequestQueue up to 0.30 and a deque from 0.31.)
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
        # vLLM removes a finished request from every waiting queue with the same list
        # (``Scheduler.finish_requests``): remove what is here, ignore the rest.
        held = self._requests
        for request in requests:
            if held.get(request.request_id) is request:
                self.remove_request(request)

    def __bool__(self) -> bool:
        if self.gated and self.gate_by_falsiness:
            return self.policy.admissible()
        return bool(self._requests)

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

    # ------------------------------------------- the step (patches/0001's hooks)

    def begin_step(self, scheduler: Any) -> None:
        """Start of ``schedule()``: hand the prefix policy the step's KV figures,
        read from ``scheduler``.  Nothing to do for other policies, or with no
        request waiting."""
        if self.step_open:  # the last schedule() raised before end_step (vLLM with
            self.end_step(None)  # patches/0001 calls the two without a try/finally)
        policy = self.prefix_policy
        if policy is None or not self._requests:
            return
        policy.begin_step(step_state(scheduler, policy, self.memory_gate,
                                     self.num_cached_tokens))
        self.step_open = True
        self.gated = self.memory_gate

    def may_admit(self) -> bool:
        """Whether the next request may be admitted in this step (the memory gate)."""
        return not self.gated or self.policy.admissible()

    def end_step(self, scheduler_output: SchedulerOutput | None) -> None:
        """End of ``schedule()`` (``None``: it raised)."""
        if not self.step_open:
            return
        self.step_open = self.gated = False
        assert self.prefix_policy is not None
        self.prefix_policy.end_step()
        if scheduler_output is not None:
            cached = self.num_cached_tokens
            for new in scheduler_output.scheduled_new_reqs:
                # Tokens found in the prefix cache at admission: blocks shared with others.
                cached[new.req_id] = new.num_computed_tokens

    def request_finished(self, request: Request) -> None:
        """A request left the scheduler: the policy learns its output length."""
        policy = self.prefix_policy
        if policy is None:
            return
        # Learn output lengths from requests that ended on their own.
        if request.status != RequestStatus.FINISHED_ABORTED:
            policy.on_finished(request.num_output_tokens, request.max_tokens)
        self.num_cached_tokens.pop(request.request_id, None)


def step_state(scheduler: Any, policy: PrefixGroupingPolicy, memory_gate: bool,
               num_cached_tokens: dict[str, int]) -> StepState:
    """The KV figures of this step, from vLLM's scheduler."""
    running: list[tuple[int, int]] = []
    if memory_gate and len(scheduler.running) < scheduler.max_num_running_reqs:
        block_size = scheduler.block_size
        expected = policy.expected_tokens
        for r in scheduler.running:
            computed = r.num_computed_tokens
            # Blocks found in the prefix cache are shared: not this request's own.
            own = -(-computed // block_size) - num_cached_tokens.get(r.request_id, 0) // block_size
            left = expected(r.num_prompt_tokens, r.max_tokens) - computed
            running.append((max(left, 0), max(own, 0)))
    lowest = None
    if policy.use_priority and scheduler.running:
        lowest = max(r.priority for r in scheduler.running)
    return StepState(
        num_free_blocks=scheduler.kv_cache_manager.block_pool.get_num_free_blocks(),
        running=running,
        now=time.time(),
        lowest_running_priority=lowest,
    )

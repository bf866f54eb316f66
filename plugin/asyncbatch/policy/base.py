# SPDX-License-Identifier: Apache-2.0
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

from asyncbatch.policy.views import RequestView


class WaitingPolicy(ABC):
    """An ordered set of waiting requests, keyed by request id.

    The contract mirrors vLLM's ``RequestQueue`` so that the glue can forward
    each call: ``peek``/``pop`` give the request to try to admit next;
    ``prepend`` takes back a preempted request, which must come out before
    everything of its priority; ``remove`` drops a request that left the queue
    without being admitted (abort, stop while preempted).  Each call should cost
    O(log n) or amortized O(1): the scheduler calls them on every step.
    """

    @abstractmethod
    def add(self, view: RequestView) -> None: ...

    @abstractmethod
    def prepend(self, view: RequestView) -> None: ...

    @abstractmethod
    def peek(self) -> str:
        """The id of the next request to admit; `IndexError` when empty."""

    @abstractmethod
    def pop(self) -> str:
        """Remove and return the id `peek` returns; `IndexError` when empty."""

    @abstractmethod
    def remove(self, request_id: str) -> None:
        """Drop a request; unknown ids are an error (`KeyError`)."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __iter__(self) -> Iterator[str]:
        """Ids in admission order.  Not for the hot path."""

    def __contains__(self, request_id: object) -> bool:
        return any(rid == request_id for rid in self)

    def admissible(self) -> bool:
        """Whether the request `peek` names may be admitted in the current step.
        Policies without a memory gate admit whenever they have a request."""
        return len(self) > 0

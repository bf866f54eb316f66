# SPDX-License-Identifier: Apache-2.0
"""The policy room: which waiting request to admit next.

Pure Python, no torch and no vLLM.  A policy sees `RequestView`s, plain records
that the vLLM glue (`asyncbatch.glue`) makes from vLLM's requests, and answers
with request ids.  Everything here can be tested without vLLM installed.
"""

from asyncbatch.policy.base import WaitingPolicy
from asyncbatch.policy.fcfs import FcfsPolicy, PriorityPolicy
from asyncbatch.policy.views import RequestView

__all__ = ["FcfsPolicy", "PriorityPolicy", "RequestView", "WaitingPolicy", "make_policy"]


def make_policy(name: str, *, vllm_policy: str) -> WaitingPolicy:
    """The waiting-queue policy for plugin setting ``policy`` and vLLM's
    ``--scheduling-policy`` (``"fcfs"`` or ``"priority"``)."""
    if name != "fcfs":
        raise ValueError(f"unknown asyncbatch policy {name!r}")
    if vllm_policy == "priority":
        return PriorityPolicy()
    if vllm_policy == "fcfs":
        return FcfsPolicy()
    raise ValueError(f"unknown vLLM scheduling policy {vllm_policy!r}")

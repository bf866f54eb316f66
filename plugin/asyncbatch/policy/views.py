# SPDX-License-Identifier: Apache-2.0
from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass


@dataclass(slots=True)
class RequestView:
    """What a policy may know about one request.

    Made by the glue when the request enters the waiting queue (new, or back
    after preemption).  Fields use vLLM's names.
    """

    request_id: str
    # Seconds since the epoch, as vLLM's Request.arrival_time.
    arrival_time: float
    # vLLM priority: smaller runs first (only under --scheduling-policy priority).
    priority: int
    num_prompt_tokens: int
    max_tokens: int
    # vLLM's chained hash of every full block of the prompt: block_hashes[i]
    # fingerprints tokens [0, (i + 1) * block_size).  Shared by reference, not copied.
    block_hashes: Sequence[Hashable] = ()
    # > 0 for a request that was preempted and comes back with progress.
    num_preemptions: int = 0

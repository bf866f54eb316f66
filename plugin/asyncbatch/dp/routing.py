# SPDX-License-Identifier: Apache-2.0
"""Which data-parallel rank serves a request: rendezvous hashing with bounded loads.

Pure Python (hashlib only): no vLLM, no torch, no state.  Every decision is a
function of the request's key and the load view it is given, so several API
servers (``--api-server-count``) that see the same loads choose the same rank
without talking to each other, and the choice does not depend on
``PYTHONHASHSEED`` (Python's ``hash`` is never used; vLLM 0.26's own block-hash
root is random per process, so its block hashes cannot serve as a key either).

**Key** (`prefix_key`): a 128-bit BLAKE2b digest of the first whole KV blocks of
the prompt, at most ``prefix_tokens`` tokens, together with everything vLLM's
prefix cache keys a block on besides its tokens: the ``cache_salt``, the LoRA
adapter, and the identifiers of multimodal items that start inside the keyed
tokens.  Two prompts that share their first ``prefix_tokens`` tokens (and salt
and adapter) get the same key; so do prompts shorter than that which share all
their whole blocks.  A prompt shorter than one block has no key (the caller
falls back to plain load balancing).

**Order** (`hrw_order`): the ranks sorted by the weight ``BLAKE2b(key, rank)``,
highest first (rendezvous or highest-random-weight hashing).  Every key has its
own pseudo-random order of the ranks, so keys spread evenly, and a rank that
goes away moves only the keys that ranked it first (to their second choice);
no other key moves.

**Bound** (`rank_for`): the first rank in that order whose load after taking the
request stays within ``ceil((1 + eps) * mean)``, the mean taken after adding the
request (consistent hashing with bounded loads, Mirrokni, Thorup and Zadimoghaddam,
SODA 2018).  A hot prefix fills its first rank up to the bound and overflows to
its second choice, then its third, so no rank carries more than ``1 + eps``
times the mean plus one request; keys whose first rank is under the bound are
not moved.  With integer loads some rank always satisfies the bound; should
none (fractional loads), the least loaded rank takes the request.  A ``slack``
raises the cap to at least ``ceil(mean) + slack``: at low load (a few requests
per rank) the relative bound alone would move groups over differences of a
request or two, which cost nothing while the engines have room.

**Seats** (``capacity``, optional): the most requests an engine runs at once
(vLLM's ``max_num_seqs``).  While some rank has a free seat, only ranks with a
free seat qualify: a request sent to a full engine waits for a whole request to
finish (seconds), which costs far more than computing its prefix again on an
engine that has room (one prefill).  When every rank is full, seats are not
considered.  Without this, a burst that fills the engines exactly (stock's
strict alternation) would leave the ranks that the bound lets run a few
requests over ``max_num_seqs`` with a second wave of those few requests.

**New keys** (``new_key_slack``, optional): a key that has no request in
flight (as the caller counts them, ``key_load``) has no group on any rank to
keep together yet, so it gets a tighter cap: ``ceil(mean) + new_key_slack``
instead of the bound's ``(1 + eps)`` times the mean.  Prompts that share no
prefix (every key new) are then split about as evenly as load balancing
splits them: under the bound alone their rendezvous choices make a random
walk that only the cap stops, and with several API servers, each routing its
own share of a burst blind to the others', the engines ended up 1.04x apart by
requests (``benchmarks/results/dp-h200-kv``).  The first request of a prefix
group moves off its first choice only when that rank is more than
``new_key_slack`` above the mean.

**Key share** (``key_load``, ``key_share``, optional): one key may hold at most
``key_share`` of a rank's cap (at least ``slack``); past that its requests go
to the next rank in its order that is within the bound.  A hot prefix is then
spread over several ranks before it fills one, and the groups whose first
choice that rank is keep it.  Without it, the rank a hot prefix prefers fills
up with that prefix's requests (cheap: their prefix is cached) and turns away
every other key that prefers it (expensive: their prefixes are computed a
second time elsewhere), so the ranks hold equal numbers of requests but
unequal work.  The key's load per rank is the caller's to count (the requests
with that key it routed and that are still in flight); it is the only input
that is not the request's own or the load view, so API servers that each
count their own requests agree on the order, not on the exact spill point.
"""

from __future__ import annotations

import hashlib
import math
import sys
from array import array
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "DEFAULT_KEY_SHARE", "DEFAULT_LOAD_BOUND", "DEFAULT_LOAD_SLACK", "DEFAULT_NEW_KEY_SLACK",
    "DEFAULT_PREFIX_TOKENS",
    "KEY_SIZE", "hrw_order", "key_length", "load_cap", "prefix_key", "rank_for",
]

# Default ``eps`` of the load bound.  With two ranks the busier holds at most
# (1 + eps) / (1 - eps) = 1.22x the load of the other (plus one request); a
# group whose first rank is full overflows to its second choice, which then
# holds the prefix too, so a tight bound costs one extra prefill per overflowing
# group, not one per request.
DEFAULT_LOAD_BOUND = 0.1
# Default slack: an engine may always hold this many requests above the mean.
# At low load the relative bound is a request or two; in a CPU simulation of two
# engines (benchmarks/results/dp-replay) 0 recomputed 44 of 64 shared prefixes a
# second time at ~8 requests in flight per engine, 8 none.
DEFAULT_LOAD_SLACK = 8.0
# Default key length in tokens: 4 KV blocks of 16.  Long enough to pass the
# chat-template header (about 25-40 tokens for Llama 3 or Qwen 2.5) and reach
# the text that tells conversations apart, short enough that consecutive turns
# of a conversation (whose first turn is usually longer than this) and prompts
# sharing a long prefix map to the same key.
DEFAULT_PREFIX_TOKENS = 64
# Default slack of a new key (no request in flight): 4 requests over the mean.
# In the replay with two API servers under KV pressure
# (benchmarks/results/dp-replay), random prompts at saturation went from 0.94x
# stock to 0.99x; 2 computed 1.5x the ideal prompt tokens at 16 req/s (first
# requests of groups moved off their first choice), 8 left random prompts at
# 0.95x.
DEFAULT_NEW_KEY_SLACK = 4.0
# Default key share: one key may hold half of a rank's cap.  With two ranks a
# key that is half the traffic is then split about evenly over both.
DEFAULT_KEY_SHARE = 0.5
KEY_SIZE = 16
_KEY_DOMAIN = b"asyncbatch.dp.key.v1"
_LITTLE = sys.byteorder == "little"


def key_length(num_tokens: int, block_size: int, prefix_tokens: int) -> int:
    """Tokens the key covers: the prompt's whole blocks, at most
    ``prefix_tokens`` rounded down to whole blocks (and at least one block);
    0 for a prompt shorter than one block."""
    if block_size < 1 or prefix_tokens < 1:
        raise ValueError(f"block_size and prefix_tokens must be >= 1, got {block_size}, "
                         f"{prefix_tokens}")
    max_blocks = max(1, prefix_tokens // block_size)
    return min(num_tokens // block_size, max_blocks) * block_size


def _field(h: Any, value: bytes) -> None:
    h.update(len(value).to_bytes(8, "little"))
    h.update(value)


def prefix_key(token_ids: Sequence[int], *, block_size: int = 16,
               prefix_tokens: int = DEFAULT_PREFIX_TOKENS, cache_salt: str | None = None,
               lora_name: str | None = None, extra: Iterable[str] = ()) -> bytes | None:
    """The routing key of a prompt (`KEY_SIZE` bytes), or None when the prompt is
    shorter than one block.

    Args:
        token_ids: the prompt's token ids.
        block_size: KV block size in tokens; the key covers whole blocks.
        prefix_tokens: most tokens the key covers (see `key_length`).
        cache_salt: vLLM's ``cache_salt``: prompts with different salts never
            share cached blocks, so they get different keys.
        lora_name: the LoRA adapter's name (blocks are cached per adapter).
        extra: further strings that identify what the keyed tokens stand for
            (multimodal item identifiers).
    """
    n = key_length(len(token_ids), block_size, prefix_tokens)
    if n == 0:
        return None
    tokens = array("q", token_ids[:n])
    if not _LITTLE:
        tokens.byteswap()
    h = hashlib.blake2b(digest_size=KEY_SIZE, person=b"asyncbatch-dp")
    h.update(_KEY_DOMAIN)
    _field(h, b"" if cache_salt is None else b"s" + cache_salt.encode())
    _field(h, b"" if lora_name is None else b"l" + lora_name.encode())
    for item in extra:
        _field(h, b"m" + item.encode())
    _field(h, tokens.tobytes())
    return h.digest()


def _weight(key: bytes, rank: int) -> int:
    digest = hashlib.blake2b(rank.to_bytes(8, "little", signed=True), digest_size=8,
                             key=key[:64]).digest()
    return int.from_bytes(digest, "little")


def hrw_order(key: bytes, ranks: Iterable[int]) -> list[int]:
    """``ranks`` in the key's rendezvous order, most preferred first (ties, which
    need a 64-bit collision, by rank)."""
    return sorted(ranks, key=lambda r: (-_weight(key, r), r))


def _ceil(x: float) -> int:
    """``math.ceil``, reading a value within rounding error above an integer as
    that integer: in binary floating point ``(1 + 0.1) * 100 / 2`` is
    55.00000000000001, and the bound of a decimal ``eps`` means 55."""
    return math.ceil(x - 1e-9 * max(1.0, abs(x)))


def load_cap(total: float, num_ranks: int, eps: float, cost: float = 1.0,
             slack: float = 0.0) -> float:
    """Most load a rank may hold after taking a request: ``ceil((1 + eps) *
    mean)``, and at least ``ceil(mean) + slack``, with ``mean = (total + cost) /
    num_ranks``."""
    relative = _ceil((1.0 + eps) * (total + cost) / num_ranks)
    return float(max(relative, math.ceil((total + cost) / num_ranks) + slack))


def _as_mapping(loads: Sequence[float] | Mapping[int, float]) -> Mapping[int, float]:
    if isinstance(loads, Mapping):
        return loads
    return dict(enumerate(loads))


def rank_for(key: bytes | None, loads: Sequence[float] | Mapping[int, float],
             eps: float = DEFAULT_LOAD_BOUND, *, cost: float = 1.0,
             explicit: int | None = None, capacity: float | None = None,
             slack: float = 0.0, key_load: Mapping[int, float] | None = None,
             key_share: float = 1.0, new_key_slack: float | None = None) -> int:
    """The rank that serves a request.

    Args:
        key: the request's `prefix_key`; None (no key) picks the least loaded
            rank, ties to the lowest rank.
        loads: each available rank's load, as a sequence (ranks ``0..n-1``) or a
            mapping from rank to load (the ranks present; a rank that went away
            is simply absent).  Negative loads count as 0.
        eps: the load bound (``>= 0``); ``math.inf`` routes by key alone (among
            the ranks with a free seat, when ``capacity`` is given).
        cost: the load one request adds.
        explicit: a rank the request names (``data_parallel_rank``); it wins.
        capacity: seats per rank, in the units of ``loads``; while a rank has
            ``load + cost <= capacity``, ranks without a free seat do not
            qualify.  None: no seat limit.
        slack: a rank may always hold ``slack`` more than the mean (rounded
            up), in the units of ``loads``: at low load the relative bound
            alone would move a group over a difference of a request or two.
        key_load: this key's load on each rank (absent: 0), in the units of
            ``loads``: the requests with this key the caller routed there that
            are still in flight.  None: not counted (no key share).
        key_share: the most of a rank's cap the key may hold, at least
            ``slack`` (and one request); past it the key's next rank within
            the bound takes the request, if there is one.  ``>= 1``: no limit.
        new_key_slack: for a key with nothing in flight (``key_load`` given,
            no positive entry), the cap is at most ``ceil(mean) + new_key_slack``
            (units of ``loads``).  None: the same cap as every key.

    Raises:
        ValueError: no ranks, a negative ``eps``, ``slack`` or ``key_share``,
            or a capacity below ``cost``.
    """
    if explicit is not None:
        return explicit
    view = _as_mapping(loads)
    if not view:
        raise ValueError("no data-parallel ranks to route to")
    if eps < 0:
        raise ValueError(f"the load bound eps must be >= 0, got {eps}")
    if slack < 0:
        raise ValueError(f"slack must be >= 0, got {slack}")
    if not key_share >= 0:
        raise ValueError(f"key_share must be >= 0, got {key_share}")
    if capacity is not None and capacity < cost:
        raise ValueError(f"capacity {capacity} is below the cost of one request ({cost})")
    current = {r: max(0.0, float(v)) for r, v in view.items()}
    if key is None:
        return min(current, key=lambda r: (current[r], r))
    order = hrw_order(key, current)
    if len(order) == 1:
        return order[0]
    if capacity is not None:
        with_seats = [r for r in order if current[r] + cost <= capacity]
        if with_seats and len(with_seats) < len(order):
            # The bound applies among the ranks with seats; the least loaded of
            # them (never above the mean) satisfies it.
            order = with_seats
    if math.isinf(eps):
        return order[0]
    total = sum(current.values())
    cap = load_cap(total, len(current), eps, cost, slack)
    if (new_key_slack is not None and key_load is not None
            and not any(v > 0 for v in key_load.values())):
        # a key with nothing in flight: no group to keep together yet
        cap = min(cap, math.ceil((total + cost) / len(current)) + new_key_slack)
    within = [r for r in order if current[r] + cost <= cap]
    if key_load and key_share < 1.0:
        share_cap = max(key_share * cap, slack, cost)
        for rank in within:
            if max(0.0, float(key_load.get(rank, 0.0))) + cost <= share_cap:
                return rank
    if within:
        return within[0]
    position = {r: i for i, r in enumerate(order)}
    return min(order, key=lambda r: (current[r], position[r]))

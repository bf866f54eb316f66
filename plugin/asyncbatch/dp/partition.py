# SPDX-License-Identifier: Apache-2.0
"""Offline data parallelism: split a prompt list over engines by prefix group.

vLLM refuses ``LLM(data_parallel_size > 1)`` for dense models, and its own
example (``examples/offline_inference/data_parallel.py``) gives each engine a
contiguous slice of the prompts, so the members of a prefix group land on
several engines and each computes the shared prefix.  `partition_by_prefix`
gives whole groups (prompts with the same `asyncbatch.dp.routing.prefix_key`)
to engines, balanced by token cost.  Pure Python, no vLLM import.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from asyncbatch.dp.routing import DEFAULT_PREFIX_TOKENS, prefix_key

__all__ = ["partition_by_prefix"]

Prompt = Any  # str | Sequence[int] | Mapping (vLLM's TextPrompt / TokensPrompt dicts)


def _tokens_of(prompt: Prompt, tokenizer: Any) -> Sequence[int] | str:
    if isinstance(prompt, Mapping):
        if prompt.get("prompt_token_ids") is not None:
            return list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return _tokens_of(prompt["prompt"], tokenizer)
        raise TypeError(f"a prompt dict needs 'prompt_token_ids' or 'prompt', got keys "
                        f"{sorted(prompt)}")
    if isinstance(prompt, str):
        if tokenizer is None:
            return prompt
        if callable(getattr(tokenizer, "encode", None)):
            return list(tokenizer.encode(prompt))
        return list(tokenizer(prompt))
    return list(prompt)


def _common_prefix(a: Sequence[Any], b: Sequence[Any], limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def partition_by_prefix(prompts: Sequence[Prompt], n: int, *, tokenizer: Any = None,
                        block_size: int = 16, prefix_tokens: int = DEFAULT_PREFIX_TOKENS,
                        output_tokens: int | Sequence[int] = 0,
                        split_large_groups: bool = True,
                        key: Callable[[int], Any] | None = None) -> list[list[int]]:
    """Indices of ``prompts`` for each of ``n`` engines, whole prefix groups together.

    Prompts with the same key (their first ``prefix_tokens`` tokens, in whole
    blocks of ``block_size``; `asyncbatch.dp.routing.prefix_key`) form a group.
    A group costs its shared prefix once plus every member's remaining prompt
    tokens and ``output_tokens``.  Groups go to engines largest first, each to
    the engine with the least cost so far (LPT), so the costliest engine is
    within ``4/3`` of the best possible split and within one group of the mean.

    Args:
        prompts: token-id lists, strings, or vLLM prompt dicts
            (``{"prompt_token_ids": [...]}`` or ``{"prompt": "..."}``).
        n: number of engines (>= 1).
        tokenizer: turns strings into token ids (anything with ``encode``, or a
            callable).  Without one, strings are keyed and costed by characters:
            the key covers the first ``4 * prefix_tokens`` characters (4
            characters a token), and a string costs its length / 4.
        block_size: KV block size in tokens.
        prefix_tokens: tokens the key covers.
        output_tokens: expected output tokens, one number for all or one per prompt.
        split_large_groups: a group that costs more than an engine's fair share
            (total / n) is cut into consecutive pieces of about that share, each
            to its own engine (each piece computes the prefix once), so one hot
            prefix cannot leave the other engines idle.  False keeps every group
            whole.
        key: ``key(i) -> hashable`` replaces the prefix key of prompt ``i``
            (e.g. a conversation id).

    Returns:
        ``n`` lists of indices into ``prompts``; every index appears exactly once.
        Within a list, a group's members are adjacent and in input order, and the
        groups in the order of their first member, so ``outputs[j]`` of engine
        ``e`` answers ``prompts[parts[e][j]]``.  Put outputs back in input order
        with ``for part, outs in zip(parts, per_engine): for i, o in zip(part,
        outs): result[i] = o``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    num = len(prompts)
    if isinstance(output_tokens, int):
        outs = [output_tokens] * num
    else:
        outs = list(output_tokens)
        if len(outs) != num:
            raise ValueError(f"output_tokens has {len(outs)} entries for {num} prompts")
    seqs = [_tokens_of(p, tokenizer) for p in prompts]
    groups: dict[Any, list[int]] = {}
    for i, seq in enumerate(seqs):
        if key is not None:
            k: Any = ("k", key(i))
        elif isinstance(seq, str):
            width = 4 * prefix_tokens
            k = ("c", seq[:width]) if len(seq) >= 4 * block_size else ("i", i)
        else:
            pk = prefix_key(seq, block_size=block_size, prefix_tokens=prefix_tokens)
            k = ("t", pk) if pk is not None else ("i", i)
        groups.setdefault(k, []).append(i)

    def size(i: int) -> float:
        seq = seqs[i]
        return len(seq) / 4 if isinstance(seq, str) else float(len(seq))

    def cost(members: list[int]) -> float:
        first = seqs[members[0]]
        shared = min((_common_prefix(first, seqs[m], len(first)) for m in members[1:]),
                     default=0)
        unit = 0.25 if isinstance(first, str) else 1.0
        return shared * unit + sum(size(m) - shared * unit + outs[m] for m in members)

    pieces: list[tuple[float, int, list[int]]] = []
    fair = sum(cost(m) for m in groups.values()) / n
    for members in groups.values():
        c = cost(members)
        if split_large_groups and n > 1 and c > fair and len(members) > 1:
            per_member = c / len(members)
            take = max(1, int(fair // per_member))
            for start in range(0, len(members), take):
                chunk = members[start:start + take]
                pieces.append((cost(chunk), chunk[0], chunk))
        else:
            pieces.append((c, members[0], members))
    # largest first; equal costs in input order
    pieces.sort(key=lambda p: (-p[0], p[1]))
    heap = [(0.0, e) for e in range(n)]
    assigned: list[list[tuple[int, list[int]]]] = [[] for _ in range(n)]
    for c, first, members in pieces:
        load, e = heapq.heappop(heap)
        assigned[e].append((first, members))
        heapq.heappush(heap, (load + c, e))
    return [[i for _, members in sorted(chunks) for i in members] for chunks in assigned]

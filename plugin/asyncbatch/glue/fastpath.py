# SPDX-License-Identifier: Apache-2.0
"""A steady-decode fast path for ``KVCacheManager.allocate_slots``.

``Scheduler.schedule()`` calls ``allocate_slots`` for every running request in
every step.  In steady decode almost every call finds that the request's blocks
already hold the next token and that no block has filled since the last step, so
there is nothing to allocate and nothing to cache; vLLM still walks the
coordinator and the single-type manager (``remove_skipped_blocks``,
``get_num_blocks_to_allocate``, the free-block check, ``allocate_new_blocks``,
``cache_blocks``) to find that out.  Stack samples of the EngineCore on an H100
(Llama-1B shape, ~1000 requests in decode) put ``allocate_slots`` at 18-23% of
the EngineCore's main thread.

`DecodeSlotsFastPath` answers that common case from three numbers (the request's
block count, its cached-block count and its token counts) and returns vLLM's own
empty result; every other call goes to vLLM's ``allocate_slots`` unchanged.  It
is installed only where those three numbers are the whole story (`fast_path_gaps`
lists what rules it out): one KV cache group of plain full attention, no KV
connector, and a block size equal to the prefix-cache hash block size.  In that
case vLLM's slow path, called instead, would allocate nothing, cache nothing and
return the same empty object; ``verify=True`` calls it after every fast answer
and checks exactly that (the CPU tests run with it).

Two smaller per-request costs of steady decode go the same way:

- the fast answer is a `SteadyDecodeBlocks`: vLLM's empty allocation result (the
  same ``blocks``), whose ``get_block_ids(allow_none=True)``, which the scheduler
  calls for every running request when it builds the step's cached-request data,
  returns None without a generator over the groups;
- `CacheBlocksFastPath` stands in for ``KVCacheManager.cache_blocks``, which
  ``AsyncScheduler`` calls for every request after every step, and which has work
  only when a block has filled and the next step's ``allocate_slots`` has not
  cached it already (in steady decode: a request's last step).  The
  full-attention manager's first test (``num_tokens // block_size`` against the
  cached-block count) is made here, and only a call that passes it goes down
  vLLM's path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.request import RequestStatus

# vLLM with patches/0006 answers the same calls itself, in KVCacheManager
HAS_VLLM_STEADY_DECODE_PATH = hasattr(KVCacheManager, "_steady_decode_needs_nothing")
# set to 1 to check every fast answer against vLLM's own path (the CPU tests do)
VERIFY_FAST_PATH_ENV = "ASYNCBATCH_VERIFY_FAST_PATH"
# the private state of vLLM's KV cache manager that the fast path reads
_MANAGER_STATE = ("req_to_blocks", "num_cached_block", "_partial_hit_reqs", "block_size")


class FastPathMismatch(AssertionError):
    pass


def fast_path_gaps(kv_cache_manager: Any, connector: Any) -> list[str]:
    """Why the fast paths cannot stand in for ``allocate_slots`` and ``cache_blocks``
    here (empty: they can)."""
    gaps = []
    managers: tuple[Any, ...] = tuple(
        getattr(kv_cache_manager.coordinator, "single_type_managers", ()))
    if len(managers) != 1:
        gaps.append(f"{len(managers)} KV cache groups")
    elif type(managers[0]) is not FullAttentionManager:
        gaps.append(f"{type(managers[0]).__name__} layers")
    else:
        manager = managers[0]
        missing = [a for a in _MANAGER_STATE if not hasattr(manager, a)]
        if missing:
            gaps.append(f"this vLLM's KV cache manager lacks {', '.join(missing)}")
        elif (kv_cache_manager.enable_caching
              and manager.block_pool.hash_block_size != manager.block_size):
            gaps.append("a hash block size that differs from the block size")
    if connector is not None:
        gaps.append("a KV connector")
    return gaps


class SteadyDecodeBlocks(KVCacheBlocks):
    """vLLM's empty ``allocate_slots`` result (nothing new for this request), with
    the block-id conversion answered directly."""

    def get_block_ids(self, allow_none: bool = False, **kwargs: Any) -> Any:
        if kwargs:  # vLLM >= 0.33: group_ids
            return super().get_block_ids(allow_none, **kwargs)  # type: ignore[call-overload]
        if allow_none:
            return None
        return tuple([] for _ in self.blocks)


class _ManagerFastPath:
    """What both fast paths read from the one full-attention manager, and their
    counters: ``calls`` made, ``fast`` answered without vLLM's path."""

    def __init__(self, kv_cache_manager: Any, slow: Any, *, verify: bool) -> None:
        self.slow = slow
        (self.manager,) = kv_cache_manager.coordinator.single_type_managers
        self.block_size: int = self.manager.block_size
        self.caching: bool = kv_cache_manager.enable_caching
        self.verify = verify
        self.calls = 0
        self.fast = 0


class DecodeSlotsFastPath(_ManagerFastPath):
    """Drop-in for a ``KVCacheManager``'s bound ``allocate_slots`` (see the module)."""

    def __init__(self, kv_cache_manager: Any, *, verify: bool = False) -> None:
        super().__init__(kv_cache_manager, kv_cache_manager.allocate_slots, verify=verify)
        self.max_model_len: int = kv_cache_manager.max_model_len
        self.empty = kv_cache_manager.empty_kv_cache_blocks
        self.answer = SteadyDecodeBlocks(self.empty.blocks)
        self.block_pool = kv_cache_manager.block_pool
        self.running = RequestStatus.RUNNING

    def __call__(self, request: Any, num_new_tokens: int, num_new_computed_tokens: int = 0,
                 new_computed_blocks: Any = None, num_lookahead_tokens: int = 0,
                 num_external_computed_tokens: int = 0, delay_cache_blocks: bool = False,
                 num_encoder_tokens: int = 0, full_sequence_must_fit: bool = False,
                 reserved_blocks: int = 0, has_scheduled_reqs: bool = True,
                 skip_zeroing_group_ids: tuple[int, ...] = ()) -> Any:
        self.calls += 1
        if (new_computed_blocks is None and num_new_tokens > 0
                and not (num_new_computed_tokens or num_lookahead_tokens
                         or num_external_computed_tokens or delay_cache_blocks
                         or num_encoder_tokens or full_sequence_must_fit or reserved_blocks
                         or skip_zeroing_group_ids)
                and request.status is self.running
                and self._nothing_to_do(request, num_new_tokens)):
            self.fast += 1
            if self.verify:
                self._check(request, num_new_tokens, has_scheduled_reqs)
            return self.answer
        # vLLM >= 0.32 has skip_zeroing_group_ids; pass it on only where it was given.
        extra = {"skip_zeroing_group_ids": skip_zeroing_group_ids} if skip_zeroing_group_ids \
            else {}
        return self.slow(request, num_new_tokens, num_new_computed_tokens, new_computed_blocks,
                         num_lookahead_tokens, num_external_computed_tokens,
                         delay_cache_blocks, num_encoder_tokens, full_sequence_must_fit,
                         reserved_blocks, has_scheduled_reqs, **extra)

    def _nothing_to_do(self, request: Any, num_new_tokens: int) -> bool:
        # the same arithmetic as vLLM's allocate_slots, with no new computed,
        # external, lookahead or encoder tokens (min() spelled out: this runs for
        # every running request in every step)
        manager, rid = self.manager, request.request_id
        blocks = manager.req_to_blocks.get(rid)
        if not blocks or rid in manager._partial_hit_reqs:
            return False
        max_len = self.max_model_len
        computed = request.num_computed_tokens
        if computed > max_len:
            computed = max_len
        end = computed + num_new_tokens
        if (end if end < max_len else max_len) > len(blocks) * self.block_size:
            return False  # a new block is needed
        if self.caching:
            num_tokens = request.num_tokens
            to_cache = end if end < num_tokens else num_tokens
            if to_cache // self.block_size > manager.num_cached_block.get(rid, 0):
                return False  # a block has filled: it gets hashed and cached
        return True

    def _check(self, request: Any, num_new_tokens: int, has_scheduled_reqs: bool) -> None:
        """vLLM's own path on the same call must change nothing and return the same."""
        manager, rid = self.manager, request.request_id
        before = (list(manager.req_to_blocks[rid]), manager.num_cached_block.get(rid, 0),
                  self.block_pool.get_num_free_blocks())
        result = self.slow(request, num_new_tokens, has_scheduled_reqs=has_scheduled_reqs)
        after = (list(manager.req_to_blocks[rid]), manager.num_cached_block.get(rid, 0),
                 self.block_pool.get_num_free_blocks())
        if result is not self.empty or before != after:
            raise FastPathMismatch(
                f"request {rid}: the fast path answered 'nothing to do' but vLLM's "
                f"allocate_slots returned {result!r} and changed {before} -> {after}")


class CacheBlocksFastPath(_ManagerFastPath):
    """Drop-in for a ``KVCacheManager``'s bound ``cache_blocks`` (see the module)."""

    def __init__(self, kv_cache_manager: Any, *, verify: bool = False) -> None:
        super().__init__(kv_cache_manager, kv_cache_manager.cache_blocks, verify=verify)

    def __call__(self, request: Any, num_computed_tokens: int) -> None:
        self.calls += 1
        if (not self.caching or num_computed_tokens // self.block_size
                <= self.manager.num_cached_block.get(request.request_id, 0)):
            self.fast += 1
            if self.verify:
                self._check(request, num_computed_tokens)
            return
        self.slow(request, num_computed_tokens)

    def _check(self, request: Any, num_computed_tokens: int) -> None:
        """vLLM's own path on the same call must cache nothing."""
        manager, rid = self.manager, request.request_id
        blocks = manager.req_to_blocks.get(rid, ())
        # vLLM's cache_blocks only ever hashes blocks past those already cached (and,
        # with prefix caching off, none: then the last block stands for them all).
        first = (manager.num_cached_block.get(rid, 0) if self.caching
                 else max(len(blocks) - 1, 0))

        def state() -> tuple[int, list[Any]]:
            return (manager.num_cached_block.get(rid, 0),
                    [b.block_hash for b in blocks[first:]])

        before = state()
        self.slow(request, num_computed_tokens)
        after = state()
        if before != after:
            raise FastPathMismatch(
                f"request {rid}: the fast path skipped cache_blocks({num_computed_tokens}) "
                f"but vLLM's path changed {before[0]} cached blocks -> {after[0]}")


@dataclass
class DecodeFastPath:
    """The fast paths installed on one scheduler's KV cache manager."""

    slots: DecodeSlotsFastPath
    cache: CacheBlocksFastPath


def install_fast_path(kv_cache_manager: Any, connector: Any, *, verify: bool = False
                      ) -> tuple[DecodeFastPath | None, list[str]]:
    """Put the fast paths in front of ``kv_cache_manager.allocate_slots`` and
    ``cache_blocks`` where they can stand in for them. Returns them and no reasons,
    or None (vLLM's paths unchanged) and `fast_path_gaps`' reasons, or None and
    no reason where vLLM has the same fast path (patches/0006)."""
    if HAS_VLLM_STEADY_DECODE_PATH:
        return None, []
    gaps = fast_path_gaps(kv_cache_manager, connector)
    if gaps:
        return None, gaps
    fast = DecodeFastPath(DecodeSlotsFastPath(kv_cache_manager, verify=verify),
                          CacheBlocksFastPath(kv_cache_manager, verify=verify))
    kv_cache_manager.allocate_slots = fast.slots
    kv_cache_manager.cache_blocks = fast.cache
    return fast, []

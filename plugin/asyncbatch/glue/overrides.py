# SPDX-License-Identifier: Apache-2.0
"""The register of every override of a vLLM internal that asyncbatch makes.

Each entry says what it replaces, why, on which vLLM releases it was verified,
and which upstream change (``patches/`` in the repository, or a vLLM pull
request) would remove it.  ``configs/overrides.md`` is this register as a
table; a test keeps the two in step.

Two kinds:

- **hooks** override a method or property of vLLM's and call vLLM's own code for
  everything they do not change (the waiting-queue swap, the ``schedule()``
  wrapper, ``_update_after_schedule``, ``_free_request``...).  They depend on
  signatures and call order, which the conformance suite (vLLM's own scheduler
  tests) checks on every verified release;
- **fast paths** re-implement a piece of vLLM's logic for the common case.  Each
  names the vLLM functions it shadows, and `fast_path_verified` compares a hash
  of their source with the hash recorded for the installed release: on any other
  code (another release, a patched vLLM) the fast path stays off, and the
  start-up log says why.  An unverified fast path never runs.

Recording a release: run ``python -m asyncbatch.glue.overrides`` next to it, check
the fast path's tests pass there (they compare every fast answer with vLLM's
own path), and add the printed hashes to ``verified``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field

from asyncbatch._compat import installed_vllm_version, release


@dataclass(frozen=True)
class Override:
    name: str
    kind: str  # "hook" or "fast path"
    # the vLLM internal it replaces or stands in front of
    replaces: str
    why: str
    # releases it was verified on
    verified_on: tuple[str, ...]
    # the upstream change that would remove it
    upstream: str
    # fast paths: the vLLM functions whose logic they re-implement, as
    # "module:Qualified.name", and release -> hash of their source (`source_hash`)
    shadows: tuple[str, ...] = ()
    verified: Mapping[str, str] = field(default_factory=dict)


_KV = "vllm.v1.core.kv_cache_manager"
_SINGLE = "vllm.v1.core.single_type_kv_cache_manager"
_SCHED = "vllm.v1.core.sched.scheduler"

REGISTER: tuple[Override, ...] = (
    Override(
        name="waiting queue",
        kind="hook",
        replaces="Scheduler.waiting (replaced after __init__ by a policy-ordered RequestQueue)",
        why="vLLM admits waiting requests in the order of its own FCFS or priority queue; "
            "the prefix policy needs to choose which request goes next",
        verified_on=("0.26.0", "0.33.0"),
        upstream="patches/0001 (Scheduler.make_waiting_queue); RFC vllm#51608",
    ),
    Override(
        name="admission gate",
        kind="hook",
        replaces="Scheduler.schedule (wrapped: the queue turns falsy once the memory "
                 "forecast closes admission)",
        why="the KV-memory forecast must end vLLM's admission loop for the step",
        verified_on=("0.26.0", "0.33.0"),
        upstream="patches/0001 (RequestQueue.begin_step/may_admit/end_step); vllm#54625",
    ),
    Override(
        name="finished hook",
        kind="hook",
        replaces="Scheduler._free_request (wrapped)",
        why="the policy learns output lengths from finished requests",
        verified_on=("0.26.0", "0.33.0"),
        upstream="patches/0002 (Scheduler.on_request_finished)",
    ),
    Override(
        name="evict-first hint",
        kind="hook",
        replaces="Scheduler._free_request_blocks (wrapped; moves freed blocks to the front "
                 "of the free queue), only with release_done_prefixes",
        why="vLLM's LRU keeps a finished group's prefix longest; no waiting request needs it",
        verified_on=("0.26.0", "0.33.0"),
        upstream="patches/0003 (Scheduler.evict_cached_blocks_first); vllm#48485",
    ),
    Override(
        name="structured-output spacing",
        kind="hook",
        replaces="AsyncScheduler._update_after_schedule (extended)",
        why="with three batches in flight a request under a grammar must skip a step, or its "
            "bitmask would come from a grammar that has not seen its last token",
        verified_on=("0.26.0", "0.33.0"),
        upstream="patches/0004 (SchedulerConfig.async_scheduling_depth)",
    ),
    Override(
        name="resume hold",
        kind="hook",
        replaces="Scheduler.schedule (wrapped: with more than two batches in flight, a "
                 "preempted request with a step of its own still in flight leaves the waiting "
                 "queue for the step); only where vLLM does not skip it itself (0.26)",
        why="resumed while a step that samples for it is in flight, a request's prefill "
            "samples the same position and its output placeholders run below zero (vLLM "
            "asserts); with two batches in flight that step has always returned",
        verified_on=("0.26.0", "0.33.0"),
        upstream="vLLM 0.33's own skip of deliverable stale output in Scheduler.schedule "
                 "(on 0.33.0 the hook stands aside)",
    ),
    Override(
        name="pipeline depth",
        kind="hook",
        replaces="VllmConfig.max_concurrent_batches (property replaced)",
        why="the number of batches in flight is a property of vLLM's config; a third batch "
            "needs it to be 3 in the EngineCore and in every worker",
        verified_on=("0.26.0", "0.33.0"),
        upstream="patches/0004 (SchedulerConfig.async_scheduling_depth)",
    ),
    Override(
        name="CUDA-graph ceiling",
        kind="hook",
        replaces="VllmConfig._set_cudagraph_sizes (re-run with a larger "
                 "max_cudagraph_capture_size, by asyncbatch.Worker)",
        why="vLLM's default ceiling (512 tokens) leaves decode batches of more running "
            "requests outside CUDA graphs",
        verified_on=("0.26.0", "0.33.0"),
        upstream="patches/0005 (VllmConfig.default_max_cudagraph_capture_size)",
    ),
    Override(
        name="data-parallel routing",
        kind="hook",
        replaces="DPLBAsyncMPClient.get_core_engine_for_request (wrapped, in the API server "
                 "and AsyncLLM processes; patched when vllm.v1.engine.core_client is "
                 "imported): a request that names no rank gets one by its prefix key, "
                 "then vLLM's method records it as for a named rank; with dp_routing "
                 '"auto", only when the engines run asyncbatch.Scheduler',
        why="vLLM picks a data-parallel engine by load alone, so the members of a prefix "
            "group spread over the engines and each computes the prefix again",
        verified_on=("0.26.0", "0.33.0"),
        upstream="prefix-aware data-parallel balancing in vLLM (vllm#43483)",
    ),
    Override(
        name="decode_fast_path",
        kind="fast path",
        replaces="KVCacheManager.allocate_slots and KVCacheManager.cache_blocks (bound "
                 "methods of the scheduler's manager, answered for steady decode)",
        why="per running request per step, vLLM walks the coordinator to find nothing to "
            "allocate or cache (18-23% of the EngineCore thread at 1000 requests in decode)",
        verified_on=("0.26.0", "0.33.0"),
        upstream="patches/0006 (steady-decode path inside KVCacheManager); vllm#42131",
        shadows=(
            f"{_KV}:KVCacheManager.allocate_slots",
            f"{_KV}:KVCacheManager.cache_blocks",
            f"{_KV}:KVCacheBlocks.get_block_ids",
            f"{_SINGLE}:SingleTypeKVCacheManager.get_num_blocks_to_allocate",
            f"{_SINGLE}:SingleTypeKVCacheManager.cache_blocks",
            f"{_SINGLE}:FullAttentionManager.remove_skipped_blocks",
        ),
        verified={
            "0.26.0": "4cf43d496f9951f3",
            "0.33.0": "0ac36f6ee62ef796",
        },
    ),
    Override(
        name="decode_fast_output",
        kind="fast path",
        replaces="Scheduler.update_from_output (plain decode requests taken out of its "
                 "per-request loop)",
        why="vLLM's general per-request loop is about half the EngineCore's host time per "
            "step at 1000 requests in decode",
        verified_on=("0.26.0", "0.33.0"),
        upstream="patches/0007 (Scheduler._update_plain_decode); vllm#42131",
        shadows=(
            f"{_SCHED}:Scheduler.update_from_output",
            f"{_SCHED}:Scheduler._update_request_with_output",
            "vllm.v1.core.sched.async_scheduler:AsyncScheduler._update_request_with_output",
            "vllm.v1.core.sched.utils:check_stop",
            "vllm.v1.request:Request.append_output_token_ids",
            "vllm.v1.request:Request.take_prefill_stats",
            "vllm.v1.structured_output:StructuredOutputManager.accept_tokens",
        ),
        verified={
            "0.26.0": "b61ebdf2ba058d4c",
            "0.33.0": "c171a8a9969140d2",
        },
    ),
)

BY_NAME = {o.name: o for o in REGISTER}
# The hooks that `asyncbatch.Worker` brings (three batches in flight, larger CUDA
# graphs): they were verified on a GPU only on the releases all three list.
WORKER_HOOKS = ("pipeline depth", "CUDA-graph ceiling", "structured-output spacing")


def worker_unverified(version: str | None = None) -> str | None:
    """None if `asyncbatch.Worker` was verified on a GPU with this vLLM; else why not."""
    version = version if version is not None else installed_vllm_version()
    verified = set.intersection(*(set(BY_NAME[n].verified_on) for n in WORKER_HOOKS))
    if version is not None and release(version) in verified:
        return None
    return (f"asyncbatch.Worker has not been verified on a GPU with vLLM {version} (it was "
            f"with {', '.join(sorted(verified))}). Drop --worker-cls asyncbatch.Worker: "
            "asyncbatch.Scheduler alone supports this vLLM, with two batches in flight.")


def _resolve(dotted: str) -> object | None:
    module_name, _, qualname = dotted.partition(":")
    try:
        obj: object = importlib.import_module(module_name)
    except ImportError:
        return None
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def source_hash(shadows: tuple[str, ...]) -> str:
    """sha256 (16 hex digits) of the source of each shadowed function, in order; a
    function this vLLM lacks counts as missing."""
    digest = hashlib.sha256()
    for dotted in shadows:
        obj = _resolve(dotted)
        try:
            text = inspect.getsource(obj) if obj is not None else "<missing>"  # type: ignore[arg-type]
        except (OSError, TypeError):
            text = "<no source>"
        digest.update(dotted.encode() + b"\0" + text.encode() + b"\0")
    return digest.hexdigest()[:16]


@functools.cache
def fast_path_verified(name: str) -> str | None:
    """None if fast path ``name`` was verified on the vLLM code installed here;
    else why it stays off."""
    override = BY_NAME[name]
    version = installed_vllm_version()
    if version is None:
        return "vLLM is not installed"
    expected = override.verified.get(release(version))
    if not expected:
        verified = ", ".join(sorted(override.verified))
        return f"not verified on vLLM {version} (verified on {verified})"
    if source_hash(override.shadows) != expected:
        return (f"the vLLM {version} code it stands in for is not the code it was verified "
                "against (a patched or modified vLLM)")
    return None


def render_markdown() -> str:
    """The register as the table in ``configs/overrides.md``."""
    lines = ["| override | kind | replaces | why | verified on | removed by |",
             "| --- | --- | --- | --- | --- | --- |"]
    for o in REGISTER:
        verified = ", ".join(o.verified_on)
        if o.shadows:
            verified += " (source hash of the shadowed code checked at start-up)"
        lines.append(f"| {o.name} | {o.kind} | {o.replaces} | {o.why} | {verified} | "
                     f"{o.upstream} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Print each fast path's source hash on the installed vLLM."""
    version = installed_vllm_version()
    for override in REGISTER:
        if override.shadows:
            print(f"{override.name}: vLLM {version} -> {source_hash(override.shadows)!r}")


if __name__ == "__main__":
    main()

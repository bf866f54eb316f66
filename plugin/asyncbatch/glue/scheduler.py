# SPDX-License-Identifier: Apache-2.0
"""`asyncbatch.Scheduler`: vLLM's `AsyncScheduler` with a policy-ordered waiting queue."""

from __future__ import annotations

import os
from collections.abc import Hashable
from typing import Any

from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.request_queue import RequestQueue
from vllm.v1.core.sched.scheduler import Scheduler as VllmScheduler
from vllm.v1.engine import EngineCoreOutputs
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus

from asyncbatch._compat import check_vllm_version, vllm_holds_resumes_in_flight
from asyncbatch.config import AsyncBatchConfig, settings_of
from asyncbatch.glue.checks import async_scheduling_disabled_reason
from asyncbatch.glue.fastoutput import (
    HAS_VLLM_PLAIN_DECODE_OUTPUT,
    DecodeOutputFastPath,
    fast_output_gaps,
)
from asyncbatch.glue.fastpath import (
    HAS_VLLM_STEADY_DECODE_PATH,
    VERIFY_FAST_PATH_ENV,
    DecodeFastPath,
    install_fast_path,
)
from asyncbatch.glue.overrides import fast_path_verified
from asyncbatch.glue.pipeline import (
    STOCK_DEPTH,
    apply_depth,
    has_depth_setting,
    install_depth_override,
)
from asyncbatch.glue.queue import PolicyRequestQueue
from asyncbatch.policy import make_policy
from asyncbatch.policy.prefix import PrefixGroupingPolicy

# Under vLLM's logger, so that its handler and VLLM_LOGGING_LEVEL apply.
logger = init_logger(f"vllm.{__name__}")

# Hooks proposed to vLLM (patches/ in the repository). Where the installed vLLM has one,
# vLLM calls the public method of the same name below; otherwise asyncbatch overrides the
# private vLLM method that the hook replaces (the `if not HAS_...` blocks in the class).
HAS_WAITING_QUEUE_HOOKS = hasattr(VllmScheduler, "make_waiting_queue") and hasattr(
    RequestQueue, "may_admit")
HAS_FINISHED_HOOK = hasattr(VllmScheduler, "on_request_finished")
HAS_EVICT_FIRST_HOOK = hasattr(VllmScheduler, "evict_cached_blocks_first")
# SchedulerConfig.async_scheduling_depth: set by `apply_depth` in __init__ where vLLM has
# it; otherwise VllmConfig.max_concurrent_batches is replaced, here.
HAS_DEPTH_SETTING = has_depth_setting()
# vLLM keeps a preempted request waiting while a step that samples for it is in flight
# (0.33); elsewhere `Scheduler.schedule` holds it back with three batches in flight.
VLLM_HOLDS_RESUMES = vllm_holds_resumes_in_flight()
# EngineCore sizes its batch queue after it has built the scheduler, so importing the
# scheduler is early enough for ``pipeline_depth`` (see glue/pipeline.py).
install_depth_override()


class AsyncSchedulingRequired(RuntimeError):
    pass


class Scheduler(AsyncScheduler):
    """Schedules step N+1 while step N runs (vLLM's async scheduling, two batches
    in flight) and admits waiting requests in the order of an asyncbatch policy.

    vLLM constructs it with keyword arguments only (``EngineCore``); every
    argument is passed on to `AsyncScheduler` unchanged.
    """

    waiting: PolicyRequestQueue

    # Class-level defaults: a scheduler whose state is set without ``__init__`` (vLLM's
    # own tests build one with ``object.__new__`` and assign what they use) behaves as
    # vLLM's AsyncScheduler. ``__init__`` sets each of these on the instance.
    asyncbatch_config = AsyncBatchConfig()
    pipeline_depth = STOCK_DEPTH
    prefix_policy: PrefixGroupingPolicy | None = None
    decode_fast_path: DecodeFastPath | None = None
    decode_fast_output: DecodeOutputFastPath | None = None
    # Requests preempted with a step of theirs in flight, while they may be held
    # (`schedule`); only with more than two batches in flight on a vLLM that resumes
    # such a request at once.
    hold_resumes = False
    draining: list[Request]
    # how many times a request was held back so (for tests and logs)
    num_held_resumes = 0

    def __init__(self, *, vllm_config: VllmConfig, **kwargs: Any) -> None:
        check_vllm_version()
        reason = async_scheduling_disabled_reason(vllm_config)
        if reason is not None:
            raise AsyncSchedulingRequired(
                "asyncbatch.Scheduler needs vLLM's async scheduling (two batches in "
                f"flight), but it is off: {reason}"
            )
        self.asyncbatch_config = settings = settings_of(vllm_config.additional_config)
        self.pipeline_depth = apply_depth(vllm_config)
        self.prefix_policy: PrefixGroupingPolicy | None = None
        super().__init__(vllm_config=vllm_config, **kwargs)
        if not HAS_WAITING_QUEUE_HOOKS:
            self.waiting = self.make_waiting_queue()
        self.hold_resumes = self.pipeline_depth > STOCK_DEPTH and not VLLM_HOLDS_RESUMES
        self.draining = []
        self.decode_fast_path: DecodeFastPath | None = None
        fast_path = "off"
        if settings.decode_fast_path and HAS_VLLM_STEADY_DECODE_PATH:
            fast_path = "vLLM's own (patches/0006)"
        elif settings.decode_fast_path:
            # Fast paths run only on the vLLM code they were verified against.
            unverified = fast_path_verified("decode_fast_path")
            if unverified:
                fast_path = "off: " + unverified
            else:
                self.decode_fast_path, gaps = install_fast_path(
                    self.kv_cache_manager, self.connector,
                    verify=os.environ.get(VERIFY_FAST_PATH_ENV) == "1")
                fast_path = "on" if self.decode_fast_path is not None else (
                    "off: " + ", ".join(gaps))
        self.decode_fast_output: DecodeOutputFastPath | None = None
        fast_output = "off"
        if settings.decode_fast_output and HAS_VLLM_PLAIN_DECODE_OUTPUT:
            fast_output = "vLLM's own (patches/0007)"
        elif settings.decode_fast_output:
            gaps = ([unverified] if (unverified := fast_path_verified("decode_fast_output"))
                    else fast_output_gaps(self))
            if gaps:
                fast_output = "off: " + ", ".join(gaps)
            else:
                self.decode_fast_output = DecodeOutputFastPath(self, super().update_from_output)
                fast_output = "on"
        # what each fast path does here, for the log line and for tests
        self.asyncbatch_fast_paths = {"decode_fast_path": fast_path,
                                      "decode_fast_output": fast_output}
        logger.info("asyncbatch scheduler: %s (vLLM scheduling policy %s, %d batches "
                    "in flight, decode fast path %s, decode fast output %s)", settings,
                    self.policy.value, vllm_config.max_concurrent_batches, fast_path,
                    fast_output)

    def make_waiting_queue(self) -> PolicyRequestQueue:
        """The policy-ordered waiting queue (called by vLLM's `__init__` where vLLM has the
        waiting-queue hooks, else by ours, replacing vLLM's queue)."""
        settings = self.asyncbatch_config
        gate_by_falsiness = not HAS_WAITING_QUEUE_HOOKS
        if settings.policy == "prefix":
            pool = self.kv_cache_manager.block_pool
            self.prefix_policy = PrefixGroupingPolicy(
                block_size=self.hash_block_size,
                num_total_blocks=pool.num_gpu_blocks,
                min_shared_blocks=settings.min_shared_blocks,
                max_wait_steps=settings.max_wait_steps,
                max_wait_s=settings.max_wait_s,
                kv_headroom=settings.kv_headroom,
                forecast_horizon=settings.forecast_horizon,
                decode_first=settings.decode_first,
                use_priority=self.policy.value == "priority",
                grouping=settings.grouping and self.cache_config.enable_prefix_caching,
                is_cached=self._is_cached,
            )
            return PolicyRequestQueue(self.prefix_policy, memory_gate=settings.memory_gate,
                                      gate_by_falsiness=gate_by_falsiness)
        return PolicyRequestQueue(make_policy(settings.policy, vllm_policy=self.policy.value),
                                  gate_by_falsiness=gate_by_falsiness)

    if not HAS_WAITING_QUEUE_HOOKS or not VLLM_HOLDS_RESUMES:
        # vLLM with patches/0001 and its own resume hold needs neither

        def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
            if not self.hold_resumes:
                return self._schedule(*args, **kwargs)
            held = self._hold_draining()
            # vLLM preempts from the end of ``running`` and puts each victim in front of
            # the waiting queue: the victims of one step wait in their running order
            running = list(self.running)
            out = None
            try:
                out = self._schedule(*args, **kwargs)
            finally:
                waiting = self.waiting
                # back in front, in their order; then this step's victims in front of them,
                # where vLLM puts the newest preempted
                for request in reversed(held):
                    waiting.prepend_request(request)
                if out is not None and out.preempted_req_ids:
                    ids = out.preempted_req_ids
                    victims = [r for r in running if r.request_id in ids and r in waiting]
                    for request in reversed(victims):
                        waiting.prepend_request(request)
                    self.draining = victims + self.draining
            return out

        def _hold_draining(self) -> list[Request]:
            """Take out of ``waiting``, for one ``schedule()``, the preempted requests that
            a step still in flight samples for (in queue order).

            vLLM 0.26 resumes a preempted request from the tokens it has, while a step
            that samples for it may still be in flight.  With two batches in flight that
            cannot happen: the step in flight at the preemption returns before the next
            ``schedule()``.  With three, the resumed prefill samples the position that the
            step in flight samples too, and the request's output placeholders run below
            zero when both return (vLLM asserts).  vLLM 0.33 skips such a request in its
            own ``schedule()`` until its output has returned ("deliverable stale output"),
            which this does on the releases that do not.  On 0.26 a preempted request keeps
            its ``num_output_placeholders``, one per sampling step in flight; a request
            force-preempted by ``reset_prefix_cache`` has them set to 0 and its output in
            flight dropped (``async_tokens_to_discard``), so it resumes as vLLM resumes it.
            The held requests go back in front in their order (`schedule`), so the
            waiting order stays vLLM's.
            """
            waiting = self.waiting
            held = [request for request in self.draining
                    if request.status == RequestStatus.PREEMPTED
                    and request.num_output_placeholders > 0 and request in waiting]
            self.draining = held
            for request in held:
                waiting.remove_request(request)
            self.num_held_resumes += len(held)
            return held

        def _schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
            if HAS_WAITING_QUEUE_HOOKS:
                return super().schedule(*args, **kwargs)
            # What vLLM's schedule() does itself with patches/0001.
            waiting = getattr(self, "waiting", None)
            if not isinstance(waiting, PolicyRequestQueue):  # a scheduler built without __init__
                return super().schedule(*args, **kwargs)
            waiting.begin_step(self)
            out = None
            try:
                out = super().schedule(*args, **kwargs)
            finally:
                waiting.end_step(out)
            return out

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           model_runner_output: ModelRunnerOutput) -> dict[int, EngineCoreOutputs]:
        fast = self.decode_fast_output
        if fast is None:
            return super().update_from_output(scheduler_output, model_runner_output)
        return fast(scheduler_output, model_runner_output)

    def _update_after_schedule(self, scheduler_output: SchedulerOutput) -> None:
        super()._update_after_schedule(scheduler_output)
        if (self.pipeline_depth > STOCK_DEPTH
                and scheduler_output.has_structured_output_requests):
            self._space_structured_output_steps(scheduler_output)

    def _space_structured_output_steps(self, scheduler_output: SchedulerOutput) -> None:
        """Keep a request that samples under a grammar out of the next
        ``pipeline_depth - 2`` steps.

        EngineCore computes a step's grammar bitmask either at once or, when a
        request still waits on a token of an earlier step, after the oldest step
        in flight has been processed: so the bitmask is right only if that
        oldest step is the one such a request waits on. With two batches in
        flight that always holds; with ``d`` in flight a request scheduled at step
        ``s`` must not be scheduled again before step ``s + d - 1``, or its
        bitmask would come from a grammar that has not seen its last token yet.
        vLLM's own per-request step gate (``next_decode_eligible_step``, which
        spaces pipeline-parallel decodes) does the skipping.
        """
        eligible = self.current_step + self.pipeline_depth - 1
        for req_id in scheduler_output.num_scheduled_tokens:
            request = self.requests[req_id]
            if request.use_structured_output and not request.is_prefill_chunk:
                request.next_decode_eligible_step = max(
                    request.next_decode_eligible_step, eligible)

    def _is_cached(self, block_hash: Hashable) -> bool:
        if not self.cache_config.enable_prefix_caching:
            return False
        key = make_block_hash_with_group_id(block_hash, 0)  # type: ignore[arg-type]
        cached = self.kv_cache_manager.block_pool.cached_block_hash_to_block
        return cached.get_one_block(key) is not None

    def on_request_finished(self, request: Request) -> None:
        waiting = getattr(self, "waiting", None)
        if isinstance(waiting, PolicyRequestQueue):
            waiting.request_finished(request)

    if not HAS_FINISHED_HOOK:

        def _free_request(self, request: Request, delay_free_blocks: bool = False) -> Any:
            self.on_request_finished(request)
            return super()._free_request(request, delay_free_blocks)

    def evict_cached_blocks_first(self, request: Request) -> bool:
        policy = self.prefix_policy
        k = self.asyncbatch_config.min_shared_blocks
        hashes = request.block_hashes
        return (
            policy is not None
            and self.asyncbatch_config.release_done_prefixes
            and self.cache_config.enable_prefix_caching
            and not self.defer_block_free
            and len(hashes) >= k
            and not policy.prefix_wanted(hashes[k - 1])
        )

    if not HAS_EVICT_FIRST_HOOK:

        def _free_request_blocks(self, request: Request) -> None:
            release = self.evict_cached_blocks_first(request)
            blocks = (self.kv_cache_manager.get_blocks(request.request_id).blocks[0]
                      if release else ())
            super()._free_request_blocks(request)
            if not release:
                return
            # Blocks nobody holds and no waiting request needs: evict them before the
            # prefixes that waiting requests still want (vLLM's LRU would evict those first).
            unwanted = [b for b in blocks if b.ref_cnt == 0 and not b.is_null
                        and b.block_hash is not None]
            if unwanted:
                queue = self.kv_cache_manager.block_pool.free_block_queue
                for block in unwanted:
                    queue.remove(block)
                queue.prepend_n(unwanted[::-1])

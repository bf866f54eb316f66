# SPDX-License-Identifier: Apache-2.0
"""Build a real vLLM scheduler on a CPU and drive it like EngineCore does.

`SimEngine.step` follows ``EngineCore.step_with_batch_queue``: it schedules a
new batch while the queue of in-flight batches (two by default, as vLLM's
async scheduling keeps) is not full, and otherwise completes the oldest batch
with a simulated `ModelRunnerOutput`.  Sampled tokens are a pure function of
(request id, output index), so two schedulers fed the same requests must
produce the same tokens, whatever order they run them in.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_platform_ready = False


def use_cpu_platform() -> None:
    """Make vLLM build configs on a machine without a GPU (as vLLM's CPU CI does).

    Must run before ``vllm.config`` is first imported in this process.  On a
    machine with a supported accelerator it does nothing.
    """
    global _platform_ready
    if _platform_ready:
        return
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    import vllm.platforms as platforms

    if not platforms.current_platform.is_cuda_alike():
        from vllm.platforms.cpu import CpuPlatform

        platforms.current_platform = CpuPlatform()
    _platform_ready = True


@functools.cache
def _v2_runner_config(base: type) -> type:
    """``base`` whose ``use_v2_model_runner`` answers True (for `build_scheduler`;
    vLLM's own checks of the V2 runner's limits do not run on it, and it does not
    pickle)."""
    return type(f"{base.__name__}WithV2Runner", (base,),
                {"use_v2_model_runner": property(lambda self: True)})


def build_scheduler(
    model_dir: str | Path,
    scheduler_cls: type | str = "asyncbatch.Scheduler",
    *,
    num_blocks: int = 1024,
    block_size: int = 16,
    max_num_seqs: int = 64,
    max_num_batched_tokens: int = 2048,
    max_model_len: int = 8192,
    enable_prefix_caching: bool = True,
    scheduling_policy: str = "fcfs",
    long_prefill_token_threshold: int = 0,
    additional_config: dict[str, Any] | None = None,
    async_scheduling: bool = True,
    log_stats: bool = True,
    worker_cls: str | None = None,
    kv_transfer_config: Any = None,
    v2_model_runner: bool = False,
) -> Any:
    """A vLLM scheduler over ``num_blocks`` KV blocks of ``block_size`` tokens.

    ``scheduler_cls`` is a class or a qualified name resolved the way vLLM's
    ``--scheduler-cls`` is (``SchedulerConfig.get_scheduler_cls``).
    ``v2_model_runner``: configure it as on a GPU with vLLM's V2 model runner (the
    CPU platform builds the V1 runner), which ``asyncbatch.Worker`` needs for a
    third batch in flight; the scheduler then knows its depth, as it does there.
    """
    use_cpu_platform()
    import torch
    from vllm.config import (
        CacheConfig,
        ModelConfig,
        SchedulerConfig,
        VllmConfig,
    )
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
    )
    from vllm.v1.structured_output import StructuredOutputManager

    model_config = ModelConfig(
        model=str(model_dir),
        tokenizer=str(model_dir),
        dtype="float32",
        seed=0,
        max_model_len=max_model_len,
    )
    scheduler_config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        is_encoder_decoder=False,
        enable_chunked_prefill=True,
        long_prefill_token_threshold=long_prefill_token_threshold,
        policy=scheduling_policy,  # type: ignore[arg-type]
        async_scheduling=async_scheduling,
        scheduler_cls=scheduler_cls,
    )
    cache_config = CacheConfig(
        block_size=block_size,
        enable_prefix_caching=enable_prefix_caching,
    )
    vllm_config = VllmConfig(
        model_config=model_config,
        scheduler_config=scheduler_config,
        cache_config=cache_config,
        additional_config=additional_config or {},
        kv_transfer_config=kv_transfer_config,
    )
    # The CPU platform turns async scheduling off ("not required on CPU") and may
    # change the block size; put back what was asked for.
    vllm_config.scheduler_config.async_scheduling = async_scheduling
    vllm_config.cache_config.block_size = block_size
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    if worker_cls is not None:
        vllm_config.parallel_config.worker_cls = worker_cls
    if v2_model_runner:
        # VllmConfig.use_v2_model_runner is a property of the platform and vLLM's
        # settings; this one configuration answers True
        vllm_config.__class__ = _v2_runner_config(type(vllm_config))  # type: ignore[arg-type]
    kv_cache_config = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec(
                ["layer"],
                FullAttentionSpec(
                    block_size=block_size, num_kv_heads=1, head_size=1, dtype=torch.float32
                ),
            )
        ],
    )
    cls: Any = vllm_config.scheduler_config.get_scheduler_cls()
    return cls(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=block_size,
        log_stats=log_stats,
    )


_hasher_cache: dict[int, Callable[[Any], list[Any]]] = {}


def make_request(
    request_id: str,
    prompt_token_ids: list[int],
    *,
    max_tokens: int,
    block_size: int = 16,
    priority: int = 0,
    arrival_time: float | None = None,
    stop_token_ids: list[int] | None = None,
    ignore_eos: bool = False,
    regex: str | None = None,
    resumable: bool = False,
) -> Any:
    """A vLLM ``Request`` with real block hashes (sha256, vLLM's default);
    ``regex`` constrains its output (structured outputs, xgrammar backend).
    `SimEngine.add_request` starts its grammar's compilation, as vLLM's
    EngineCore does."""
    from vllm.sampling_params import SamplingParams, StructuredOutputsParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    hasher = _hasher_cache.get(block_size)
    if hasher is None:
        init_none_hash(sha256)
        hasher = _hasher_cache[block_size] = get_request_block_hasher(block_size, sha256)
    params = SamplingParams(
        max_tokens=max_tokens, ignore_eos=ignore_eos, stop_token_ids=stop_token_ids,
        structured_outputs=StructuredOutputsParams(regex=regex) if regex else None,
    )
    params.update_from_generation_config({}, eos_token_id=1)
    if params.structured_outputs is not None:
        # what vLLM's input processing picks for a regex on this platform
        params.structured_outputs._backend = "xgrammar"
    return Request(
        request_id=request_id,
        prompt_token_ids=prompt_token_ids,
        sampling_params=params,
        pooling_params=None,
        arrival_time=arrival_time,
        priority=priority,
        block_hasher=hasher,
        resumable=resumable,
    )


def default_token(request_id: str, index: int, vocab_size: int = 1024) -> int:
    """The simulated model's output token ``index`` of a request (never 0 or 1)."""
    digest = hashlib.blake2b(f"{request_id}:{index}".encode(), digest_size=4).digest()
    return 2 + int.from_bytes(digest, "little") % (vocab_size - 2)


def constrained_token(bitmask_row: Any, preferred: int, eos: int = 1) -> int:
    """What a sampler under a grammar bitmask row (bit ``t`` of the int32 word
    ``t // 32`` set: token ``t`` allowed) emits: ``preferred`` if allowed, else
    the smallest allowed token other than ``eos``, else ``eos``."""
    def allowed(t: int) -> bool:
        return bool((int(bitmask_row[t // 32]) >> (t % 32)) & 1)

    if allowed(preferred):
        return preferred
    for word_index, word in enumerate(bitmask_row):
        word = int(word) & 0xFFFFFFFF
        while word:
            low = word & -word
            t = word_index * 32 + low.bit_length() - 1
            if t != eos:
                return t
            word ^= low
    return eos


@dataclass
class SimStats:
    num_steps: int = 0
    num_empty_steps: int = 0
    num_scheduled_tokens: int = 0
    num_preemptions: int = 0
    # prompt tokens looked up in the prefix cache / found there (new requests), as
    # vLLM's own counters report them: every lookup up to vLLM 0.32, each admitted
    # request once from 0.33
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # largest number of blocks in use at the end of a step
    max_blocks_in_use: int = 0
    # prompt tokens of the requests that produced a first token, and how many of
    # them the prefix cache held when each request was first admitted (vLLM's
    # per-request prefill stats, which RequestOutput.num_cached_tokens reports):
    # each request counted once, unlike the queries above on vLLM <= 0.32, which
    # count every lookup, also of a request that then did not fit and was looked up
    # again
    admitted_prompt_tokens: int = 0
    admitted_cached_tokens: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        if not self.prefix_cache_queries:
            return 0.0
        return self.prefix_cache_hits / self.prefix_cache_queries

    @property
    def prompt_cached_rate(self) -> float:
        """Share of the prompt tokens found in the prefix cache at admission."""
        if not self.admitted_prompt_tokens:
            return 0.0
        return self.admitted_cached_tokens / self.admitted_prompt_tokens

    @property
    def num_computed_prompt_tokens(self) -> int:
        """Prompt tokens that had to be computed, not found in the cache."""
        return self.prefix_cache_queries - self.prefix_cache_hits


@dataclass
class FinishedRequest:
    request_id: str
    output_token_ids: list[int]
    finish_reason: str
    finish_step: int


def sampling_requests(scheduler: Any, out: Any) -> list[str]:
    """The requests of step ``out`` that sample a token, as vLLM's model runner
    decides it (called right after ``schedule()``, before any output of an earlier
    step is applied).

    The runner samples a request once the step reaches the end of the tokens it
    knows.  For a request it already holds, and for a resumed one under the V1
    runner (``resumed_req_ids``, whose output count includes the outputs in
    flight), those are the scheduler's tokens plus the outputs still in flight
    (``num_output_placeholders``): the scheduler's own ``is_prefill_chunk``.  The V2
    runner takes a resumed request as a new one (``scheduled_new_reqs``) with the
    scheduler's tokens only, so with an output of it still in flight it samples
    where the scheduler counts a prefill chunk.
    """
    new = {data.req_id for data in out.scheduled_new_reqs}
    requests = scheduler.requests
    samples = []
    for rid in out.num_scheduled_tokens:
        request = requests[rid]
        if rid in new:
            if request.num_computed_tokens >= request.num_tokens:
                samples.append(rid)
        elif not request.is_prefill_chunk:
            samples.append(rid)
    return samples


@dataclass
class SimEngine:
    """Drives a scheduler with simulated model outputs, ``max_in_flight`` steps deep.

    Args:
        scheduler: a vLLM scheduler (`build_scheduler`).
        token_fn: ``(request_id, output_index) -> token id`` of the simulated model.
        stop_at: request_id -> output index at which the model emits EOS (1).
        on_step: called after every step with the engine (for invariant checks).
    """

    scheduler: Any
    token_fn: Callable[[str, int], int] = default_token
    stop_at: dict[str, int] = field(default_factory=dict)
    # steps in flight; None: as many as vLLM's EngineCore would keep
    # (``VllmConfig.max_concurrent_batches``: 2 with async scheduling); a number
    # given must be that one
    max_in_flight: int | None = None
    on_step: Callable[[SimEngine], None] | None = None
    stats: SimStats = field(default_factory=SimStats)
    # request_id -> tokens returned to the client so far
    outputs: dict[str, list[int]] = field(default_factory=dict)
    # request_id -> how it ended
    finished: dict[str, FinishedRequest] = field(default_factory=dict)
    # (scheduler_output, request ids that sample a token in that step, grammar
    # bitmask or None), newest first
    in_flight: deque = field(default_factory=deque)
    # the SchedulerOutput made by the last `step`, None if it only completed one
    last_scheduled: Any = None
    # the worker's KV connector report for each completed step (`KVConnectorOutput`
    # or None), for runs with a KV connector
    kv_output: Callable[[], Any] | None = None

    def __post_init__(self) -> None:
        depth = int(self.scheduler.vllm_config.max_concurrent_batches)
        if self.max_in_flight is None:
            self.max_in_flight = depth
        elif self.max_in_flight != depth:
            # the scheduler must know its depth (the resume hold, grammar spacing)
            raise ValueError(f"the scheduler runs {depth} batches in flight, the simulation "
                             f"{self.max_in_flight}: build it for that depth (build_scheduler's "
                             "worker_cls and v2_model_runner)")

    def add_request(self, request: Any) -> None:
        self.outputs[request.request_id] = []
        if request.use_structured_output:
            # EngineCore.add_request starts the grammar's compilation on a thread
            # pool; the simulation waits for it, so that a run does not depend on
            # how many steps the compilation happens to take
            self.scheduler.structured_output_manager.grammar_init(request)
            pending = request.structured_output_request._grammar
            if isinstance(pending, Future):
                pending.exception()
        self.scheduler.add_request(request)

    def abort(self, request_ids: Iterable[str]) -> None:
        from vllm.v1.request import RequestStatus

        ids = [rid for rid in request_ids if rid not in self.finished]
        for rid in ids:
            if rid in self.scheduler.requests:
                self.finished[rid] = FinishedRequest(
                    rid, self.outputs[rid], "abort", self.stats.num_steps
                )
        self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)

    def has_work(self) -> bool:
        return bool(self.in_flight) or self.scheduler.has_requests()

    def step(self, force: bool = False) -> None:
        """One pass of ``EngineCore.step_with_batch_queue``, structured outputs
        included: a step whose requests still wait on an earlier step's token
        (``pending_structured_output_tokens``) gets its grammar bitmask only after
        the oldest step in flight has been processed, as EngineCore defers it.
        ``force`` schedules a step even with no request to run, so that the
        worker's report of finished KV loads reaches the scheduler."""
        scheduler = self.scheduler
        self.last_scheduled = None
        depth = self.max_in_flight or 1
        deferred = None
        if len(self.in_flight) < depth and (scheduler.has_requests() or force):
            out = self.last_scheduled = scheduler.schedule()
            self.stats.num_preemptions += len(out.preempted_req_ids or ())
            samples = sampling_requests(scheduler, out)
            self.stats.num_scheduled_tokens += out.total_num_scheduled_tokens
            self.stats.num_empty_steps += out.total_num_scheduled_tokens == 0
            if out.total_num_scheduled_tokens and out.pending_structured_output_tokens:
                deferred = (out, samples)
            else:
                grammar = self._grammar(out) if out.total_num_scheduled_tokens else None
                self.in_flight.appendleft((out, samples, grammar))
                if len(self.in_flight) < depth and scheduler.has_requests():
                    self._after_step()
                    return
        if self.in_flight:
            out, samples, grammar = self.in_flight.pop()
            self._complete(out, samples, grammar)
        if deferred is not None:
            out, samples = deferred
            self.in_flight.appendleft((out, samples, self._grammar(out)))
        self._after_step()

    def drain(self) -> None:
        """Complete every step in flight, scheduling none (as EngineCore does
        when generation is paused and waits for idle)."""
        while self.in_flight:
            out, samples, grammar = self.in_flight.pop()
            self._complete(out, samples, grammar)
            self._after_step()

    def _grammar(self, out: Any) -> Any:
        """The step's grammar bitmask, copied: vLLM fills one shared buffer and
        EngineCore sends it to the workers at once, while here it waits in flight."""
        grammar = self.scheduler.get_grammar_bitmask(out)
        if grammar is not None:
            grammar.grammar_bitmask = grammar.grammar_bitmask.copy()
        return grammar

    def _complete(self, out: Any, samples: list[str], grammar: Any = None) -> None:
        from vllm.v1.outputs import ModelRunnerOutput

        scheduler = self.scheduler
        req_ids = list(out.num_scheduled_tokens)
        sampled: list[list[int]] = [[] for _ in req_ids]
        index = {rid: i for i, rid in enumerate(req_ids)}
        rows = ({rid: i for i, rid in enumerate(grammar.structured_output_request_ids)}
                if grammar is not None else {})
        for rid in samples:
            request = scheduler.requests.get(rid)
            if request is None:
                continue
            n = request.num_output_tokens
            token = 1 if self.stop_at.get(rid) == n else self.token_fn(rid, n)
            if rid in rows:
                token = constrained_token(grammar.grammar_bitmask[rows[rid]], token)
            sampled[index[rid]] = [token]
        model_output = ModelRunnerOutput(
            req_ids=req_ids, req_id_to_index=index, sampled_token_ids=sampled,
            kv_connector_output=self.kv_output() if self.kv_output is not None else None,
        )
        engine_outputs = scheduler.update_from_output(out, model_output)
        for eco in engine_outputs.values():
            if eco.scheduler_stats is not None:
                pcs = eco.scheduler_stats.prefix_cache_stats
                self.stats.prefix_cache_queries += pcs.queries
                self.stats.prefix_cache_hits += pcs.hits
            for o in eco.outputs:
                if o.prefill_stats is not None:
                    self.stats.admitted_prompt_tokens += o.prefill_stats.num_prompt_tokens
                    self.stats.admitted_cached_tokens += o.prefill_stats.num_cached_tokens
                self.outputs[o.request_id].extend(o.new_token_ids)
                live = scheduler.requests.get(o.request_id)
                # A streaming-input session reports the end of each input chunk and
                # goes on waiting for the next one: finished only once it is.
                if o.finish_reason is not None and (live is None or live.is_finished()):
                    self.finished[o.request_id] = FinishedRequest(
                        o.request_id, self.outputs[o.request_id], str(o.finish_reason),
                        self.stats.num_steps,
                    )

    def _after_step(self) -> None:
        self.stats.num_steps += 1
        pool = self.scheduler.kv_cache_manager.block_pool
        in_use = pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()
        self.stats.max_blocks_in_use = max(self.stats.max_blocks_in_use, in_use)
        if self.on_step is not None:
            self.on_step(self)

    def run(self, max_steps: int = 1_000_000) -> SimStats:
        """Step until every request has finished and nothing is in flight."""
        for _ in range(max_steps):
            if not self.has_work():
                return self.stats
            self.step()
        raise RuntimeError(f"not idle after {max_steps} steps")

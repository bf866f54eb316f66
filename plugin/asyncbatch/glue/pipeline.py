# SPDX-License-Identifier: Apache-2.0
"""Pipeline depth: how many batches are in flight between the scheduler and the GPU.

vLLM 0.26 sizes its batch queue (``EngineCore.batch_queue_size``) and the model
runner's round-robin input buffers (``UvaBufferPool``) from one number,
``VllmConfig.max_concurrent_batches``: 2 with async scheduling, ``pp + 1`` with
pipeline parallelism on the V2 runner.  Nothing else can set it.  With depth 2 the
worker prepares step N+1 while N runs, but it can only start once the EngineCore
has processed N-1's output and scheduled N+1; for a small model that host chain
(output copy, IPC, ``update_from_output``, ``schedule``, IPC, input preparation)
is longer than a GPU step, and the GPU waits.  One more batch in flight lets that
chain overlap two GPU steps instead of one.

On released vLLM the number is a property, so asyncbatch replaces the property
with one that returns `effective_depth`.  The replacement is installed when
``asyncbatch.Scheduler`` or ``asyncbatch.Worker`` is imported, so the EngineCore
(batch queue, via the scheduler) and every worker process (buffer pools, via the
worker) see the same depth.  In a process that imported neither, vLLM is
untouched; a configuration without ``--worker-cls asyncbatch.Worker`` keeps
vLLM's own value unless it sets ``pipeline_depth`` (and then it is refused, see
`unsupported_reasons`).

On vLLM with ``patches/0004`` (`has_depth_setting`), the depth is a vLLM setting,
``SchedulerConfig.async_scheduling_depth``, and the property stays vLLM's:
`apply_depth` writes the effective depth into the setting, from
``asyncbatch.Scheduler.__init__`` in the EngineCore (before it sizes its batch
queue) and from ``asyncbatch.Worker.__init__`` in every worker process (before
the model runner is built).  Both paths give the same depth and the same
refusals.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

from asyncbatch.config import CONFIG_KEY, InvalidSettings, settings_of

STOCK_DEPTH = 2
# Measured on an H100 (benchmarks/results/worker): 3 beats 2 for a host-bound
# Llama-1B shape and ties for a GPU-bound 8B one; 4 was no better than 2.
AUTO_DEPTH = 3
WORKER_QUALNAME = "asyncbatch.worker.Worker"
WORKER_NAMES = ("asyncbatch.Worker", WORKER_QUALNAME)

_installed = False


class PipelineDepthUnsupported(ValueError):
    pass


def requested_depth(additional_config: Any) -> int | None:
    """The depth set in ``additional_config``; None when unset (automatic).

    Raises:
        InvalidSettings: the asyncbatch settings do not validate.
    """
    if not isinstance(additional_config, Mapping) or CONFIG_KEY not in additional_config:
        return None
    return settings_of(additional_config).pipeline_depth


def effective_depth(vllm_config: Any) -> int:
    """The depth this configuration runs at: the one set, or, when unset, 3 where
    `unsupported_reasons` has nothing against it and 2 otherwise.

    The EngineCore and the workers evaluate it on the same configuration, so they
    agree; the worker side alone may size for more (harmless: unused buffers).
    """
    try:
        depth = requested_depth(vllm_config.additional_config)
    except InvalidSettings:
        # The property must not raise inside vLLM's start-up: invalid settings are
        # reported, with their key, by the scheduler's own validation.
        return STOCK_DEPTH
    if depth is not None:
        return depth
    return AUTO_DEPTH if not unsupported_reasons(vllm_config, AUTO_DEPTH) else STOCK_DEPTH


@functools.cache
def has_depth_setting() -> bool:
    """Whether the installed vLLM has ``SchedulerConfig.async_scheduling_depth``
    (``patches/0004``); then `apply_depth` sets it and the property stays vLLM's."""
    from vllm.config import SchedulerConfig

    return "async_scheduling_depth" in {f.name for f in dataclasses.fields(SchedulerConfig)}


def install_depth_override() -> None:
    """Make ``VllmConfig.max_concurrent_batches`` honour ``pipeline_depth``.

    Idempotent.  Where the depth is not set above 2, or async scheduling is off,
    the value is vLLM's own.  Does nothing on vLLM with the depth setting
    (`has_depth_setting`): `apply_depth` sets that instead.
    """
    global _installed
    if _installed or has_depth_setting():
        return
    from vllm.config import VllmConfig

    stock = VllmConfig.max_concurrent_batches
    if not isinstance(stock, property) or stock.fget is None:
        raise RuntimeError("vllm.config.VllmConfig.max_concurrent_batches is not a "
                           "property; this vLLM is not the one asyncbatch supports")
    stock_fget = stock.fget

    def max_concurrent_batches(self: Any) -> int:
        base = stock_fget(self)
        if not self.scheduler_config.async_scheduling:
            return base
        return max(base, effective_depth(self))

    max_concurrent_batches.__doc__ = stock.__doc__
    max_concurrent_batches.asyncbatch_stock = stock_fget  # type: ignore[attr-defined]
    VllmConfig.max_concurrent_batches = property(max_concurrent_batches)  # type: ignore[assignment,method-assign]
    _installed = True


def uses_asyncbatch_worker(worker_cls: Any) -> bool:
    """Whether ``worker_cls`` (a qualified name or a class) is asyncbatch's worker or
    a subclass of it.  By name, so this module need not import the worker (which
    imports it)."""
    if isinstance(worker_cls, str):
        return worker_cls in WORKER_NAMES
    return isinstance(worker_cls, type) and any(
        f"{cls.__module__}.{cls.__qualname__}" == WORKER_QUALNAME for cls in worker_cls.__mro__)


def runs_v2_model_runner(vllm_config: Any) -> bool:
    """Whether the workers build vLLM's V2 model runner (``vllm/v1/worker/gpu``)."""
    return bool(getattr(vllm_config, "use_v2_model_runner", False))


def unsupported_reasons(vllm_config: Any, depth: int) -> list[str]:
    """Why ``depth`` cannot run with this configuration (empty: it can)."""
    if depth <= STOCK_DEPTH:
        return []
    reasons = []
    parallel = vllm_config.parallel_config
    if not vllm_config.scheduler_config.async_scheduling:
        reasons.append("async scheduling is off; a deeper pipeline builds on it")
    if not uses_asyncbatch_worker(parallel.worker_cls):
        reasons.append(
            f"the worker is {parallel.worker_cls!r}: pass --worker-cls asyncbatch.Worker "
            "(worker_cls='asyncbatch.Worker'), which sizes the worker's input buffers "
            f"for {depth} batches in flight; vLLM's own worker sizes them for 2, and a "
            "third batch would overwrite inputs the GPU is still reading")
    if not runs_v2_model_runner(vllm_config):
        reasons.append(
            "the V1 model runner is in use (VLLM_USE_V2_MODEL_RUNNER=0, or a feature "
            "that needs V1); only the V2 runner keeps every input of a step on the GPU "
            "in step order, which a deeper pipeline relies on")
    if parallel.pipeline_parallel_size > 1:
        reasons.append(
            f"pipeline parallelism (pp={parallel.pipeline_parallel_size}) already sets "
            "the depth to pp + 1")
    model_config = getattr(vllm_config, "model_config", None)
    if model_config is not None and (
            model_config.get_sliding_window() is not None
            or getattr(model_config, "attention_chunk_size", None) is not None):
        reasons.append(
            "the model has sliding-window or chunked-local attention layers, whose KV "
            "reservation per request vLLM sizes at start-up, before the scheduler exists, "
            "for two batches in flight")
    if vllm_config.speculative_config is not None:
        reasons.append(
            "speculative decoding is on; its draft-token placeholders are written for "
            "two batches in flight")
    return reasons


def check_depth(vllm_config: Any) -> int:
    """The depth to run at; `PipelineDepthUnsupported`, naming every reason, when
    a depth above 2 is set explicitly and cannot run here."""
    depth = requested_depth(vllm_config.additional_config)
    if depth is None:
        return effective_depth(vllm_config)
    reasons = unsupported_reasons(vllm_config, depth)
    if reasons:
        raise PipelineDepthUnsupported(
            f'asyncbatch: "pipeline_depth": {depth} is not supported here: '
            + "; ".join(reasons)
            + '. Set "pipeline_depth": 2 (vLLM\'s own async scheduling), or leave it '
            "unset to get the deepest pipeline this configuration supports.")
    return depth


def apply_depth(vllm_config: Any) -> int:
    """Check the depth this configuration runs at (`check_depth`, with its
    refusals) and make vLLM use it; returns it.

    Called in the EngineCore by ``asyncbatch.Scheduler.__init__``, before
    ``EngineCore`` reads ``max_concurrent_batches`` for its batch queue, and in
    each worker process by ``asyncbatch.Worker.__init__``, before the model
    runner sizes its buffers.  On vLLM with ``async_scheduling_depth``
    (`has_depth_setting`) it writes the depth there; otherwise the property
    installed by `install_depth_override` computes the same number.

    Raises:
        PipelineDepthUnsupported: as `check_depth`; or vLLM's
            ``async_scheduling_depth`` (``--async-scheduling-depth``) was set to
            another depth than asyncbatch runs at.
    """
    depth = check_depth(vllm_config)
    if has_depth_setting():
        scheduler_config = vllm_config.scheduler_config
        current = scheduler_config.async_scheduling_depth
        if current is not None and current != depth:
            raise PipelineDepthUnsupported(
                f"asyncbatch: vLLM's async_scheduling_depth (--async-scheduling-depth) "
                f"is {current}, but asyncbatch runs {depth} batches in flight with this "
                'configuration. Leave --async-scheduling-depth unset and set "pipeline_depth" '
                "in asyncbatch's settings instead; it is checked against the worker, the "
                "model runner, pipeline parallelism and speculative decoding.")
        scheduler_config.async_scheduling_depth = depth
    else:
        install_depth_override()
    return depth

# SPDX-License-Identifier: Apache-2.0
"""Start-up checks: refuse configurations the plugin cannot serve correctly."""

from __future__ import annotations

from typing import get_args

from vllm.config import VllmConfig


def async_scheduling_disabled_reason(vllm_config: VllmConfig) -> str | None:
    """Why vLLM runs without async scheduling, with the option to change, or
    None when async scheduling is on.

    Mirrors the cases in which ``VllmConfig.__post_init__`` (vLLM 0.26) switches
    async scheduling off, so that the error names the cause instead of saying
    only that it is off.
    """
    if vllm_config.scheduler_config.async_scheduling:
        return None
    model_config = vllm_config.model_config
    spec = vllm_config.speculative_config
    backend = vllm_config.parallel_config.distributed_executor_backend
    if model_config is not None and model_config.runner_type == "pooling":
        return (
            "vLLM disables it for pooling models. asyncbatch schedules generative "
            "models only; run this model without --scheduler-cls asyncbatch.Scheduler."
        )
    if spec is not None:
        from vllm.config.speculative import EagleModelTypes, NgramGPUTypes

        supported = (*get_args(EagleModelTypes), *get_args(NgramGPUTypes), "dspark")
        if spec.method not in supported:
            return (
                f"speculative decoding method {spec.method!r} does not support it. "
                f"Use one of {', '.join(map(repr, supported))} in --speculative-config, "
                "or drop --scheduler-cls asyncbatch.Scheduler."
            )
        if spec.disable_padded_drafter_batch:
            return (
                "disable_padded_drafter_batch=True in --speculative-config is not "
                "compatible with it. Remove that option."
            )
    from vllm.v1.executor.abstract import Executor

    if not Executor.get_class(vllm_config).supports_async_scheduling():
        return (
            f"the distributed executor backend {backend!r} does not support it. "
            "Use --distributed-executor-backend mp (or uni)."
        )
    return (
        "it was switched off (--no-async-scheduling, or async_scheduling=False). "
        "Remove that option or pass --async-scheduling."
    )

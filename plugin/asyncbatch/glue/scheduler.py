# SPDX-License-Identifier: Apache-2.0
"""`asyncbatch.Scheduler`: vLLM's `AsyncScheduler` with a policy-ordered waiting queue."""

from __future__ import annotations

from typing import Any

from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.v1.core.sched.async_scheduler import AsyncScheduler

from asyncbatch._compat import check_vllm_version
from asyncbatch.config import AsyncBatchConfig
from asyncbatch.glue.checks import async_scheduling_disabled_reason
from asyncbatch.glue.queue import PolicyRequestQueue
from asyncbatch.policy import make_policy

logger = init_logger(__name__)


class AsyncSchedulingRequired(RuntimeError):
    pass


class Scheduler(AsyncScheduler):
    """Schedules step N+1 while step N runs (vLLM's async scheduling, two batches
    in flight) and admits waiting requests in the order of an asyncbatch policy.

    vLLM constructs it with keyword arguments only (``EngineCore``); every
    argument is passed on to `AsyncScheduler` unchanged.
    """

    def __init__(self, *, vllm_config: VllmConfig, **kwargs: Any) -> None:
        check_vllm_version()
        reason = async_scheduling_disabled_reason(vllm_config)
        if reason is not None:
            raise AsyncSchedulingRequired(
                "asyncbatch.Scheduler needs vLLM's async scheduling (two batches in "
                f"flight), but it is off: {reason}"
            )
        self.asyncbatch_config = AsyncBatchConfig.from_additional_config(
            vllm_config.additional_config
        )
        super().__init__(vllm_config=vllm_config, **kwargs)
        self.waiting = PolicyRequestQueue(
            make_policy(self.asyncbatch_config.policy, vllm_policy=self.policy.value)
        )
        logger.info(
            "asyncbatch scheduler: policy=%s, vLLM scheduling policy=%s",
            self.asyncbatch_config.policy,
            self.policy.value,
        )

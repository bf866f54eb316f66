# SPDX-License-Identifier: Apache-2.0
"""The compared variants and the engine arguments they share.

``sync`` and ``async`` are stock vLLM (one or two batches in flight; ``async`` is
the baseline of every ratio), ``asyncbatch`` swaps in the scheduler (its policy,
two batches in flight).  ``worker`` adds ``asyncbatch.Worker`` and so a third
batch in flight, with the scheduler's pass-through ``fcfs`` policy, so that only
the pipeline depth differs from ``async``; ``full`` is both plugins (prefix
policy, three batches in flight).  Together they tell apart the policy's
and the pipeline's share of a difference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

VARIANT_NAMES = ("sync", "async", "asyncbatch", "worker", "full")
BASELINE = "async"
ASYNCBATCH_SCHEDULER = "asyncbatch.Scheduler"
ASYNCBATCH_WORKER = "asyncbatch.Worker"
# variant -> (scheduler class, worker class); None keeps vLLM's own
PLUGINS: dict[str, tuple[str | None, str | None]] = {
    "asyncbatch": (ASYNCBATCH_SCHEDULER, None),
    # the deeper pipeline lives in the EngineCore too, so it needs the scheduler
    "worker": (ASYNCBATCH_SCHEDULER, ASYNCBATCH_WORKER),
    "full": (ASYNCBATCH_SCHEDULER, ASYNCBATCH_WORKER),
}
# asyncbatch settings a variant fixes on top of the profile's (GPU runs and replay)
VARIANT_SETTINGS: dict[str, dict[str, Any]] = {"worker": {"policy": "fcfs"}}


def variant_settings(variant: str, settings: dict[str, Any] | None) -> dict[str, Any]:
    """The asyncbatch settings ``variant`` runs with: ``settings`` plus what it fixes."""
    return {**(settings or {}), **VARIANT_SETTINGS.get(variant, {})}


class VariantError(ValueError):
    pass


@dataclass(frozen=True)
class EngineProfile:
    """Engine arguments common to all variants (the replay uses the same numbers)."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    num_kv_blocks: int | None = None
    max_model_len: int = 8192
    gpu_memory_utilization: float = 0.9
    executor: str | None = "mp"
    enable_prefix_caching: bool = True
    asyncbatch_config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def common_engine_args(self) -> dict[str, Any]:
        max_model_len = self.max_model_len
        if self.num_kv_blocks:
            # vLLM refuses a max_model_len that the KV cache could not hold
            max_model_len = min(max_model_len, self.num_kv_blocks * self.block_size)
        args: dict[str, Any] = dict(
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
            block_size=self.block_size, max_model_len=max_model_len,
            gpu_memory_utilization=self.gpu_memory_utilization,
            enable_prefix_caching=self.enable_prefix_caching, seed=0,
        )
        if self.num_kv_blocks:
            args["num_gpu_blocks_override"] = self.num_kv_blocks
        if self.executor:
            args["distributed_executor_backend"] = self.executor
        args.update(self.extra)
        return args

    def engine_args(self, variant: str) -> dict[str, Any]:
        """``vllm.LLM`` keyword arguments of ``variant``."""
        check_variants([variant])
        args = self.common_engine_args()
        if variant == "sync":
            args["async_scheduling"] = False
        scheduler_cls, worker_cls = PLUGINS.get(variant, (None, None))
        if scheduler_cls:
            args["scheduler_cls"] = scheduler_cls
        if worker_cls:
            args["worker_cls"] = worker_cls
        settings = variant_settings(variant, self.asyncbatch_config)
        if scheduler_cls and settings:
            args["additional_config"] = {"asyncbatch": settings}
        return args

    def serve_args(self, variant: str) -> list[str]:
        """``vllm serve`` flags of ``variant``."""
        out = []
        for key, value in self.engine_args(variant).items():
            flag = "--" + key.replace("_", "-")
            if key == "num_gpu_blocks_override":
                flag = "--num-gpu-blocks-override"
            if isinstance(value, bool):
                out.append(flag if value else "--no-" + flag[2:])
            elif isinstance(value, dict | list):
                out += [flag, json.dumps(value)]
            else:
                out += [flag, str(value)]
        return out


def check_variants(variants: list[str]) -> list[str]:
    unknown = [v for v in variants if v not in VARIANT_NAMES]
    if unknown:
        raise VariantError(f"unknown variant(s) {', '.join(unknown)}; choose from "
                           f"{', '.join(VARIANT_NAMES)}")
    if len(set(variants)) != len(variants):
        raise VariantError(f"a variant is listed twice: {', '.join(variants)}")
    return variants


def parse_extra(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` engine arguments; VALUE is JSON when it parses as JSON."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise VariantError(f"--engine-arg wants KEY=VALUE, got {item!r}")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out

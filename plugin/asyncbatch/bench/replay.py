# SPDX-License-Identifier: Apache-2.0
"""CPU replay: the real vLLM 0.26 schedulers (stock and asyncbatch) in-process,
with a simulated executor whose step times come from a calibrated cost model.

Each scheduled step's features (prefill tokens, decode sequences, KV tokens
read) are recorded as the scheduler emits it; the simulated wall time is the
two-in-flight timeline of `asyncbatch.sim.costmodel.timeline` over those steps.
Everything is deterministic: one run per variant is exact, and a repeat gives
the same numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from asyncbatch.bench.variants import variant_settings
from asyncbatch.bench.workloads import BenchRequest
from asyncbatch.glue.pipeline import AUTO_DEPTH
from asyncbatch.sim.costmodel import CostModel, StepFeatures, step_features, timeline

VARIANTS: dict[str, dict[str, Any]] = {
    "sync": {"scheduler_cls": "vllm.v1.core.sched.scheduler.Scheduler",
             "async_scheduling": False, "max_in_flight": 1},
    "async": {"scheduler_cls": "vllm.v1.core.sched.async_scheduler.AsyncScheduler",
              "async_scheduling": True, "max_in_flight": 2},
    "asyncbatch": {"scheduler_cls": "asyncbatch.Scheduler",
                   "async_scheduling": True, "max_in_flight": 2},
    # asyncbatch.Worker's third batch in flight: the EngineCore loop runs three deep
    # and the cost model's host chain overlaps two GPU steps (`timeline`)
    "worker": {"scheduler_cls": "asyncbatch.Scheduler",
               "async_scheduling": True, "max_in_flight": AUTO_DEPTH},
    "full": {"scheduler_cls": "asyncbatch.Scheduler",
             "async_scheduling": True, "max_in_flight": AUTO_DEPTH},
}
DEFAULT_CALIBRATION = "h100-llama-8b.json"


@dataclass(frozen=True)
class ReplayConfig:
    num_blocks: int = 512
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 8192
    enable_prefix_caching: bool = True
    additional_config: dict[str, Any] | None = None


def calibration_path(name: str = DEFAULT_CALIBRATION) -> Path:
    return Path(str(resources.files("asyncbatch.bench") / "calibration" / name))


def load_cost_model(path: str | Path | None) -> tuple[CostModel, str]:
    p = Path(path) if path else calibration_path()
    if not p.is_file():
        raise FileNotFoundError(f"calibration file not found: {p}")
    return CostModel.load(p), str(p)


def replay_model_dir() -> Path:
    """The cached ``dummy:tiny`` model folder (config + tokenizer) for the scheduler's
    ``ModelConfig``; step costs come from the cost model, not from this shape."""
    from asyncbatch.bench.models import resolve_model

    return Path(resolve_model("dummy:tiny").path)


def run_variant(variant: str, requests: list[BenchRequest], cost_model: CostModel,
                config: ReplayConfig, *, progress: Any = None) -> dict[str, Any]:
    """Replay ``requests`` (all arriving at time 0) through one scheduler variant."""
    from asyncbatch.sim.engine import SimEngine, build_scheduler, make_request

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    spec = VARIANTS[variant]
    additional_config = dict(config.additional_config or {})
    settings = variant_settings(variant, additional_config.get("asyncbatch"))
    if settings:
        additional_config["asyncbatch"] = settings
    deep = spec["max_in_flight"] > 2
    scheduler = build_scheduler(
        replay_model_dir(), spec["scheduler_cls"], num_blocks=config.num_blocks,
        block_size=config.block_size, max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=config.max_model_len, enable_prefix_caching=config.enable_prefix_caching,
        additional_config=additional_config, async_scheduling=spec["async_scheduling"],
        # the third batch in flight: the scheduler as asyncbatch.Worker runs it on a GPU
        worker_cls="asyncbatch.Worker" if deep else None, v2_model_runner=deep,
    )
    steps: list[StepFeatures] = []
    # request id -> index of the step whose output brought its first / last token
    first_step: dict[str, int] = {}
    last_step: dict[str, int] = {}
    num_completed = 0
    schedule, update = scheduler.schedule, scheduler.update_from_output

    max_in_flight = 0

    def recording_schedule() -> Any:
        nonlocal max_in_flight
        out = schedule()
        steps.append(step_features(scheduler, out))
        max_in_flight = max(max_in_flight, len(steps) - num_completed)
        return out

    def recording_update(scheduler_output: Any, model_output: Any) -> Any:
        nonlocal num_completed
        result = update(scheduler_output, model_output)
        for eco in result.values():
            for o in eco.outputs:
                if o.new_token_ids:
                    first_step.setdefault(o.request_id, num_completed)
                if o.finish_reason is not None:
                    last_step[o.request_id] = num_completed
                    if progress is not None:
                        progress.update(1)
        num_completed += 1
        return result

    scheduler.schedule = recording_schedule
    scheduler.update_from_output = recording_update
    engine = SimEngine(scheduler, max_in_flight=spec["max_in_flight"])
    for r in requests:
        engine.add_request(make_request(r.request_id, list(r.prompt_token_ids),
                                        max_tokens=r.max_tokens, block_size=config.block_size))
    t0 = time.perf_counter()
    stats = engine.run()
    cpu_s = time.perf_counter() - t0
    if len(last_step) != len(requests):
        raise RuntimeError(f"{variant}: {len(requests) - len(last_step)} requests did not finish")

    ends = timeline(cost_model, steps, spec["max_in_flight"])
    elapsed = ends[-1] if ends else 0.0
    num_in = sum(r.num_prompt_tokens for r in requests)
    num_out = sum(len(engine.outputs[r.request_id]) for r in requests)
    ttfts = sorted(ends[first_step[r.request_id]] * 1000 for r in requests)
    e2els = sorted(ends[last_step[r.request_id]] * 1000 for r in requests)
    return {
        "variant": variant,
        "max_batches_in_flight": max_in_flight,
        "elapsed_time": elapsed,
        "num_requests": len(requests),
        "total_input_tokens": num_in,
        "total_output_tokens": num_out,
        "total_num_tokens": num_in + num_out,
        "requests_per_second": len(requests) / elapsed,
        "tokens_per_second": (num_in + num_out) / elapsed,
        "request_throughput": len(requests) / elapsed,
        "output_throughput": num_out / elapsed,
        "total_token_throughput": (num_in + num_out) / elapsed,
        "num_preemptions": stats.num_preemptions,
        "prefix_cache_hits": stats.prefix_cache_hits,
        "prefix_cache_queries": stats.prefix_cache_queries,
        "prefix_cache_hit_rate": stats.prefix_cache_hit_rate,
        "prompt_cached_tokens": stats.admitted_cached_tokens,
        "prompt_cached_rate": stats.prompt_cached_rate,
        "num_steps": len(steps),
        "num_computed_prompt_tokens": stats.num_computed_prompt_tokens,
        "mean_e2el_ms": sum(e2els) / len(e2els),
        "median_e2el_ms": _pct(e2els, 50),
        "p99_e2el_ms": _pct(e2els, 99),
        "mean_ttft_sim_ms": sum(ttfts) / len(ttfts),
        "replay_cpu_s": cpu_s,
    }


def _pct(sorted_values: list[float], p: float) -> float:
    i = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[i]

# SPDX-License-Identifier: Apache-2.0
"""One offline benchmark run in a fresh process: ``python -m
asyncbatch.bench.offline_worker SPEC.json OUT.json``.

SPEC holds the model, the engine arguments of one variant and the workload
files (token-id prompts).  The worker builds ``vllm.LLM``, and for each
workload warms up on a few of its prompts, empties the prefix cache, times
``llm.generate`` and reads vLLM's preemption and prefix-cache counters.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

COUNTERS = ("vllm:num_preemptions", "vllm:prefix_cache_hits", "vllm:prefix_cache_queries")


def counters(llm: Any) -> dict[str, float]:
    totals = dict.fromkeys(COUNTERS, 0.0)
    for metric in llm.get_metrics():
        if metric.name in totals and hasattr(metric, "value"):
            totals[metric.name] += float(metric.value)
    return totals


def _mark(label: str) -> None:
    """Bracket a timed run in the step log of `asyncbatch.bench.step_log` ("" ends it)."""
    path = os.environ.get("ASYNCBATCH_STEP_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"mark": label, "t": time.perf_counter()}) + "\n")


def run(spec: dict[str, Any]) -> dict[str, Any]:
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t_start = time.perf_counter()
    llm = LLM(model=spec["model"], tokenizer=spec["model"], load_format=spec["load_format"],
              disable_log_stats=False, **spec["engine_args"])
    startup_s = time.perf_counter() - t_start
    vc = llm.llm_engine.vllm_config
    effective = {
        "async_scheduling": vc.scheduler_config.async_scheduling,
        "scheduler_cls": str(vc.scheduler_config.scheduler_cls),
        "worker_cls": str(vc.parallel_config.worker_cls),
        "distributed_executor_backend": str(vc.parallel_config.distributed_executor_backend),
        "num_gpu_blocks": vc.cache_config.num_gpu_blocks,
        "block_size": vc.cache_config.block_size,
        "max_num_seqs": vc.scheduler_config.max_num_seqs,
        "max_num_batched_tokens": vc.scheduler_config.max_num_batched_tokens,
    }
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass

    results = []
    for w in spec["workloads"]:
        data = json.loads(Path(w["requests_file"]).read_text())
        prompts = [TokensPrompt(prompt_token_ids=r["prompt_token_ids"]) for r in data]
        params = [SamplingParams(max_tokens=r["max_tokens"], ignore_eos=True, temperature=1.0,
                                 top_p=1.0) for r in data]
        num_warmup = min(spec.get("num_warmup", 8), len(prompts))
        if num_warmup:
            llm.generate(prompts[:num_warmup],
                         [SamplingParams(max_tokens=8, ignore_eos=True)] * num_warmup,
                         use_tqdm=False)
        llm.reset_prefix_cache()
        before = counters(llm)
        _mark(w["label"])
        t0 = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        _mark("")
        after = counters(llm)
        llm.reset_prefix_cache()
        num_in = sum(len(o.prompt_token_ids or ()) for o in outputs)
        num_out = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        # per request, the prompt tokens found in the cache when it was first
        # admitted; vLLM's counters below count every lookup, also the repeated
        # ones of a request at the head of the queue that did not fit yet
        cached = sum(o.num_cached_tokens or 0 for o in outputs)
        hits = after["vllm:prefix_cache_hits"] - before["vllm:prefix_cache_hits"]
        queries = after["vllm:prefix_cache_queries"] - before["vllm:prefix_cache_queries"]
        n = len(outputs)
        results.append({
            "workload": w["label"],
            "elapsed_time": elapsed,
            "num_requests": n,
            "total_input_tokens": num_in,
            "total_output_tokens": num_out,
            "total_num_tokens": num_in + num_out,
            "requests_per_second": n / elapsed,
            "tokens_per_second": (num_in + num_out) / elapsed,
            "request_throughput": n / elapsed,
            "output_throughput": num_out / elapsed,
            "total_token_throughput": (num_in + num_out) / elapsed,
            "num_preemptions": after["vllm:num_preemptions"] - before["vllm:num_preemptions"],
            "prefix_cache_hits": hits,
            "prefix_cache_queries": queries,
            "prefix_cache_hit_rate": hits / queries if queries else 0.0,
            "prompt_cached_tokens": cached,
            "prompt_cached_rate": cached / num_in if num_in else 0.0,
        })
    # wall clock, so the parent can tell the process's exit time from its start
    return {"startup_s": startup_s, "gpu": gpu, "effective_config": effective,
            "results": results, "finished_at": time.time()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m asyncbatch.bench.offline_worker SPEC.json OUT.json",
              file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    out = run(spec)
    Path(argv[1]).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

# SPDX-License-Identifier: Apache-2.0
"""The sweep behind ``dp_load_slack``'s default: asyncbatch's routing (seats on,
``dp_load_bound`` 0.1) at several slacks against vLLM's balancing, on the simulated
engines of `asyncbatch.sim.dp` with dp_ab's default workloads (64 groups x 8,
2048-token prefixes, 128 out).  SIMULATED.

    PYTHONPATH=plugin python benchmarks/results/dp-replay/slack_sweep.py 56057 0,8,16,32

Arguments: KV blocks per engine, then the slacks (comma-separated).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(BENCH.parent / "plugin"))

from asyncbatch.bench.replay import load_cost_model, replay_model_dir  # noqa: E402
from asyncbatch.bench.variants import variant_settings  # noqa: E402
from asyncbatch.sim import dp as sim  # noqa: E402

STOCK = "vllm.v1.core.sched.async_scheduler.AsyncScheduler"
POINTS = [("prefix", 16.0), ("prefix", 32.0), ("prefix", math.inf), ("hot", 16.0),
          ("hot", math.inf), ("random", math.inf)]


def load_dp_ab():
    spec = importlib.util.spec_from_file_location("dp_ab", BENCH / "dp_ab.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["dp_ab"] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    dp_ab = load_dp_ab()
    blocks, slacks = int(sys.argv[1]), [float(x) for x in sys.argv[2].split(",")]
    cost, _ = load_cost_model(None)
    model_dir = replay_model_dir()
    shape = dp_ab.Shape()
    for name, rate in POINTS:
        reqs = dp_ab.WORKLOADS[name](shape)
        times = dp_ab.arrivals(len(reqs), rate, 7)
        arrivals = [sim.Arrival(t, f"{name}-{j}", r.prompt, r.max_tokens)
                    for j, (t, r) in enumerate(zip(times, reqs, strict=True))]
        variants = [("stock", sim.VllmBalancer(), STOCK)] + [
            (f"slack{s:g}", sim.PrefixRouter(seats=256, slack=s), "asyncbatch.Scheduler")
            for s in slacks]
        for label, route, scheduler in variants:
            extra = ({"asyncbatch": variant_settings("asyncbatch", None)}
                     if scheduler.startswith("asyncbatch") else None)
            res = sim.simulate(arrivals, route, num_engines=2, scheduler_cls=scheduler,
                               cost_model=cost, model_dir=model_dir, num_blocks=blocks,
                               max_num_seqs=256, max_num_batched_tokens=8192,
                               max_model_len=4096, additional_config=extra)
            ttft = sorted((rt.first_token_s - rt.arrival_s) * 1000
                          for rt in res.requests.values())
            computed = sum(e.prompt_tokens - e.cached_prompt_tokens for e in res.engines)
            busy = [e.busy_s for e in res.engines]
            print(f"{name}@{rate:g} {label:8s} req/s {len(arrivals) / res.duration_s:6.2f} "
                  f"ttft50 {ttft[len(ttft) // 2]:7.0f} p99 {ttft[int(len(ttft) * 0.99)]:7.0f} "
                  f"computed {computed:8d} reqs {[e.requests for e in res.engines]} "
                  f"busy {max(busy) / min(busy):.2f} "
                  f"load {[round(x, 1) for x in res.mean_load]}", flush=True)


if __name__ == "__main__":
    main()

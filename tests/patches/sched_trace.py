# SPDX-License-Identifier: Apache-2.0
"""What the prefix policy scheduled, step by step, on streams under KV pressure
with early release of done prefixes. patches/check.sh has it written on the
unpatched vLLM (fallback overrides) and on the patched one (upstream hooks),
and the two must be the same."""

from dataclasses import asdict

from streams import ASYNCBATCH, feed, prefix_stream

from asyncbatch.sim.engine import SimEngine, build_scheduler

CASES = ((0, {"release_done_prefixes": True}),
         (1, {"release_done_prefixes": True, "kv_headroom": 0.0}))


def schedule_trace(model_dir) -> list[str]:
    lines: list[str] = []
    for seed, settings in CASES:
        stream = prefix_stream(seed, num_groups=10, members=5, prefix_blocks=4, spread_steps=6,
                               max_tokens=24, num_aborts=4, num_stops=4)
        engine = SimEngine(build_scheduler(
            model_dir, ASYNCBATCH, num_blocks=80, max_num_seqs=16, max_num_batched_tokens=512,
            additional_config={"asyncbatch": settings}))

        def show(e):
            out = e.last_scheduled
            if out is not None:
                free = e.scheduler.kv_cache_manager.block_pool.free_block_queue
                head = [b.block_id for b in free.get_all_free_blocks()[:4]]
                lines.append(f"{e.stats.num_steps} {sorted(out.num_scheduled_tokens.items())} "
                             f"preempted={sorted(out.preempted_req_ids or ())} free_head={head}")

        engine.on_step = show
        feed(engine, stream)
        policy = engine.scheduler.prefix_policy
        counts = asdict(policy.stats)
        lines.append(f"seed {seed}: {engine.stats} {counts} {policy.output_ratio}")
    return lines

# SPDX-License-Identifier: Apache-2.0
"""Show, step by step, what asyncbatch.Scheduler schedules on a CPU.

Builds the real vLLM 0.26 scheduler from a local model folder (no weights, no
GPU), feeds it a few requests that share prompt prefixes and prints each
step's batch, with two batches in flight as vLLM's async scheduling keeps.
"""

from __future__ import annotations

import argparse
import random
import tempfile


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheduler", default="asyncbatch.Scheduler",
                        help="scheduler class, by qualified name (default: %(default)s)")
    parser.add_argument("--num-requests", type=int, default=8)
    parser.add_argument("--num-blocks", type=int, default=64,
                        help="KV cache size in blocks of 16 tokens (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.num_requests < 1 or args.num_blocks < 2:
        parser.error("--num-requests must be >= 1 and --num-blocks >= 2")

    from asyncbatch.sim.engine import SimEngine, build_scheduler, make_request
    from asyncbatch.sim.model_dir import write_model_dir

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(tmp, "tiny")
        scheduler = build_scheduler(model_dir, args.scheduler, num_blocks=args.num_blocks,
                                    max_num_seqs=8, max_num_batched_tokens=128)
    engine = SimEngine(scheduler)
    prefixes = [[rng.randrange(2, 1000) for _ in range(48)] for _ in range(2)]
    for i in range(args.num_requests):
        prompt = prefixes[i % 2] + [rng.randrange(2, 1000) for _ in range(rng.randrange(4, 20))]
        engine.add_request(make_request(f"req{i}", prompt, max_tokens=rng.randrange(2, 8)))
    print(f"{type(scheduler).__module__}.{type(scheduler).__qualname__}: "
          f"{args.num_requests} requests, 2 prompt prefixes, {args.num_blocks} KV blocks")
    while engine.has_work():
        engine.step()
        out = engine.last_scheduled
        if out is not None:
            batch = ", ".join(f"{rid}:{n}" for rid, n in out.num_scheduled_tokens.items())
            print(f"step {engine.stats.num_steps:3d}  scheduled [{batch or 'nothing'}]")
    stats = engine.stats
    print(f"done in {stats.num_steps} steps: {len(engine.finished)} finished, "
          f"{stats.num_preemptions} preemptions, prefix-cache hit rate "
          f"{stats.prefix_cache_hit_rate:.0%}")


if __name__ == "__main__":
    main()

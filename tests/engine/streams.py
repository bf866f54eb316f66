# SPDX-License-Identifier: Apache-2.0
"""Request streams for the CPU scheduler tests."""

import random
from dataclasses import dataclass, field

from asyncbatch.sim.engine import make_request

STOCK = "vllm.v1.core.sched.async_scheduler.AsyncScheduler"
ASYNCBATCH = "asyncbatch.Scheduler"


@dataclass
class Arrival:
    step: int
    request_id: str
    prompt: list[int]
    max_tokens: int
    priority: int = 0


@dataclass
class Stream:
    arrivals: list[Arrival]
    # request_id -> step at which it is aborted
    aborts: dict[str, int] = field(default_factory=dict)
    # request_id -> output index at which the model emits EOS
    stop_at: dict[str, int] = field(default_factory=dict)


def settings(**kw) -> dict:
    """Scheduler keyword arguments that set asyncbatch settings ``kw``."""
    return {"additional_config": {"asyncbatch": kw}}


def prefix_stream(seed: int, *, num_groups: int = 6, members: int = 5,
                  prefix_blocks: int = 4, block_size: int = 16, max_suffix: int = 40,
                  max_tokens: int = 24, spread_steps: int = 30, num_aborts: int = 0,
                  num_stops: int = 0, priorities: bool = False) -> Stream:
    """Groups of requests sharing a block-aligned prefix, arriving shuffled."""
    rng = random.Random(seed)
    arrivals = []
    for g in range(num_groups):
        prefix = [rng.randrange(2, 1000) for _ in range(prefix_blocks * block_size)]
        for m in range(members):
            suffix = [rng.randrange(2, 1000) for _ in range(rng.randrange(1, max_suffix))]
            arrivals.append(Arrival(
                step=rng.randrange(spread_steps), request_id=f"g{g}m{m}",
                prompt=prefix + suffix, max_tokens=rng.randrange(1, max_tokens + 1),
                priority=rng.randrange(3) if priorities else 0,
            ))
    rng.shuffle(arrivals)
    arrivals.sort(key=lambda a: a.step)
    ids = [a.request_id for a in arrivals]
    arrival_step = {a.request_id: a.step for a in arrivals}
    # Some aborts land while the request waits, some mid-prefill, some mid-decode.
    aborts = {rid: arrival_step[rid] + rng.randrange(0, 40) for rid in rng.sample(ids, num_aborts)}
    stop_at = {rid: rng.randrange(0, 8) for rid in rng.sample(ids, num_stops)}
    return Stream(arrivals, aborts, stop_at)


def feed(engine, stream: Stream, block_size: int = 16, max_steps: int = 100_000):
    """Run a stream to completion: arrivals and aborts happen at their step."""
    pending = list(reversed(stream.arrivals))
    aborts = sorted(stream.aborts.items(), key=lambda kv: kv[1], reverse=True)
    engine.stop_at.update(stream.stop_at)
    num_added = 0
    for step in range(max_steps):
        while pending and pending[-1].step <= step:
            a = pending.pop()
            engine.add_request(make_request(
                a.request_id, a.prompt, max_tokens=a.max_tokens, block_size=block_size,
                priority=a.priority, arrival_time=1000.0 + num_added * 1e-3,
            ))
            num_added += 1
        while aborts and aborts[-1][1] <= step:
            rid, _ = aborts.pop()
            if rid in engine.outputs:
                engine.abort([rid])
        if not pending and not aborts and not engine.has_work():
            return engine
        if engine.has_work():
            engine.step()
    raise RuntimeError("stream did not finish")


def trace_steps(scheduler) -> list:
    """Record every step's scheduled tokens, new block ids and preemptions (a list
    that grows as ``scheduler.schedule`` is called)."""
    steps: list = []
    schedule = scheduler.schedule

    def recording(*args, **kwargs):
        out = schedule(*args, **kwargs)
        cached = out.scheduled_cached_reqs
        steps.append((
            sorted(out.num_scheduled_tokens.items()),
            sorted((r.req_id, r.block_ids) for r in out.scheduled_new_reqs),
            sorted(zip(cached.req_ids, cached.new_block_ids, strict=True)),
            sorted(out.preempted_req_ids or ()),
        ))
        return out

    scheduler.schedule = recording
    return steps

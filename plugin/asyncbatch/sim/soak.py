# SPDX-License-Identifier: Apache-2.0
"""Soak test driver: a long random request stream through a real vLLM 0.26
scheduler (`SimEngine`, two steps in flight), with invariants checked after
every step.

Checked after every step:

- every request ever added is in exactly one place: running, waiting (the
  policy-ordered queue and vLLM's ``skipped_waiting``) or finished (stopped,
  length, aborted), and finishes at most once;
- the waiting queue and its policy agree on the waiting requests;
- KV blocks in use equal the distinct blocks held by live requests (plus
  vLLM's deferred frees), and each held block's reference count equals the
  number of requests holding it;
- no request waited while the policy admitted later arrivals in more than
  ``max_wait_steps + wait_slack`` scheduler steps (asyncbatch's wait bound).

At the end everything must be finished and every block free.  Run with
``python -m asyncbatch.sim.soak --help``.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from asyncbatch.sim.engine import SimEngine, build_scheduler, default_token, make_request

STOCK = "vllm.v1.core.sched.async_scheduler.AsyncScheduler"
ASYNCBATCH = "asyncbatch.Scheduler"


class InvariantViolation(AssertionError):
    pass


@dataclass
class SoakConfig:
    num_requests: int = 10_000
    seed: int = 0
    scheduler_cls: str = ASYNCBATCH
    scheduling_policy: str = "fcfs"
    # asyncbatch settings (ignored by the stock scheduler)
    settings: dict[str, Any] = field(default_factory=lambda: {"max_wait_steps": 16})
    num_blocks: int = 160
    block_size: int = 8
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 64
    max_model_len: int = 320
    enable_prefix_caching: bool = True
    # "asyncbatch.Worker": the EngineCore keeps as many batches in flight as
    # asyncbatch.Worker allows (``pipeline_depth``), and so does the soak
    worker_cls: str | None = None
    # mean arrivals per engine step, alternating between a calm and a burst phase
    calm_rate: float = 0.2
    burst_rate: float = 1.2
    phase_steps: int = 300
    # arrivals pause while this many requests wait (bounded load)
    max_num_waiting: int = 400
    num_prefixes: int = 24
    shared_share: float = 0.5
    abort_share: float = 0.1
    # per engine step: chance of aborting a request picked in a given phase
    # (mid-prefill, preempted, waiting in a group), which random timing rarely hits
    targeted_abort_rate: float = 0.02
    stop_share: float = 0.15
    # wait bound slack in scheduler steps, over max_wait_steps
    wait_slack: int = 2
    check_every: int = 1
    # state left behind at the end that is not reported as a violation
    # (names as in the message: "policy._resident", "_num_cached_tokens")
    allowed_leftovers: frozenset[str] = frozenset()

    @property
    def is_stock(self) -> bool:
        return self.scheduler_cls == STOCK

    @property
    def max_wait_steps(self) -> int | None:
        if self.is_stock or self.settings.get("policy", "prefix") != "prefix":
            return None
        return int(self.settings.get("max_wait_steps", 512))


@dataclass
class SoakFigures:
    scheduler: str
    scheduling_policy: str
    num_requests: int = 0
    num_finished_stop: int = 0
    num_finished_length: int = 0
    num_finished_length_at_model_len: int = 0
    num_aborts: int = 0
    # where aborted requests were when the abort arrived
    aborts_by_phase: dict[str, int] = field(default_factory=dict)
    num_preemptions: int = 0
    num_steps: int = 0
    num_schedule_steps: int = 0
    # scheduler steps between arrival and first admission
    max_wait_steps: int = 0
    mean_wait_steps: float = 0.0
    # scheduler steps in which a later arrival was admitted while a request waited
    max_bypass_steps: int = 0
    wait_bound_steps: int | None = None
    max_num_waiting: int = 0
    max_blocks_in_use: int = 0
    num_blocks_leaked: int = 0
    num_output_tokens: int = 0
    num_overdue_admissions: int | None = None
    num_gate_closures: int | None = None
    # internal state left after the last request (should be empty)
    leftovers: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def line(self) -> str:
        phases = ", ".join(f"{k} {v}" for k, v in sorted(self.aborts_by_phase.items()))
        return (
            f"{self.scheduler} ({self.scheduling_policy}): {self.num_requests} requests, "
            f"{self.num_aborts} aborts ({phases}), {self.num_preemptions} preemptions, "
            f"max wait {self.max_wait_steps} steps, max bypass {self.max_bypass_steps} steps "
            f"(bound {self.wait_bound_steps}), blocks leaked {self.num_blocks_leaked}, "
            f"{self.num_steps} steps, {self.elapsed_s:.1f} s "
            f"({self.num_requests / max(self.elapsed_s, 1e-9):.0f} requests/s)"
        )


@dataclass(slots=True)
class _Planned:
    request_id: str
    prompt: list[int]
    max_tokens: int
    priority: int
    prefix_id: int | None
    stop_at: int | None
    abort_delay: int | None


class RequestStream:
    """Random requests, made on demand so that 100k of them cost no memory."""

    def __init__(self, config: SoakConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        rng = self.rng
        bs = config.block_size
        self.prefixes = [
            [rng.randrange(2, 1000) for _ in range(bs * rng.randint(1, 4))]
            for _ in range(config.num_prefixes)
        ]
        self.num_made = 0

    def num_arrivals(self, step: int) -> int:
        c = self.config
        burst = (step // c.phase_steps) % 2 == 1
        rate = c.burst_rate if burst else c.calm_rate
        # Poisson by inversion: rates are small
        n, p = 0, math.exp(-rate)
        s, u = p, self.rng.random()
        while u > s:
            n += 1
            p *= rate / n
            s += p
        return min(n, c.num_requests - self.num_made)

    def make(self) -> _Planned:
        c, rng = self.config, self.rng
        rid = f"r{self.num_made}"
        self.num_made += 1
        tokens = lambda n: [rng.randrange(2, 1000) for _ in range(n)]  # noqa: E731
        prefix_id = None
        kind = rng.random()
        if kind < 0.02:
            prompt = tokens(1)
        elif kind < 0.07:
            prompt = tokens(rng.randint(100, 250))
        elif rng.random() < c.shared_share:
            # a few popular prefixes, a long tail of rare ones
            prefix_id = min(int(rng.expovariate(1 / 5)), c.num_prefixes - 1)
            prompt = self.prefixes[prefix_id] + tokens(rng.randint(1, 24))
        else:
            prompt = tokens(rng.randint(2, 48))
        kind = rng.random()
        if kind < 0.05:
            max_tokens = 1
        elif kind < 0.07:
            # runs into max_model_len: finishes with "length" there
            max_tokens = c.max_model_len
        elif kind < 0.75:
            max_tokens = rng.randint(1, 16)
        else:
            max_tokens = rng.randint(16, 64)
        stop_at = rng.randrange(max_tokens) if rng.random() < c.stop_share else None
        abort_delay = None
        if rng.random() < c.abort_share:
            abort_delay = rng.choice((0, 0, 1, 2, 3, rng.randrange(4, 80)))
        return _Planned(rid, prompt, max_tokens, rng.randrange(3), prefix_id, stop_at,
                        abort_delay)


class _FinishLedger(dict):
    """`SimEngine.finished` that refuses a second finish of the same request and
    remembers finished ids after their records were checked and dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def __setitem__(self, request_id: str, record: Any) -> None:
        if request_id in self.ids:
            raise InvariantViolation(f"request {request_id} finished twice")
        self.ids.add(request_id)
        super().__setitem__(request_id, record)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self.ids


def queue_ids(queue: Any, *, iterate: bool = False) -> list[str]:
    """Ids of a vLLM ``RequestQueue``, checked against its length and, for
    asyncbatch's queue, against its policy.

    asyncbatch's queue is read from its id index unless ``iterate``: iterating
    it goes through the policy's ``__iter__``, which is not on vLLM's path.
    """
    policy = getattr(queue, "policy", None)
    try:
        if policy is not None and not iterate:
            ids = list(queue._requests)
        else:
            ids = [r.request_id for r in queue]
    except Exception as e:
        raise InvariantViolation(f"waiting queue cannot be iterated: {e!r}") from e
    if len(ids) != len(queue) or len(set(ids)) != len(ids):
        raise InvariantViolation(
            f"waiting queue holds {len(queue)} requests but yields {len(ids)} "
            f"({len(set(ids))} distinct)")
    if policy is not None:
        if len(policy) != len(ids):
            raise InvariantViolation(
                f"policy holds {len(policy)} waiting requests, the queue {len(ids)}")
        missing = [rid for rid in ids if rid not in policy]
        if missing:
            raise InvariantViolation(f"waiting requests unknown to the policy: {missing[:5]}")
    return ids


def held_blocks(scheduler: Any) -> Counter[int]:
    """block_id -> number of live requests holding it (null block excluded)."""
    held: Counter[int] = Counter()
    for manager in scheduler.kv_cache_manager.coordinator.single_type_managers:
        for blocks in manager.req_to_blocks.values():
            held.update(b.block_id for b in blocks if not b.is_null)
    return held


def num_blocks_in_use(scheduler: Any) -> int:
    pool = scheduler.kv_cache_manager.block_pool
    return pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()


def check_kv(scheduler: Any, live_running: set[str]) -> None:
    pool = scheduler.kv_cache_manager.block_pool
    held = held_blocks(scheduler)
    for manager in scheduler.kv_cache_manager.coordinator.single_type_managers:
        for rid, blocks in manager.req_to_blocks.items():
            if blocks and rid not in live_running:
                raise InvariantViolation(f"request {rid} holds {len(blocks)} KV blocks "
                                         "but is not running")
    deferred = {b.block_id for _, blocks in getattr(scheduler, "deferred_frees", ())
                for b in blocks}
    in_use = num_blocks_in_use(scheduler)
    if len(held.keys() | deferred) != in_use:
        raise InvariantViolation(
            f"{in_use} KV blocks in use, live requests hold {len(held)} "
            f"(+{len(deferred)} deferred): {in_use - len(held) - len(deferred)} leaked")
    blocks = pool.blocks
    for block_id, n in held.items():
        if blocks[block_id].ref_cnt != n and block_id not in deferred:
            raise InvariantViolation(
                f"block {block_id}: ref_cnt {blocks[block_id].ref_cnt}, held by {n} requests")


class SoakRun:
    """One soak run: feeds `RequestStream` into a `SimEngine`, checks after every step."""

    def __init__(self, config: SoakConfig, model_dir: str | Path) -> None:
        self.config = c = config
        extra: dict[str, Any] = (
            {} if c.is_stock else {"additional_config": {"asyncbatch": dict(c.settings)}})
        self.scheduler = build_scheduler(
            model_dir, c.scheduler_cls, num_blocks=c.num_blocks, block_size=c.block_size,
            max_num_seqs=c.max_num_seqs, max_num_batched_tokens=c.max_num_batched_tokens,
            max_model_len=c.max_model_len, scheduling_policy=c.scheduling_policy,
            enable_prefix_caching=c.enable_prefix_caching, log_stats=False,
            worker_cls=c.worker_cls, **extra)
        self.engine = SimEngine(self.scheduler, on_step=None)
        self.engine.finished = self.ledger = _FinishLedger()
        self.stream = RequestStream(c)
        self.planned: dict[str, _Planned] = {}
        # (engine step, request_id)
        self.abort_heap: list[tuple[int, str]] = []
        # request_id -> (arrival seq, scheduler step at arrival), until first admitted
        self.never_admitted: dict[str, tuple[int, int]] = {}
        # request_id -> scheduler steps in which a later arrival was admitted before it
        self.bypass: Counter[str] = Counter()
        self.aborted_num_outputs: dict[str, int] = {}
        self.num_added = 0
        self.num_wait_steps_total = 0
        self.num_admitted = 0
        self.figures = SoakFigures(c.scheduler_cls.rsplit(".", 1)[-1], c.scheduling_policy,
                                   wait_bound_steps=c.max_wait_steps)
        self.abort_phases: Counter[str] = Counter()

    # ---------------------------------------------------------------- driving

    def run(self) -> SoakFigures:
        c, engine, stream = self.config, self.engine, self.stream
        start = time.perf_counter()
        step = 0
        while True:
            if len(self.scheduler.waiting) < c.max_num_waiting:
                for _ in range(stream.num_arrivals(step)):
                    self._add(stream.make(), step)
            num_aborts = len(self.aborted_num_outputs)
            while self.abort_heap and self.abort_heap[0][0] <= step:
                _, rid = heapq.heappop(self.abort_heap)
                self._abort(rid)
            if stream.rng.random() < c.targeted_abort_rate:
                self._targeted_abort(stream.rng)
            if len(self.aborted_num_outputs) != num_aborts:
                self.check()
            if stream.num_made >= c.num_requests and not engine.has_work():
                break
            if engine.has_work():
                engine.step()
                if engine.last_scheduled is not None:
                    self._on_scheduled(engine.last_scheduled)
                if step % c.check_every == 0:
                    self.check()
                self._drain_finished()
            step += 1
            if step > 200 * c.num_requests + 10_000:
                raise InvariantViolation("soak did not drain: a request is stuck")
        self.figures.elapsed_s = time.perf_counter() - start
        self.check_idle()
        return self._finish_figures()

    def _add(self, p: _Planned, step: int) -> None:
        engine = self.engine
        self.planned[p.request_id] = p
        if p.stop_at is not None:
            engine.stop_at[p.request_id] = p.stop_at
        engine.add_request(make_request(
            p.request_id, p.prompt, max_tokens=p.max_tokens, block_size=self.config.block_size,
            priority=p.priority, arrival_time=1000.0 + self.num_added * 1e-3))
        self.never_admitted[p.request_id] = (self.num_added, self.figures.num_schedule_steps)
        self.num_added += 1
        if p.abort_delay is not None:
            heapq.heappush(self.abort_heap, (step + p.abort_delay, p.request_id))

    def _abort(self, rid: str) -> None:
        from vllm.v1.request import RequestStatus

        request = self.scheduler.requests.get(rid)
        if request is None or rid in self.ledger:
            return
        if request.status == RequestStatus.RUNNING:
            phase = ("prefill" if request.num_computed_tokens < request.num_prompt_tokens
                     else "decode")
        elif request.status == RequestStatus.PREEMPTED:
            phase = "preempted"
        elif self._in_waiting_group(rid):
            phase = "waiting_in_group"
        else:
            phase = "waiting"
        self.abort_phases[phase] += 1
        self.aborted_num_outputs[rid] = len(self.engine.outputs[rid])
        self.never_admitted.pop(rid, None)
        self.bypass.pop(rid, None)
        self.engine.abort([rid])

    def _targeted_abort(self, rng: random.Random) -> None:
        from vllm.v1.request import RequestStatus

        phase = rng.choice(("prefill", "preempted", "waiting_in_group"))
        if phase == "prefill":
            candidates = [r.request_id for r in self.scheduler.running
                          if r.num_computed_tokens < r.num_prompt_tokens]
        elif phase == "preempted":
            candidates = [rid for rid, r in self.scheduler.requests.items()
                          if r.status == RequestStatus.PREEMPTED]
        else:
            counts = Counter(self.planned[rid].prefix_id for rid in self.never_admitted)
            candidates = [rid for rid in self.never_admitted
                          if counts[self.planned[rid].prefix_id] > 1
                          and self.planned[rid].prefix_id is not None]
        if candidates:
            self._abort(rng.choice(candidates))

    def _in_waiting_group(self, rid: str) -> bool:
        prefix_id = self.planned[rid].prefix_id
        if prefix_id is None:
            return False
        return any(self.planned[other].prefix_id == prefix_id
                   for other in self.never_admitted if other != rid)

    def _on_scheduled(self, out: Any) -> None:
        self.figures.num_schedule_steps += 1
        never = self.never_admitted
        now = self.figures.num_schedule_steps
        latest = -1
        for rid in out.num_scheduled_tokens:
            entry = never.pop(rid, None)
            if entry is not None:
                seq, arrived = entry
                latest = max(latest, seq)
                wait = now - 1 - arrived
                self.num_wait_steps_total += wait
                self.num_admitted += 1
                self.figures.max_wait_steps = max(self.figures.max_wait_steps, wait)
                self.bypass.pop(rid, None)
        if latest < 0:
            return
        # `never` is in arrival order: the requests a later arrival overtook lead it.
        bound = self.config.max_wait_steps
        for rid, (seq, _) in never.items():
            if seq >= latest:
                break
            n = self.bypass[rid] = self.bypass[rid] + 1
            if n > self.figures.max_bypass_steps:
                self.figures.max_bypass_steps = n
            if bound is not None and n > bound + self.config.wait_slack:
                raise InvariantViolation(
                    f"request {rid} waited while later arrivals were admitted in {n} "
                    f"scheduler steps; the bound is max_wait_steps={bound}")

    def _drain_finished(self) -> None:
        ledger, planned, outputs = self.ledger, self.planned, self.engine.outputs
        if not dict.__len__(ledger):
            return
        max_model_len = self.config.max_model_len
        f = self.figures
        for rid, record in list(dict.items(ledger)):
            dict.__delitem__(ledger, rid)
            p = planned.pop(rid)
            out = outputs.pop(rid)
            reason = record.finish_reason
            if reason == "abort":
                f.num_aborts += 1
                if len(out) != self.aborted_num_outputs.pop(rid):
                    raise InvariantViolation(f"request {rid} got tokens after its abort")
            elif reason == "stop":
                f.num_finished_stop += 1
                if p.stop_at is None or len(out) != p.stop_at + 1 or out[-1] != 1:
                    raise InvariantViolation(f"request {rid} stopped at {len(out)} tokens, "
                                             f"planned EOS at index {p.stop_at}")
            elif reason == "length":
                f.num_finished_length += 1
                at_model_len = len(p.prompt) + len(out) == max_model_len
                f.num_finished_length_at_model_len += at_model_len
                if len(out) != p.max_tokens and not at_model_len:
                    raise InvariantViolation(
                        f"request {rid} ended by length with {len(out)} tokens "
                        f"(max_tokens {p.max_tokens}, prompt {len(p.prompt)})")
            else:
                raise InvariantViolation(f"request {rid} finished with {reason!r}")
            for i, token in enumerate(out):
                if token != 1 and token != default_token(rid, i):
                    raise InvariantViolation(f"request {rid} token {i} is not the model's")
            f.num_output_tokens += len(out)
            self.never_admitted.pop(rid, None)
            self.bypass.pop(rid, None)

    # ------------------------------------------------------------- invariants

    def check(self) -> None:
        """Every request in exactly one place; the KV blocks add up."""
        from vllm.v1.request import RequestStatus

        s = self.scheduler
        live = s.requests
        running = {r.request_id for r in s.running}
        if len(running) != len(s.running):
            raise InvariantViolation("a request is in the running list twice")
        waiting = queue_ids(s.waiting)
        skipped = queue_ids(s.skipped_waiting)
        waiting_set = set(waiting) | set(skipped)
        if len(waiting_set) != len(waiting) + len(skipped):
            raise InvariantViolation("a request is in both waiting queues")
        if running & waiting_set:
            raise InvariantViolation(f"running and waiting: {sorted(running & waiting_set)}")
        queued = running | waiting_set
        if len(queued) != len(live) or not queued >= live.keys():
            lost = live.keys() - queued
            extra = queued - live.keys()
            raise InvariantViolation(
                f"lost requests (live but neither running nor waiting): {sorted(lost)[:5]}; "
                f"queued but not live: {sorted(extra)[:5]}")
        for rid in running:
            if live[rid].status != RequestStatus.RUNNING:
                raise InvariantViolation(f"{rid} in running with status {live[rid].status}")
        for rid in waiting_set:
            if live[rid].status not in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
                raise InvariantViolation(f"{rid} waiting with status {live[rid].status}")
        ledger = self.ledger
        if len(live) + len(ledger.ids) != self.num_added:
            raise InvariantViolation(
                f"{self.num_added} requests added, {len(live)} live + {len(ledger.ids)} "
                "finished")
        for rid in live:
            if rid in ledger:
                raise InvariantViolation(f"request {rid} finished but still in the scheduler")
        check_kv(s, running)
        f = self.figures
        f.max_num_waiting = max(f.max_num_waiting, len(waiting_set))
        f.max_blocks_in_use = max(f.max_blocks_in_use, num_blocks_in_use(s))

    def check_idle(self) -> None:
        s = self.scheduler
        self.check()
        leaked = num_blocks_in_use(s)
        self.figures.num_blocks_leaked = leaked
        if leaked:
            raise InvariantViolation(f"{leaked} KV blocks still in use after the last request")
        if s.requests or s.running or len(s.waiting) or len(s.skipped_waiting):
            raise InvariantViolation("requests left in the scheduler after the last request")
        if len(self.ledger.ids) != self.config.num_requests or self.planned:
            raise InvariantViolation(
                f"{len(self.ledger.ids)} of {self.config.num_requests} requests finished")
        leftovers = {name: len(getattr(s, name)) for name in ("_num_cached_tokens",)
                     if hasattr(s, name) and len(getattr(s, name))}
        policy = getattr(s, "prefix_policy", None)
        if policy is not None:
            for name in ("_entries", "_units", "_roots", "_front_ids", "_by_uid", "_resident"):
                if len(getattr(policy, name, ())):
                    leftovers[f"policy.{name}"] = len(getattr(policy, name))
        self.figures.leftovers = leftovers
        if leftovers.keys() - self.config.allowed_leftovers:
            raise InvariantViolation(f"state left behind after the last request: {leftovers}")

    def _finish_figures(self) -> SoakFigures:
        f = self.figures
        f.num_requests = self.num_added
        f.num_preemptions = self.engine.stats.num_preemptions
        f.num_steps = self.engine.stats.num_steps
        f.aborts_by_phase = dict(self.abort_phases)
        f.mean_wait_steps = self.num_wait_steps_total / max(self.num_admitted, 1)
        policy = getattr(self.scheduler, "prefix_policy", None)
        if policy is not None:
            f.num_overdue_admissions = policy.stats.num_overdue_admissions
            f.num_gate_closures = policy.stats.num_gate_closures
        return f


def run_soak(config: SoakConfig, model_dir: str | Path | None = None) -> SoakFigures:
    """Run one soak; raises `InvariantViolation` on the first broken invariant."""
    if model_dir is None:
        from asyncbatch.sim.engine import use_cpu_platform
        from asyncbatch.sim.model_dir import write_model_dir

        use_cpu_platform()
        model_dir = write_model_dir(tempfile.mkdtemp(prefix="asyncbatch-soak-"), "tiny")
    return SoakRun(config, model_dir).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--schedulers", default="stock,asyncbatch",
                        help="comma-separated: stock, asyncbatch")
    parser.add_argument("--scheduling-policy", default="fcfs", choices=("fcfs", "priority"))
    parser.add_argument("--settings", default='{"max_wait_steps": 16}',
                        help="asyncbatch settings as a JSON object")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    classes = {"stock": STOCK, "asyncbatch": ASYNCBATCH}
    results = []
    for name in args.schedulers.split(","):
        config = SoakConfig(num_requests=args.requests, seed=args.seed,
                            scheduler_cls=classes[name],
                            scheduling_policy=args.scheduling_policy,
                            settings=json.loads(args.settings))
        figures = run_soak(config)
        print(figures.line(), flush=True)
        results.append(asdict(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

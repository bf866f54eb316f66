# SPDX-License-Identifier: Apache-2.0
"""Soak test driver: a long random request stream through a real vLLM 0.26
scheduler (`SimEngine`, two steps in flight), with invariants checked after
every step.

Checked after every step:

- every request ever added is in exactly one place: running, waiting (the
  policy-ordered queue and vLLM's ``skipped_waiting`` or ``kv_holding_waiting``)
  or finished (stopped,
  length, aborted, or vLLM's error for a grammar that failed to compile), and
  finishes at most once;
- the waiting queue and its policy agree on the waiting requests;
- KV blocks in use equal the distinct blocks held by live requests (plus
  vLLM's deferred frees), and each held block's reference count equals the
  number of requests holding it;
- no request waited while the policy admitted later arrivals in more than
  ``max_wait_steps + wait_slack`` scheduler steps (asyncbatch's wait bound).

With the request-state shares set (`SoakConfig.with_request_states`), requests
also wait where vLLM parks them outside the waiting queue, and are aborted
there: a grammar that compiles over several steps (some fail to compile), part
of the prompt's KV loading from a remote instance (`asyncbatch.sim.connector`),
streaming input (the next input chunk arrives while the session runs or
waits for it); and ``reset_prefix_cache(reset_running_requests=True)`` runs
under load.

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

from asyncbatch._compat import is_parked, parked_queues
from asyncbatch.sim.engine import (
    FinishedRequest,
    SimEngine,
    build_scheduler,
    default_token,
    make_request,
)

# A grammar for the structured-output requests (tokens "t5" and "t7" alternate).
GRAMMAR_REGEX = "(t5t7)+"

STOCK = "vllm.v1.core.sched.async_scheduler.AsyncScheduler"
ASYNCBATCH = "asyncbatch.Scheduler"


# vLLM's request states that cannot be admitted yet (parked: in skipped_waiting up
# to vLLM 0.30, marked in deferred_waiting from 0.31),
# by the name the figures give them
BLOCKED_PHASES = {
    "WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR": "grammar_compiling",
    "WAITING_FOR_REMOTE_KVS": "remote_kv_loading",
    "WAITING_FOR_STREAMING_REQ": "streaming_input",
}


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
    # (names as in the message: "policy._resident", "waiting.num_cached_tokens")
    allowed_leftovers: frozenset[str] = frozenset()
    # Request states outside the waiting queue (0: none; see `with_request_states`).
    # share of requests under a grammar, which compiles over 0-6 engine steps
    grammar_share: float = 0.0
    # share of those whose grammar fails to compile (vLLM ends them with an error)
    grammar_error_share: float = 0.25
    # share of requests that load part of their prompt's KV from a remote instance;
    # the load takes 1-8 engine steps
    remote_kv_share: float = 0.0
    # share of streaming-input sessions: 2-3 input chunks, each after 0-12 steps
    streaming_share: float = 0.0
    # live sessions at most: between input chunks a session keeps its KV blocks, and
    # vLLM 0.26 (stock too) wedges once such sessions fill the KV cache (nothing
    # runs, so nothing can be preempted, and no waiting session fits)
    max_streaming_sessions: int = 4
    # reset_prefix_cache(reset_running_requests=True) every so many engine steps;
    # 0: never
    reset_every: int = 0

    def with_request_states(self) -> SoakConfig:
        """This config with grammars, remote KV loads, streaming input and prefix
        cache resets in the stream."""
        from dataclasses import replace

        return replace(self, grammar_share=0.08, remote_kv_share=0.08,
                       streaming_share=0.06, reset_every=211)

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
    # scheduler steps in which a request after it in vLLM's order was admitted while
    # a request waited
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
    # request states outside the waiting queue that the stream reached
    num_grammar_requests: int = 0
    num_grammar_errors: int = 0
    num_remote_loads: int = 0
    num_streaming_sessions: int = 0
    num_streaming_chunks: int = 0
    num_resets: int = 0
    # resets vLLM refused (it raises while blocks are in use, after preempting)
    num_reset_failures: int = 0
    # streaming sessions vLLM 0.26 itself drops from its queues (an input chunk
    # that ends while the session is preempted: `_handle_stopped_request`
    # re-enqueues it, then ``waiting.remove_requests`` removes it); the soak
    # aborts them, as a client would time out
    num_sessions_dropped_by_vllm: int = 0
    elapsed_s: float = 0.0

    def line(self) -> str:
        phases = ", ".join(f"{k} {v}" for k, v in sorted(self.aborts_by_phase.items()))
        states = ""
        if (self.num_grammar_requests or self.num_remote_loads or self.num_streaming_sessions
                or self.num_resets):
            states = (
                f"{self.num_grammar_requests} grammars ({self.num_grammar_errors} failed), "
                f"{self.num_remote_loads} remote KV loads, {self.num_streaming_sessions} "
                f"streaming sessions ({self.num_streaming_chunks} more chunks), "
                f"{self.num_resets} prefix cache resets ({self.num_reset_failures} "
                "refused by vLLM), "
                f"{self.num_sessions_dropped_by_vllm} sessions dropped by vLLM, ")
        return (
            f"{self.scheduler} ({self.scheduling_policy}): {self.num_requests} requests, "
            f"{self.num_aborts} aborts ({phases}), {self.num_preemptions} preemptions, "
            f"max wait {self.max_wait_steps} steps, max bypass {self.max_bypass_steps} steps "
            f"(bound {self.wait_bound_steps}), blocks leaked {self.num_blocks_leaked}, "
            f"{states}{self.num_steps} steps, {self.elapsed_s:.1f} s "
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
    # None, "ok" or "error"; and the engine steps its compilation takes
    grammar: str | None = None
    grammar_steps: int = 0
    # prompt tokens found in the remote KV cache, and the steps the load takes
    remote_tokens: int = 0
    remote_steps: int = 0
    # streaming input: (steps after the previous chunk, prompt tokens, max_tokens)
    # of each chunk after the first; the session ends after the last
    chunks: list[tuple[int, list[int], int]] = field(default_factory=list)


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
        p = _Planned(rid, prompt, max_tokens, rng.randrange(3), prefix_id, stop_at,
                     abort_delay)
        # Drawn only when asked for, so that the other streams stay as they were.
        if c.grammar_share or c.remote_kv_share or c.streaming_share:
            kind = rng.random()
            if kind < c.grammar_share:
                p.grammar = "error" if rng.random() < c.grammar_error_share else "ok"
                p.grammar_steps = rng.randrange(7)
                p.stop_at = None
            elif kind < c.grammar_share + c.remote_kv_share and len(prompt) > 1:
                p.remote_tokens = rng.randint(1, len(prompt) - 1)
                p.remote_steps = rng.randint(1, 8)
            elif kind < c.grammar_share + c.remote_kv_share + c.streaming_share:
                p.stop_at = None
                p.max_tokens = rng.randint(1, 8)
                p.chunks = [(rng.randrange(13), tokens(rng.randint(1, 16)), rng.randint(1, 8))
                            for _ in range(rng.randint(1, 2))]
        return p


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
    """KV blocks in use are those the requests in ``live_running`` (the requests
    that may hold blocks) hold, plus vLLM's deferred frees."""
    pool = scheduler.kv_cache_manager.block_pool
    held = held_blocks(scheduler)
    for manager in scheduler.kv_cache_manager.coordinator.single_type_managers:
        for rid, blocks in manager.req_to_blocks.items():
            if blocks and rid not in live_running:
                raise InvariantViolation(f"request {rid} holds {len(blocks)} KV blocks "
                                         "but is not running (nor parked with them)")
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
        if c.remote_kv_share:
            from asyncbatch.sim.connector import kv_transfer_config

            extra["kv_transfer_config"] = kv_transfer_config()
        self.scheduler = build_scheduler(
            model_dir, c.scheduler_cls, num_blocks=c.num_blocks, block_size=c.block_size,
            max_num_seqs=c.max_num_seqs, max_num_batched_tokens=c.max_num_batched_tokens,
            max_model_len=c.max_model_len, scheduling_policy=c.scheduling_policy,
            enable_prefix_caching=c.enable_prefix_caching, log_stats=False,
            worker_cls=c.worker_cls, v2_model_runner=c.worker_cls is not None, **extra)
        self.connector = self.scheduler.connector
        self.engine = SimEngine(self.scheduler, on_step=None)
        self.engine.finished = self.ledger = _FinishLedger()
        self.engine.kv_output = self._kv_report
        # heap of (engine step, order, kind, request_id, payload): grammar
        # compilations that end, streaming input chunks that arrive
        self.events: list[tuple[int, int, str, str, Any]] = []
        self.num_events = 0
        self.step_no = 0
        # request_id -> engine step at which its remote KV load finishes
        self.loads_due: dict[str, int] = {}
        self.states = bool(c.grammar_share or c.remote_kv_share or c.streaming_share)
        self.live_sessions: set[str] = set()
        self.num_reset_calls = 0
        # requests in vLLM's skipped_waiting before the step: vLLM admits them
        # before the waiting queue, so admitting them passes nobody over
        self.skipped_before: set[str] = set()
        self.stream = RequestStream(c)
        self.planned: dict[str, _Planned] = {}
        # (engine step, request_id)
        self.abort_heap: list[tuple[int, str]] = []
        # request_id -> (its key in vLLM's order, scheduler step at arrival), until
        # first admitted
        self.never_admitted: dict[str, tuple[tuple[int, ...], int]] = {}
        # request_id -> scheduler steps in which a request after it in vLLM's order was
        # admitted before it
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
            self.step_no = step
            while self.events and self.events[0][0] <= step:
                self._event(*heapq.heappop(self.events)[2:])
            if c.reset_every and step % c.reset_every == c.reset_every - 1:
                self._reset_prefix_cache()
            if len(self.scheduler.waiting) < c.max_num_waiting:
                for _ in range(stream.num_arrivals(step)):
                    self._add(stream.make(), step)
            num_aborts = len(self.aborted_num_outputs)
            while self.abort_heap and self.abort_heap[0][0] <= step:
                _, rid = heapq.heappop(self.abort_heap)
                self._abort(rid)
            if stream.rng.random() < c.targeted_abort_rate:
                self._targeted_abort(stream.rng)
            if self.live_sessions and stream.rng.random() < 0.05:
                # A client that gives up on a session while it waits for input.
                paused = [rid for rid in sorted(self.live_sessions)
                          if (r := self.scheduler.requests.get(rid)) is not None
                          and r.status.name == "WAITING_FOR_STREAMING_REQ"]
                if paused:
                    self._abort(stream.rng.choice(paused))
            if len(self.aborted_num_outputs) != num_aborts:
                self.check()
            pending = bool(self.events or self.loads_due)
            if stream.num_made >= c.num_requests and not engine.has_work() and not pending:
                break
            if engine.has_work() or self.loads_due:
                if self.states:
                    s = self.scheduler
                    self.skipped_before = {rid for q in parked_queues(s)
                                           for rid in queue_ids(q)}
                # With only KV loads left, the worker still reports them finished.
                engine.step(force=not engine.has_work())
                if engine.last_scheduled is not None:
                    self._on_scheduled(engine.last_scheduled)
                if step % c.check_every == 0:
                    self.check()
                self._drain_finished()
            self._track_loads(step)
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
        if p.chunks and len(self.live_sessions) >= self.config.max_streaming_sessions:
            p.chunks = []
        request = make_request(
            p.request_id, p.prompt, max_tokens=p.max_tokens, block_size=self.config.block_size,
            priority=p.priority, arrival_time=1000.0 + self.num_added * 1e-3,
            regex=GRAMMAR_REGEX if p.grammar else None, resumable=bool(p.chunks))
        f = self.figures
        if p.grammar:
            f.num_grammar_requests += 1
            self._start_grammar(request, p, step)
        elif p.remote_tokens:
            self.connector.plan[p.request_id] = p.remote_tokens
        if p.chunks:
            f.num_streaming_sessions += 1
            self.live_sessions.add(p.request_id)
            at = step
            for i, (delay, tokens, max_tokens) in enumerate(p.chunks):
                at += delay
                self._schedule(at, "chunk", p.request_id, (i, tokens, max_tokens))
            self._schedule(at + p.chunks[-1][0], "end", p.request_id, None)
        if p.grammar:
            engine.outputs[p.request_id] = []
            self.scheduler.add_request(request)
        else:
            engine.add_request(request)
        # vLLM's order of waiting requests: arrival, or priority then arrival time
        key = ((p.priority, self.num_added) if self.config.scheduling_policy == "priority"
               else (self.num_added,))
        self.never_admitted[p.request_id] = (key, self.figures.num_schedule_steps)
        self.num_added += 1
        if p.abort_delay is not None:
            heapq.heappush(self.abort_heap, (step + p.abort_delay, p.request_id))

    def _schedule(self, step: int, kind: str, rid: str, payload: Any) -> None:
        self.num_events += 1
        heapq.heappush(self.events, (step, self.num_events, kind, rid, payload))

    def _start_grammar(self, request: Any, p: _Planned, step: int) -> None:
        """Compile the grammar now, and let the scheduler see it only after
        ``p.grammar_steps`` engine steps, or see a compilation error then: the
        thread pool of vLLM's EngineCore, on a clock the run controls."""
        from concurrent.futures import Future

        manager = self.scheduler.structured_output_manager
        manager.grammar_init(request)
        so_request = request.structured_output_request
        compiled = so_request._grammar
        if isinstance(compiled, Future):
            compiled = compiled.result()
        pending: Future = Future()
        so_request._grammar = pending
        result = (compiled if p.grammar == "ok"
                  else RuntimeError(f"grammar of {p.request_id} failed to compile"))
        self._schedule(step + p.grammar_steps, "grammar", p.request_id, (pending, result))

    def _event(self, kind: str, rid: str, payload: Any) -> None:
        if kind == "grammar":
            future, result = payload
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
            return
        # Streaming input: the next chunk, or the end of the session. The client
        # sends nothing more once the session finished (or was aborted).
        live = self.scheduler.requests.get(rid)
        if live is None or live.is_finished() or rid in self.ledger:
            return
        p = self.planned[rid]
        if kind == "chunk":
            _, tokens, max_tokens = payload
            self.figures.num_streaming_chunks += 1
            update = make_request(rid, tokens, max_tokens=max_tokens,
                                  block_size=self.config.block_size, priority=p.priority,
                                  resumable=True)
        else:
            update = make_request(rid, [2], max_tokens=1, block_size=self.config.block_size,
                                  priority=p.priority, resumable=False)
        self.scheduler.add_request(update)
        if kind == "end" and rid not in self.scheduler.requests:
            # The session waited for input: vLLM finishes it at once, with no output.
            self.ledger[rid] = FinishedRequest(rid, self.engine.outputs[rid], "stream_end",
                                               self.engine.stats.num_steps)
            self.never_admitted.pop(rid, None)
            self.bypass.pop(rid, None)

    def _track_loads(self, step: int) -> None:
        connector = self.connector
        if connector is None:
            return
        for rid in connector.loading:
            if rid not in self.loads_due:
                p = self.planned.get(rid)
                self.loads_due[rid] = step + (p.remote_steps if p is not None else 1)
                self.figures.num_remote_loads += 1

    def _kv_report(self) -> Any:
        """What the worker reports with a step's output: the KV loads that landed."""
        connector = self.connector
        if connector is None or not self.loads_due:
            return None
        from vllm.v1.outputs import KVConnectorOutput

        done = {rid for rid, due in self.loads_due.items() if due <= self.step_no}
        if not done:
            return None
        for rid in done:
            del self.loads_due[rid]
            n = connector.loading.pop(rid)
            if n != 1:
                raise InvariantViolation(f"request {rid} started {n} KV loads")
        return KVConnectorOutput(finished_recving=done)

    def _reset_prefix_cache(self) -> None:
        """``reset_prefix_cache(reset_running_requests=True)`` under load, as an
        operator sends it to EngineCore. vLLM preempts every running request and
        then raises if blocks are still in use (by frees deferred while steps are
        in flight, remote KV loads, streaming sessions between inputs): EngineCore
        returns that error to the caller and goes on serving, so the soak counts
        it and checks that the preempted requests are served as usual."""
        self.num_reset_calls += 1
        if self.num_reset_calls % 2 == 0:
            # As after pause_generation: the steps in flight complete first.
            self.engine.drain()
            self._drain_finished()
        try:
            ok = self.scheduler.reset_prefix_cache(reset_running_requests=True)
        except RuntimeError as e:
            if not str(e).startswith("Failed to reset KV cache"):
                raise
            ok = False
        if ok:
            self.figures.num_resets += 1
        else:
            self.figures.num_reset_failures += 1
        self.check()

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
        elif request.status.name in BLOCKED_PHASES:
            phase = BLOCKED_PHASES[request.status.name]
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

        phases: tuple[str, ...] = ("prefill", "preempted", "waiting_in_group")
        if self.states:
            phases += tuple(BLOCKED_PHASES.values())
        phase = rng.choice(phases)
        if phase in BLOCKED_PHASES.values():
            candidates = [r.request_id for r in self.scheduler.requests.values()
                          if BLOCKED_PHASES.get(r.status.name) == phase
                          and not r.is_finished()]
        elif phase == "prefill":
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
        latest: tuple[int, ...] | None = None
        for rid in out.num_scheduled_tokens:
            entry = never.pop(rid, None)
            if entry is not None:
                key, arrived = entry
                if rid not in self.skipped_before and (latest is None or key > latest):
                    latest = key
                wait = now - 1 - arrived
                self.num_wait_steps_total += wait
                self.num_admitted += 1
                self.figures.max_wait_steps = max(self.figures.max_wait_steps, wait)
                self.bypass.pop(rid, None)
        if latest is None:
            return
        # A request is passed over when one after it in vLLM's order is admitted
        # first. Under FCFS `never` is in that order, so those lead it.
        by_arrival = self.config.scheduling_policy != "priority"
        bound = self.config.max_wait_steps
        # Requests parked outside the waiting queue (grammar, remote KV) cannot be
        # admitted, so they are not passed over.
        in_queue = None
        if self.states:
            s = self.scheduler
            in_queue = {r.request_id for r in s.waiting if not is_parked(s, r)} \
                if hasattr(s, "deferred_waiting") else set(queue_ids(s.waiting))
        for rid, (key, _) in never.items():
            if key >= latest:
                if by_arrival:
                    break
                continue
            if in_queue is not None and rid not in in_queue:
                continue
            n = self.bypass[rid] = self.bypass[rid] + 1
            if n > self.figures.max_bypass_steps:
                self.figures.max_bypass_steps = n
            if bound is not None and n > bound + self.config.wait_slack:
                raise InvariantViolation(
                    f"request {rid} waited while requests after it in vLLM's order were "
                    f"admitted in {n} scheduler steps; the bound is max_wait_steps={bound}")

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
            self.live_sessions.discard(rid)
            reason = record.finish_reason
            if p.chunks or p.grammar:
                # Streaming sessions end each input chunk by their own max_tokens;
                # grammars choose their tokens (and may end any time).
                if reason == "abort":
                    f.num_aborts += 1
                    if len(out) != self.aborted_num_outputs.pop(rid):
                        raise InvariantViolation(f"request {rid} got tokens after its abort")
                elif reason == "error":
                    f.num_grammar_errors += 1
                    if p.grammar != "error" or out:
                        raise InvariantViolation(
                            f"request {rid} ended with an error (grammar {p.grammar}, "
                            f"{len(out)} tokens)")
                elif reason not in ("stop", "length", "stream_end"):
                    raise InvariantViolation(f"request {rid} finished with {reason!r}")
                elif p.grammar == "error":
                    raise InvariantViolation(f"request {rid} ran without its grammar")
                if reason == "stream_end" and not p.chunks:
                    raise InvariantViolation(f"request {rid} is not a streaming session")
                f.num_output_tokens += len(out)
                self.never_admitted.pop(rid, None)
                self.bypass.pop(rid, None)
                continue
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
        if self.config.streaming_share:
            self._abort_sessions_dropped_by_vllm()
        # Aborted while their remote KV load was in flight: vLLM keeps them (and
        # their blocks) until the worker reports the load finished.
        unloading = {rid for rid, r in s.requests.items() if r.is_finished()}
        for rid in unloading:
            if s.requests[rid].status != RequestStatus.FINISHED_ABORTED \
                    or self.connector is None or rid not in self.connector.loading:
                raise InvariantViolation(f"finished request {rid} is still in the scheduler "
                                         "without a KV load in flight")
        live = {rid: r for rid, r in s.requests.items() if rid not in unloading}
        running = {r.request_id for r in s.running}
        if len(running) != len(s.running):
            raise InvariantViolation("a request is in the running list twice")
        waiting = queue_ids(s.waiting)
        # vLLM's own queues beside it: skipped_waiting (<= 0.30) or
        # kv_holding_waiting (>= 0.31)
        skipped = [rid for q in parked_queues(s) for rid in queue_ids(q)]
        waiting_set = set(waiting) | set(skipped)
        if len(waiting_set) != len(waiting) + len(skipped):
            raise InvariantViolation("a request is in two waiting queues")
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
        schedulable = (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        for rid in waiting_set:
            status = live[rid].status
            if status not in schedulable and status.name not in BLOCKED_PHASES:
                raise InvariantViolation(f"{rid} waiting with status {status.name}")
            # A request that cannot run yet is parked: in skipped_waiting, or marked in
            # deferred_waiting (vLLM >= 0.31).
            if status.name in BLOCKED_PHASES and not is_parked(s, live[rid]):
                raise InvariantViolation(f"{rid} is {status.name} but not parked")
        deferred = getattr(s, "deferred_waiting", None)
        if deferred is not None and not {r.request_id for r in deferred} <= waiting_set:
            raise InvariantViolation("deferred_waiting marks a request that is not waiting")
        ledger = self.ledger
        if len(live) + len(ledger.ids) != self.num_added:
            raise InvariantViolation(
                f"{self.num_added} requests added, {len(live)} live + {len(ledger.ids)} "
                "finished")
        for rid in live:
            if rid in ledger:
                raise InvariantViolation(f"request {rid} finished but still in the scheduler")
        # Besides running requests, KV blocks are held by requests parked with them:
        # loading remote KV (also aborted ones, until the load lands), a streaming
        # session between inputs, and one waiting with tokens already computed (a
        # landed remote load, a streaming session's next input); a request
        # preempted the usual way holds none (vLLM resets its computed tokens).
        holders = running | unloading | {
            rid for rid, r in live.items()
            if r.status.name in ("WAITING_FOR_REMOTE_KVS", "WAITING_FOR_STREAMING_REQ")
            or (r.status in schedulable and r.num_computed_tokens > 0)}
        check_kv(s, holders)
        f = self.figures
        f.max_num_waiting = max(f.max_num_waiting, len(waiting_set))
        f.max_blocks_in_use = max(f.max_blocks_in_use, num_blocks_in_use(s))

    def _abort_sessions_dropped_by_vllm(self) -> None:
        """vLLM 0.26 loses a streaming-input session whose input chunk ends by a
        token that was in flight when the session was preempted: it re-enqueues
        the session and then removes it from the waiting queue in the same pass
        (``update_from_output``: ``_handle_stopped_request``, then
        ``waiting.remove_requests(stopped_preempted_reqs)``). Stock vLLM and
        asyncbatch drop it alike; the soak aborts it, as its client would time
        out, and counts it. Any other request outside every queue is lost."""
        from vllm.v1.request import RequestStatus

        s = self.scheduler
        candidates = [r for r in s.requests.values()
                      if r.resumable and r.status == RequestStatus.WAITING
                      and r.num_computed_tokens == 0 and r.num_preemptions > 0]
        if not candidates:
            return
        queued = {r.request_id for r in s.running}
        queued.update(queue_ids(s.waiting), *(queue_ids(q) for q in parked_queues(s)))
        for r in candidates:
            if r.request_id not in queued:
                self.figures.num_sessions_dropped_by_vllm += 1
                self.aborted_num_outputs[r.request_id] = len(self.engine.outputs[r.request_id])
                self.engine.abort([r.request_id])

    def check_idle(self) -> None:
        s = self.scheduler
        self.check()
        leaked = num_blocks_in_use(s)
        self.figures.num_blocks_leaked = leaked
        if leaked:
            raise InvariantViolation(f"{leaked} KV blocks still in use after the last request")
        if s.requests or s.running or len(s.waiting) or any(parked_queues(s)):
            raise InvariantViolation("requests left in the scheduler after the last request")
        if len(self.ledger.ids) != self.config.num_requests or self.planned:
            raise InvariantViolation(
                f"{len(self.ledger.ids)} of {self.config.num_requests} requests finished")
        cached = getattr(s.waiting, "num_cached_tokens", ())
        leftovers = {"waiting.num_cached_tokens": len(cached)} if cached else {}
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
    parser.add_argument("--request-states", action="store_true",
                        help="add grammars that compile over several steps (some fail), "
                        "remote KV loads, streaming input and prefix cache resets")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    classes = {"stock": STOCK, "asyncbatch": ASYNCBATCH}
    results = []
    for name in args.schedulers.split(","):
        config = SoakConfig(num_requests=args.requests, seed=args.seed,
                            scheduler_cls=classes[name],
                            scheduling_policy=args.scheduling_policy,
                            settings=json.loads(args.settings))
        if args.request_states:
            config = config.with_request_states()
        figures = run_soak(config)
        print(figures.line(), flush=True)
        results.append(asdict(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

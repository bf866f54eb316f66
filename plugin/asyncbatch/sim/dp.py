# SPDX-License-Identifier: Apache-2.0
"""Data parallelism on CPU: several real vLLM schedulers, each driven by a
`SimEngine`, behind a front end that routes arriving requests as vLLM's
data-parallel client does (or as asyncbatch's prefix routing does), on a
simulated clock.

Time: every engine steps two batches deep with step times from a
`CostModel`, on a `asyncbatch.sim.costmodel.StepClock` (the replay's timeline
for one engine): a step's host work starts when the engine's call for it starts
and cannot start before the output of the step two back is processed; the GPU
runs the engine's steps back to back.  The engine whose next call comes first steps
next; a request is routed when the simulated clock reaches its arrival time.
A call is atomic, so an arrival that falls inside an engine's call sees that
engine as the call leaves it: the view is accurate to about one step.

Load view: what vLLM's client sees (vLLM 0.26-0.32): each engine's
``(waiting, running)`` as the coordinator published it (refreshed at the
first arrival ``publish_s`` or more after the last refresh), plus
``client_count`` waiting requests for every request this front end routed
since (vLLM counts each routed request once per API server, assuming the
others route alike).

Front ends: `VllmFrontEnd` is the installed vLLM's own client class with or
without asyncbatch's hook, keeping its own view as in the server (any
release: its load view and balancing are vLLM's code); `VllmBalancer` and
`PrefixRouter` are models of the 0.26-0.32 client on the view this module
keeps.

API servers: one front end (``route``) or several (a sequence of routes, one
per ``--api-server-count`` process, each with its own view, its own
rotation or ledger, and ``client_count`` = their number).  vLLM's API servers
share the listening socket, so which server gets a request is up to the
kernel: here a request goes to the server ``BLAKE2b(request id) % n``
(deterministic, not strictly alternating).  ``burst_s`` spreads requests that
arrive at the same instant (saturation, "all at once") evenly over that many
seconds, in their order: a real client's burst reaches the servers over a
moment, during which the coordinator publishes new counts.  Request times
(TTFT, latency) still count from the send time.

Everything is deterministic: the same inputs give the same numbers.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from asyncbatch.dp.frontend import KeyLedger, Router
from asyncbatch.dp.routing import (
    DEFAULT_KEY_SHARE,
    DEFAULT_LOAD_BOUND,
    DEFAULT_LOAD_SLACK,
    DEFAULT_NEW_KEY_SLACK,
    DEFAULT_PREFIX_TOKENS,
)
from asyncbatch.sim.costmodel import CostModel, StepClock, step_features

# A front end's choice: (prompt token ids, [[waiting, running], ...], request id)
# -> rank.  A front end with a ``finished(request_id)`` method is told when each
# request it routed finishes.
Route = Callable[[Sequence[int], list[list[float]], str], int]


@dataclass(frozen=True)
class Arrival:
    time_s: float
    request_id: str
    prompt: list[int]
    max_tokens: int


@dataclass
class RequestTimes:
    arrival_s: float
    engine: int
    first_token_s: float | None = None
    finish_s: float | None = None
    output_tokens: int = 0


@dataclass
class EngineCounters:
    """One engine's totals; prompt and cached tokens as `SimStats` counts them
    (each request once, at its first token)."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    max_running: int = 0
    busy_s: float = 0.0


@dataclass
class DPSimResult:
    requests: dict[str, RequestTimes]
    engines: list[EngineCounters]
    duration_s: float
    # per engine, the time-averaged waiting + running over [0, duration]
    mean_load: list[float] = field(default_factory=list)


class VllmBalancer:
    """vLLM's ``DPLBAsyncMPClient.get_core_engine_for_request`` (0.26-0.32):
    the lowest ``4 * waiting + running``, the scan starting one engine later
    after every request, and one more waiting request counted locally."""

    def __init__(self) -> None:
        self.start = 0

    def __call__(self, prompt: Sequence[int], counts: list[list[float]],
                 request_id: str = "") -> int:
        n = len(counts)
        best, chosen = math.inf, 0
        for i in range(n):
            idx = (self.start + i) % n
            score = counts[idx][0] * 4 + counts[idx][1]
            if score < best:
                best, chosen = score, idx
        self.start = (self.start + 1) % n
        return chosen


class PrefixRouter:
    """asyncbatch's routing, the front end's own `asyncbatch.dp.frontend.Router`
    and `asyncbatch.dp.frontend.KeyLedger`, on the same view: load = waiting +
    running, ``seats`` requests per engine (None: no limit); a prompt it leaves
    to vLLM goes to `VllmBalancer`."""

    def __init__(self, *, block_size: int = 16, prefix_tokens: int = DEFAULT_PREFIX_TOKENS,
                 eps: float = DEFAULT_LOAD_BOUND, seats: int | None = None,
                 slack: float = DEFAULT_LOAD_SLACK,
                 key_share: float = DEFAULT_KEY_SHARE,
                 new_key_slack: float | None = DEFAULT_NEW_KEY_SLACK,
                 client_count: int = 1) -> None:
        self.router = Router(block_size=block_size, prefix_tokens=prefix_tokens,
                             load_bound=eps, seats=seats, slack=slack, key_share=key_share,
                             new_key_slack=new_key_slack)
        self.client_count = client_count
        self._balance = VllmBalancer()
        self._ledger = KeyLedger()
        self._in_flight: set[str] = set()

    def __call__(self, prompt: Sequence[int], counts: list[list[float]],
                 request_id: str = "") -> int:
        # in units of one request routed by this front end, as
        # asyncbatch._compat.dp_engine_loads gives them
        loads = [(w + r) / self.client_count for w, r in counts]
        rank = self.router.choose(SimpleNamespace(prompt_token_ids=prompt, request_id=request_id),
                                  loads, self.client_count, ledger=self._ledger,
                                  in_flight=self._in_flight)
        self._in_flight.add(request_id)
        return self._balance(prompt, counts) if rank is None else rank

    def finished(self, request_id: str) -> None:
        self._in_flight.discard(request_id)


class VllmFrontEnd:
    """One API server's data-parallel client: the installed vLLM's own
    ``DPLBAsyncMPClient`` (built without its sockets and engines), choosing the
    engine as it does in the server, through asyncbatch's hook
    (`asyncbatch.dp.frontend.route`) when given a ``router``.

    It keeps its own load view, as the server does: the coordinator's counts
    reach it through `publish` (``[waiting, running, kv_cache_usage]`` per
    engine, cut to the entries the installed client reads), and vLLM's method
    adds its local increments, records the request in ``reqs_in_flight`` (and,
    on 0.33, ``engine_inflight``); `finished` removes it as the client does when
    an engine reports the request finished.  ``rank_of(prompt)``, if given,
    names a rank for every request (a client sending ``X-data-parallel-rank``).
    """

    def __init__(self, num_engines: int, *, client_count: int = 1, client_index: int = 0,
                 router: Router | None = None,
                 rank_of: Callable[[Sequence[int]], int] | None = None) -> None:
        from collections import Counter

        from vllm.v1.engine import core_client

        from asyncbatch import _compat
        from asyncbatch.dp import frontend

        cls = core_client.DPLBAsyncMPClient
        self._route = frontend.route
        self._stock = _compat.dp_stock_route(cls)
        self._width = _compat.dp_counts_width(cls)
        self._rank_of = rank_of
        self.router = router
        self.client_count = client_count
        # built without __init__ (no sockets, no engines): the attributes its
        # routing reads, as vLLM's __init__ and the coordinator set them
        client: Any = object.__new__(cls)
        client.core_engines = [i.to_bytes(2, "little") for i in range(num_engines)]
        client.lb_engines = [[0, 0, 0.0][:self._width] for _ in range(num_engines)]
        client.client_count = client_count
        client.client_index = client_index
        client.eng_start_index = (num_engines * client_index) // client_count
        client.reqs_in_flight = {}
        client.streaming_reqs = set()  # 0.33's bookkeeping, unused on 0.26
        client.engine_inflight = Counter()
        client.vllm_config = None
        # the routing decision, made once per client in the server
        client.__dict__[frontend.ROUTER_ATTR] = router
        self.client: Any = client
        self._engines = {e: i for i, e in enumerate(client.core_engines)}

    def publish(self, counts: Sequence[Sequence[float]]) -> None:
        """A coordinator update: replaces the load view, local increments included."""
        self.client.lb_engines = [list(c)[:self._width] for c in counts]

    def __call__(self, prompt: Sequence[int], counts: Any = None, request_id: str = "") -> int:
        request = SimpleNamespace(
            request_id=request_id, prompt_token_ids=list(prompt), pooling_params=None,
            data_parallel_rank=None if self._rank_of is None else self._rank_of(prompt),
            lora_request=None, cache_salt=None, mm_features=None, resumable=False)
        engine = self._route(self.client, request, self._stock)
        return self._engines[engine]

    def finished(self, request_id: str) -> None:
        engine = self.client.reqs_in_flight.pop(request_id, None)
        if engine is not None and self.client.engine_inflight.get(engine, 0) > 0:
            self.client.engine_inflight[engine] -= 1


class _Engine:
    def __init__(self, index: int, scheduler: Any, cost_model: CostModel, depth: int) -> None:
        from asyncbatch.sim.engine import SimEngine

        self.index = index
        self.scheduler = scheduler
        self.timing = StepClock(cost_model, depth)
        self.clock = 0.0  # when the engine's next call starts
        self.ends: deque[float] = deque()  # GPU end of each step in flight, oldest first
        self.completed_at = 0.0
        self.empty_calls = 0  # consecutive steps that scheduled no token
        self.requests = 0
        self.max_running = 0
        self._schedule = scheduler.schedule
        self._update = scheduler.update_from_output
        scheduler.schedule = self._timed_schedule
        scheduler.update_from_output = self._timed_update
        self.on_output: Callable[[Any, float], None] = lambda out, t: None
        self.sim = SimEngine(scheduler, max_in_flight=depth)

    def _timed_schedule(self) -> Any:
        out = self._schedule()
        self.empty_calls = 0 if out.total_num_scheduled_tokens else self.empty_calls + 1
        # host work for this step starts with the call
        self.ends.append(self.timing.add(step_features(self.scheduler, out),
                                         not_before=self.clock))
        self.max_running = max(self.max_running, len(self.scheduler.running))
        return out

    def _timed_update(self, scheduler_output: Any, model_output: Any) -> Any:
        t = self.ends.popleft()
        self.completed_at = t
        result = self._update(scheduler_output, model_output)
        for eco in result.values():
            for o in eco.outputs:
                self.on_output(o, t)
        return result

    def step(self) -> None:
        self.completed_at = self.clock
        self.sim.step()
        # the next call starts once this one has processed the step it waited for
        self.clock = max(self.clock, self.completed_at)

    def has_work(self) -> bool:
        return self.sim.has_work()

    def counts(self) -> list[float]:
        running, waiting = self.scheduler.get_request_counts()
        return [float(waiting), float(running)]

    def published(self) -> list[float]:
        """What the DP coordinator publishes: waiting, running, KV cache usage."""
        usage = getattr(self.scheduler.kv_cache_manager, "usage", 0.0)
        return [*self.counts(), float(usage)]

    def counters(self) -> EngineCounters:
        stats = self.sim.stats
        return EngineCounters(
            requests=self.requests, prompt_tokens=stats.admitted_prompt_tokens,
            cached_prompt_tokens=stats.admitted_cached_tokens,
            generation_tokens=sum(len(tokens) for tokens in self.sim.outputs.values()),
            preemptions=stats.num_preemptions, max_running=self.max_running,
            busy_s=self.timing.busy_s)


def server_of(request_id: str, num_servers: int) -> int:
    """The API server that receives ``request_id`` (see the module docstring)."""
    if num_servers <= 1:
        return 0
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % num_servers


def spread_bursts(arrivals: Sequence[Arrival], burst_s: float) -> list[Arrival]:
    """``arrivals`` by time, each run of arrivals at one instant spread evenly
    over ``burst_s`` seconds from that instant, in order (none moves past a
    later arrival)."""
    out = sorted(arrivals, key=lambda a: a.time_s)
    if burst_s <= 0:
        return out
    i = 0
    while i < len(out):
        j = i
        while j + 1 < len(out) and out[j + 1].time_s == out[i].time_s:
            j += 1
        if j > i:
            t0 = out[i].time_s
            end = t0 + burst_s
            if j + 1 < len(out):
                end = min(end, out[j + 1].time_s)
            step = (end - t0) / (j - i + 1)
            for k in range(i, j + 1):
                out[k] = replace(out[k], time_s=t0 + (k - i) * step)
        i = j + 1
    return out


def simulate(arrivals: Sequence[Arrival], route: Route | Sequence[Route], *, num_engines: int,
             scheduler_cls: str, cost_model: CostModel, model_dir: str | Path,
             num_blocks: int, block_size: int = 16, max_num_seqs: int = 256,
             max_num_batched_tokens: int = 8192, max_model_len: int = 8192,
             additional_config: dict[str, Any] | None = None, publish_s: float = 0.1,
             depth: int = 2, burst_s: float = 0.0,
             progress: Callable[[int], None] | None = None) -> DPSimResult:
    """Serve ``arrivals`` on ``num_engines`` simulated engines, each running
    ``scheduler_cls`` over ``num_blocks`` KV blocks, routed by ``route`` (one
    front end) or by one of several (a sequence: one per API server; see the
    module docstring for which server gets a request, and ``burst_s``)."""
    from asyncbatch.sim.engine import build_scheduler, make_request

    if num_engines < 1:
        raise ValueError(f"num_engines must be >= 1, got {num_engines}")
    routes: list[Route] = list(route) if isinstance(route, Sequence) else [route]
    if not routes:
        raise ValueError("no front end to route the requests")
    clients = len(routes)
    for a in arrivals:  # a request that can never fit would keep its engine stepping
        need = -(-(len(a.prompt) + a.max_tokens) // block_size)
        if need > num_blocks - 1 or len(a.prompt) + a.max_tokens > max_model_len:
            raise ValueError(f"request {a.request_id} needs {need} KV blocks of {block_size} "
                             f"({len(a.prompt)} + {a.max_tokens} tokens); the engines have "
                             f"{num_blocks - 1} usable and max_model_len {max_model_len}")
    engines = []
    for i in range(num_engines):
        scheduler = build_scheduler(
            model_dir, scheduler_cls, num_blocks=num_blocks, block_size=block_size,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len, enable_prefix_caching=True,
            additional_config=additional_config, async_scheduling=True)
        engines.append(_Engine(i, scheduler, cost_model, depth))
    times: dict[str, RequestTimes] = {}
    finished = [getattr(r, "finished", None) for r in routes]
    # front ends that keep their own load view (VllmFrontEnd): the coordinator's
    # counts go to them at each update
    publishers: list[Any] = [r for r in routes if callable(getattr(r, "publish", None))]
    server: dict[str, int] = {}

    def record(o: Any, t: float) -> None:
        rt = times[o.request_id]
        if o.new_token_ids and rt.first_token_s is None:
            rt.first_token_s = t
        if o.finish_reason is not None:
            rt.finish_s = t
            done = finished[server[o.request_id]]
            if done is not None:
                done(o.request_id)
            if progress is not None:
                progress(1)

    for e in engines:
        e.on_output = record
    # a request's times count from when it was sent, not from when the spread
    # burst lets it reach its server
    sent = {a.request_id: a.time_s for a in arrivals}
    pending = spread_bursts(arrivals, burst_s)
    views = [[e.counts() for e in engines] for _ in routes]
    published = -math.inf
    load_area = [0.0] * num_engines
    last_t = 0.0

    def account(t: float) -> None:
        nonlocal last_t
        if t > last_t:
            for i, e in enumerate(engines):
                w, r = e.counts()
                load_area[i] += (w + r) * (t - last_t)
            last_t = t

    i = 0
    while True:
        busy = [e for e in engines if e.has_work()]
        if not busy and i >= len(pending):
            break
        nxt = min(busy, key=lambda e: (e.clock, e.index)) if busy else None
        if i < len(pending) and (nxt is None or pending[i].time_s <= nxt.clock):
            a = pending[i]
            i += 1
            account(a.time_s)
            if a.time_s - published >= publish_s:  # the coordinator publishes to all
                counts = [e.published() for e in engines]
                views = [[c[:2] for c in counts] for _ in routes]
                for r in publishers:
                    r.publish(counts)
                published = a.time_s
            c = server[a.request_id] = server_of(a.request_id, clients)
            rank = routes[c](a.prompt, views[c], a.request_id)
            if not 0 <= rank < num_engines:
                raise ValueError(f"route chose engine {rank} of {num_engines}")
            views[c][rank][0] += clients  # a front end with its own view ignores this one
            engine = engines[rank]
            if not engine.has_work():
                engine.clock = max(engine.clock, a.time_s)
            times[a.request_id] = RequestTimes(sent[a.request_id], rank)
            engine.requests += 1
            engine.sim.add_request(make_request(a.request_id, list(a.prompt),
                                                max_tokens=a.max_tokens,
                                                block_size=block_size, ignore_eos=True))
            continue
        assert nxt is not None
        account(nxt.clock)
        nxt.step()
        if nxt.empty_calls > 10_000:
            raise RuntimeError(f"engine {nxt.index} scheduled nothing in 10,000 steps "
                               f"with requests waiting: the simulation is stuck")
    unfinished = [rid for rid, rt in times.items() if rt.finish_s is None]
    if unfinished:
        raise RuntimeError(f"{len(unfinished)} requests did not finish, e.g. {unfinished[0]}")
    duration = max((rt.finish_s or 0.0) for rt in times.values()) if times else 0.0
    account(duration)
    for rid, rt in times.items():
        rt.output_tokens = len(engines[rt.engine].sim.outputs[rid])
    return DPSimResult(times, [e.counters() for e in engines], duration,
                       [a / duration if duration else 0.0 for a in load_area])

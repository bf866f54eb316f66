# SPDX-License-Identifier: Apache-2.0
"""The data-parallel simulation (asyncbatch.sim.dp): real vLLM schedulers behind a
simulated front end, on a simulated clock."""

import dataclasses
import random

import pytest

from asyncbatch.bench.workloads import BenchRequest
from asyncbatch.sim.costmodel import CostModel

pytestmark = pytest.mark.vllm

ASYNC = "vllm.v1.core.sched.async_scheduler.AsyncScheduler"
COST = CostModel(gpu_step_s=0.004, prefill_token_s=2e-6, decode_seq_s=2e-5, kv_token_s=1e-8,
                 host_step_s=0.002)


def group_arrivals(groups=6, members=4, prefix_len=128, suffix_len=16, out=6, rate=None,
                   seed=0):
    from asyncbatch.sim.dp import Arrival

    rng = random.Random(seed)
    reqs = []
    for g in range(groups):
        prefix = [rng.randrange(2, 1000) for _ in range(prefix_len)]
        for m in range(members):
            reqs.append((f"g{g}m{m}", prefix + [rng.randrange(2, 1000) for _ in range(suffix_len)]))
    rng.shuffle(reqs)
    t, out_list = 0.0, []
    for rid, prompt in reqs:
        out_list.append(Arrival(t, rid, prompt, out))
        if rate:
            t += rng.expovariate(rate)
    return out_list


def run(model_dir, arrivals, route, *, engines=2, scheduler=ASYNC, cost_model=COST, **kw):
    from asyncbatch.sim.dp import simulate

    kw.setdefault("num_blocks", 512)
    kw.setdefault("max_num_seqs", 32)
    kw.setdefault("max_num_batched_tokens", 1024)
    return simulate(arrivals, route, num_engines=engines, scheduler_cls=scheduler,
                    cost_model=cost_model, model_dir=model_dir, **kw)


def groups_per_engine(result):
    pairs = {(rid.split("m")[0], rt.engine) for rid, rt in result.requests.items()}
    return len(pairs)


def test_one_engine_matches_the_single_engine_replay(model_dir):
    """All requests at time 0 on one engine: the same steps and the same clock
    as the replay's two-in-flight timeline."""
    from asyncbatch.bench.replay import ReplayConfig, run_variant
    from asyncbatch.sim.dp import VllmBalancer

    arrivals = group_arrivals(groups=4, members=3)
    result = run(model_dir, arrivals, VllmBalancer(), engines=1)
    requests = [BenchRequest(a.request_id, a.prompt, a.max_tokens) for a in arrivals]
    replay = run_variant("async", requests, COST, ReplayConfig(
        num_blocks=512, max_num_seqs=32, max_num_batched_tokens=1024))
    # the replay's p99 of 12 end-to-end latencies is their maximum: the last finish
    assert 1000 * result.duration_s == pytest.approx(replay["p99_e2el_ms"], rel=1e-9)
    first_tokens = [rt.first_token_s for rt in result.requests.values()]
    assert 1000 * sum(first_tokens) / len(first_tokens) == pytest.approx(
        replay["mean_ttft_sim_ms"], rel=1e-9)
    assert sum(rt.output_tokens for rt in result.requests.values()) == \
        replay["total_output_tokens"]
    assert result.engines[0].requests == len(arrivals)


def test_prefix_routing_keeps_groups_together_and_vllm_does_not(model_dir):
    from asyncbatch.sim.dp import PrefixRouter, VllmBalancer

    arrivals = group_arrivals(groups=6, members=4, rate=40.0)
    stock = run(model_dir, arrivals, VllmBalancer())
    routed = run(model_dir, arrivals, PrefixRouter(seats=32, eps=1.0),
                 scheduler="asyncbatch.Scheduler")
    assert groups_per_engine(stock) > 6 + 3  # vLLM's balancing splits most groups
    assert groups_per_engine(routed) < groups_per_engine(stock)

    def computed(r):
        return sum(e.prompt_tokens - e.cached_prompt_tokens for e in r.engines)

    assert computed(routed) < computed(stock)
    for r in (stock, routed):
        assert all(rt.finish_s is not None and rt.first_token_s is not None
                   and rt.arrival_s <= rt.first_token_s <= rt.finish_s
                   for rt in r.requests.values())
        assert sum(e.requests for e in r.engines) == len(arrivals)


def test_seats_keep_a_burst_off_a_full_engine(model_dir):
    """A burst of 48 requests on two engines of 24 seats: with the seats neither
    engine holds more than 24; without them the bound lets one go over."""
    from asyncbatch.sim.dp import PrefixRouter

    arrivals = group_arrivals(groups=12, members=4, prefix_len=32, suffix_len=16, seed=5)
    with_seats = run(model_dir, arrivals, PrefixRouter(seats=24), max_num_seqs=24)
    without = run(model_dir, arrivals, PrefixRouter(seats=None), max_num_seqs=24)
    assert [e.requests for e in with_seats.engines] == [24, 24]
    assert max(e.requests for e in without.engines) > 24
    assert max(e.max_running for e in with_seats.engines) <= 24


def test_deterministic_and_routes_checked(model_dir):
    from asyncbatch.sim.dp import VllmBalancer

    arrivals = group_arrivals(groups=3, members=2, rate=100.0)
    a = run(model_dir, arrivals, VllmBalancer())
    b = run(model_dir, arrivals, VllmBalancer())
    assert a.duration_s == b.duration_s and a.mean_load == b.mean_load
    assert {k: (v.engine, v.first_token_s) for k, v in a.requests.items()} == \
        {k: (v.engine, v.first_token_s) for k, v in b.requests.items()}
    with pytest.raises(ValueError, match="engine 5"):
        run(model_dir, arrivals, lambda prompt, counts, request_id: 5)


def test_vllm_balancer_alternates_on_equal_loads():
    from asyncbatch.sim.dp import VllmBalancer

    route = VllmBalancer()
    assert [route([1], [[0, 0], [0, 0]]) for _ in range(4)] == [0, 1, 0, 1]
    assert route([1], [[3, 0], [0, 5]]) == 1  # 4 * waiting + running: 12 > 5


def test_a_depth_the_schedulers_do_not_run_at_is_refused(model_dir):
    """Three in flight over schedulers built for two: they would neither hold back
    a preempted request nor space grammar steps, so the simulation refuses."""
    from asyncbatch.sim.dp import VllmBalancer

    with pytest.raises(ValueError, match="batches in flight"):
        run(model_dir, group_arrivals(groups=1, members=1), VllmBalancer(), depth=3)


def test_a_request_that_can_never_fit_is_refused(model_dir):
    from asyncbatch.sim.dp import Arrival, VllmBalancer

    with pytest.raises(ValueError, match="KV blocks"):
        run(model_dir, [Arrival(0.0, "big", list(range(2, 2000)), 8)], VllmBalancer(),
            num_blocks=16, max_model_len=4096)


def test_the_key_share_balances_the_work_of_a_hot_prefix(model_dir):
    """A burst onto two engines of 24 seats, one prefix half of it: without the
    key share that prefix fills its first engine (cheap, cached requests) and
    the other engine computes the turned-away groups' prefixes, so it is busier;
    with the share the work is closer to even and fewer prefixes are computed
    twice."""
    from asyncbatch.sim.dp import Arrival, PrefixRouter

    rng = random.Random(4)
    hot = [rng.randrange(2, 1000) for _ in range(256)]
    arrivals = [Arrival(0.0, f"hot{i}", hot + [rng.randrange(2, 1000) for _ in range(16)], 6)
                for i in range(24)]
    arrivals += group_arrivals(groups=6, members=4, prefix_len=256, seed=9)
    rng.shuffle(arrivals)

    def busy_ratio(r):
        busy = [e.busy_s for e in r.engines]
        return max(busy) / min(busy)

    # prefill-heavy: a computed prefix costs as much as a dozen decode steps
    cost = dataclasses.replace(COST, prefill_token_s=2e-4)
    results = {share: run(model_dir, arrivals, PrefixRouter(seats=24, key_share=share),
                          scheduler="asyncbatch.Scheduler", max_num_seqs=24, cost_model=cost)
               for share in (1.0, 0.5)}
    for r in results.values():
        assert [e.requests for e in r.engines] == [24, 24]
    ratios = {s: busy_ratio(r) for s, r in results.items()}
    assert ratios[1.0] > 1.2, ratios  # the imbalance the share is for
    assert ratios[0.5] < ratios[1.0] - 0.1, ratios

    def computed(r):
        return sum(e.prompt_tokens - e.cached_prompt_tokens for e in r.engines)

    assert computed(results[0.5]) < computed(results[1.0])


def test_requests_go_to_api_servers_by_id():
    from asyncbatch.sim.dp import server_of

    assert server_of("anything", 1) == 0
    ids = [f"r{i}" for i in range(1000)]
    first = [server_of(i, 2) for i in ids]
    assert first == [server_of(i, 2) for i in ids]  # deterministic
    assert 400 < first.count(0) < 600  # about half each, not strict alternation
    assert first[:8] != [0, 1] * 4 and first[:8] != [1, 0] * 4
    assert set(server_of(i, 3) for i in ids) == {0, 1, 2}


def test_a_burst_is_spread_over_burst_s():
    from asyncbatch.sim.dp import Arrival, spread_bursts

    burst = [Arrival(0.0, f"b{i}", [1], 1) for i in range(4)] + [Arrival(0.1, "late", [1], 1)]
    times = [a.time_s for a in spread_bursts(burst, 1.0)]
    # spread up to the next arrival, in order, the later one left alone
    assert times == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1])
    assert [a.request_id for a in spread_bursts(burst, 1.0)] == [a.request_id for a in burst]
    assert [a.time_s for a in spread_bursts(burst, 0.0)] == [0.0] * 4 + [0.1]
    assert [a.time_s for a in spread_bursts(burst[:4], 0.2)] == pytest.approx(
        [0.0, 0.05, 0.1, 0.15])


def test_each_api_server_routes_its_own_requests_on_its_own_view(model_dir):
    """Two front ends: each sees only its requests, and after each of its own
    routes one more waiting request per API server (vLLM's client_count) on the
    engine it chose; the other server's routes reach it only with the next
    coordinator update."""
    from asyncbatch.sim.dp import server_of

    seen: list[list[tuple[str, list[list[float]]]]] = [[], []]

    def front_end(index):
        def route(prompt, counts, request_id):
            seen[index].append((request_id, [list(c) for c in counts]))
            return 0
        return route

    arrivals = group_arrivals(groups=4, members=3)  # all at time 0: one coordinator update
    run(model_dir, arrivals, [front_end(0), front_end(1)])
    for index in (0, 1):
        ids = [rid for rid, _ in seen[index]]
        assert ids and all(server_of(rid, 2) == index for rid in ids)
        waiting = [counts[0][0] for _, counts in seen[index]]
        assert waiting == [2.0 * k for k in range(len(ids))]  # its own routes, 2 each
    assert len(seen[0]) + len(seen[1]) == len(arrivals)


def test_prefix_router_counts_in_units_of_its_own_requests():
    from asyncbatch.sim.dp import PrefixRouter

    prompt = list(range(2, 40))
    # 4 seats per engine over 2 API servers: 2 of this server's requests each
    route = PrefixRouter(seats=4, client_count=2, new_key_slack=None)
    first = route(prompt, [[0, 0], [0, 0]], "a")
    other = 1 - first
    # the view counts 2 per request: 3 is 1.5 of this server's requests, and one
    # more would pass its 2 seats (counted raw, 3 + 1 <= 4 would fit)
    counts = [[0, 0], [0, 0]]
    counts[first] = [3, 0]
    assert route(prompt, counts, "b") == other
    counts[first] = [2, 0]
    assert route(prompt, counts, "c") == first


def test_a_spread_burst_counts_times_from_the_send_time(model_dir):
    from asyncbatch.sim.dp import VllmBalancer

    arrivals = group_arrivals(groups=4, members=3)  # all sent at time 0
    at_once = run(model_dir, arrivals, VllmBalancer())
    spread = run(model_dir, arrivals, VllmBalancer(), burst_s=0.5)
    assert {rt.arrival_s for rt in spread.requests.values()} == {0.0}
    # the last request reaches its server about 0.5 s late; its first token is
    # counted from 0, so it is later than when the burst arrived at once
    assert max(rt.first_token_s for rt in spread.requests.values()) > 0.4
    assert max(rt.first_token_s for rt in spread.requests.values()) > \
        max(rt.first_token_s for rt in at_once.requests.values())


def test_vllm_front_end_is_vllms_own_client():
    """Two API servers' clients of the installed vLLM: on equal counts the first
    starts at engine 0, the second at engine 1, each alternating and adding
    client_count waiting requests per route until the coordinator publishes;
    finished requests leave reqs_in_flight."""
    from asyncbatch.sim.dp import VllmFrontEnd

    servers = [VllmFrontEnd(2, client_count=2, client_index=i) for i in range(2)]
    for s in servers:
        s.publish([[0, 0, 0.0], [0, 0, 0.0]])
    assert [servers[0]([5] * 20, None, f"a{i}") for i in range(4)] == [0, 1, 0, 1]
    assert [servers[1]([5] * 20, None, f"b{i}") for i in range(2)] == [1, 0]
    assert [c[0] for c in servers[0].client.lb_engines] == [4, 4]  # 2 routes each, 2 per route
    assert set(servers[0].client.reqs_in_flight) == {"a0", "a1", "a2", "a3"}
    servers[0].finished("a0")
    servers[0].finished("a0")  # once only
    assert set(servers[0].client.reqs_in_flight) == {"a1", "a2", "a3"}
    servers[0].publish([[0, 7, 0.1], [0, 0, 0.1]])  # the coordinator's counts replace the view
    assert servers[0]([5] * 20, None, "a4") == 1
    # a client that names the rank: vLLM takes it, and counts nothing locally
    named = VllmFrontEnd(2, rank_of=lambda prompt: 1)
    named.publish([[0, 0, 0.0], [0, 50, 0.0]])
    assert named([5] * 20, None, "n") == 1 and named.client.lb_engines[1][0] == 0


def test_vllm_front_end_with_the_hook_keeps_a_group_together():
    from asyncbatch.dp.frontend import Router
    from asyncbatch.dp.routing import hrw_order, prefix_key
    from asyncbatch.sim.dp import VllmFrontEnd

    group = list(range(2, 80))
    first = hrw_order(prefix_key(group), range(2))[0]
    server = VllmFrontEnd(2, router=Router(block_size=16, prefix_tokens=64, load_bound=0.1,
                                           slack=8))
    server.publish([[0, 0, 0.0], [0, 0, 0.0]])
    assert [server(group + [i], None, f"g{i}") for i in range(6)] == [first] * 6
    # the hook bumps the view as vLLM's balancer does
    assert server.client.lb_engines[first][0] == 6
    stock = VllmFrontEnd(2)
    stock.publish([[0, 0, 0.0], [0, 0, 0.0]])
    assert sorted(stock(group + [i], None, f"s{i}") for i in range(6)) == [0, 0, 0, 1, 1, 1]


def test_vllm_front_end_routes_as_the_model_of_it(model_dir):
    """On vLLM 0.26-0.32 the model (PrefixRouter, VllmBalancer on the view this
    module keeps) and vLLM's own client with the hook make the same choices:
    two API servers, a burst of prefix groups."""
    from vllm.v1.engine import core_client

    from asyncbatch import _compat
    from asyncbatch.dp.frontend import Router
    from asyncbatch.sim.dp import PrefixRouter, VllmFrontEnd

    if _compat.dp_counts_width(core_client.DPLBAsyncMPClient) != 2:
        pytest.skip("vLLM 0.33's client reads its in-flight floor and KV term; the model does not")
    arrivals = group_arrivals(groups=8, members=4, prefix_len=64)
    model = run(model_dir, arrivals, [PrefixRouter(seats=32, client_count=2) for _ in range(2)])
    real = run(model_dir, arrivals, [
        VllmFrontEnd(2, client_count=2, client_index=i,
                     router=Router(block_size=16, prefix_tokens=64, load_bound=0.1,
                                   seats=32, slack=8)) for i in range(2)])
    assert {k: v.engine for k, v in real.requests.items()} == \
        {k: v.engine for k, v in model.requests.items()}

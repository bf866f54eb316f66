# SPDX-License-Identifier: Apache-2.0
"""The front-end hook on vLLM's real data-parallel client class
(``DPLBAsyncMPClient``), built without engines: the attributes its
``get_core_engine_for_request`` reads, fake engine stats in ``lb_engines`` (as
the DP coordinator's updates set them), real ``EngineCoreRequest`` objects."""

import asyncio
import os
import subprocess
import sys
from collections import Counter

import pytest

import asyncbatch
from asyncbatch import _compat
from asyncbatch.dp import frontend
from asyncbatch.dp.routing import hrw_order, prefix_key

pytestmark = pytest.mark.vllm

BLOCK = 16


@pytest.fixture(scope="module")
def core_client():
    if os.environ.get("ASYNCBATCH_REQUIRE_VLLM") != "1":
        pytest.importorskip("vllm", reason="vLLM is not installed")
    from asyncbatch.sim.engine import use_cpu_platform

    use_cpu_platform()
    import vllm.v1.engine.core_client as module

    return module


@pytest.fixture
def hooked(core_client, monkeypatch):
    """The hook installed by the code ``register()`` runs; removed afterwards."""
    monkeypatch.setattr(asyncbatch, "_registered", False)
    asyncbatch.register()
    cls = core_client.DPLBAsyncMPClient
    assert frontend.ORIGINAL_ATTR in cls.__dict__
    yield core_client
    frontend.unpatch_module(core_client)
    assert frontend.ORIGINAL_ATTR not in cls.__dict__


def stock_method(module):
    return _compat.dp_stock_route(module.DPLBAsyncMPClient)


def lb_width(module) -> int:
    """[waiting, running] (<= 0.32) or [waiting, running, kv_cache_usage] (0.33)."""
    return _compat.dp_counts_width(module.DPLBAsyncMPClient)


def make_config(settings=None, scheduler_cls="asyncbatch.Scheduler", dp=2):
    from vllm.config import VllmConfig

    config = VllmConfig(additional_config={"asyncbatch": settings or {}})
    config.scheduler_config.scheduler_cls = scheduler_cls
    config.cache_config.block_size = BLOCK
    config.parallel_config.data_parallel_size = dp
    return config


def make_client(module, n=2, *, settings=None, scheduler_cls="asyncbatch.Scheduler",
                client_count=1, client_index=0, config=None):
    client = object.__new__(module.DPLBAsyncMPClient)
    client.vllm_config = config or make_config(settings, scheduler_cls, n)
    client.core_engines = [i.to_bytes(2, "little") for i in range(n)]
    width = lb_width(module)
    client.lb_engines = [[0, 0, 0.0][:width] for _ in range(n)]
    client.client_count = client_count
    client.client_index = client_index
    client.eng_start_index = (n * client_index) // client_count
    client.reqs_in_flight = {}
    # 0.33's bookkeeping (unused on 0.26)
    client.streaming_reqs = set()
    client.engine_inflight = Counter()
    return client


def make_request(rid, tokens, *, rank=None, salt=None, pooling=False):
    from vllm import PoolingParams, SamplingParams
    from vllm.v1.engine import EngineCoreRequest

    return EngineCoreRequest(
        request_id=rid, prompt_token_ids=list(tokens), mm_features=None,
        sampling_params=None if pooling else SamplingParams(max_tokens=8),
        pooling_params=PoolingParams() if pooling else None, arrival_time=0.0,
        lora_request=None, cache_salt=salt, data_parallel_rank=rank)


def group_prompts(num_groups, members, prefix_len=2048, seed=0):
    import random

    rng = random.Random(seed)
    out = []
    for g in range(num_groups):
        prefix = [rng.randrange(2, 30000) for _ in range(prefix_len)]
        for m in range(members):
            out.append((g, m, prefix + [rng.randrange(2, 30000) for _ in range(40)]))
    rng.shuffle(out)
    return out


def rank_of(client, engine):
    return client.core_engines.index(engine)


def coordinator_update(client, counts):
    """What the stats task does when the coordinator publishes: rebinds lb_engines."""
    width = len(client.lb_engines[0])
    client.lb_engines = [list(c)[:width] + [0.0] * (width - len(c)) for c in counts]


def test_groups_stay_together_with_balanced_stats(hooked):
    client = make_client(hooked, 2)
    placed: dict[int, set[int]] = {}
    per_engine = Counter()
    for i, (g, _, tokens) in enumerate(group_prompts(12, 6)):
        if i % 8 == 0:  # coordinator: both engines equally busy
            coordinator_update(client, [[1, 10], [1, 10]])
        req = make_request(f"r{i}", tokens)
        engine = client.get_core_engine_for_request(req)
        rank = rank_of(client, engine)
        placed.setdefault(g, set()).add(rank)
        per_engine[rank] += 1
        assert req.data_parallel_rank is None  # the request is sent as it came
        assert client.reqs_in_flight[f"r{i}"] == engine  # vLLM's abort routing
    together = sum(len(r) == 1 for r in placed.values())
    assert together >= 10, placed  # most groups on one engine
    assert per_engine[0] > 0 and per_engine[1] > 0


def test_local_load_view_is_bumped_as_vllm_does(hooked):
    client = make_client(hooked, 2, client_count=3)
    tokens = list(range(2, 200))
    expected = hrw_order(prefix_key(tokens, block_size=BLOCK), range(2))[0]
    engine = client.get_core_engine_for_request(make_request("a", tokens))
    assert rank_of(client, engine) == expected
    assert client.lb_engines[expected][0] == 3  # + client_count waiting
    assert client.lb_engines[1 - expected][0] == 0
    if lb_width(hooked) == 3:
        assert client.engine_inflight[engine] == 1
        asyncio.run(hooked.DPLBAsyncMPClient.process_engine_outputs(
            client, type("Out", (), {"finished_requests": {"a"}})()))
        assert client.engine_inflight[engine] == 0


GROUP = list(range(2, 300))


def route_group_request(client, first_counts, other_counts, rid="x"):
    """The coordinator publishes ``[waiting, running]`` of the engine that
    `GROUP`'s key ranks first and of the other; one request of the group is
    routed.  Returns (that first choice, the rank the request got)."""
    first = hrw_order(prefix_key(GROUP, block_size=BLOCK), range(2))[0]
    counts = [[0, 0], [0, 0]]
    counts[first], counts[1 - first] = list(first_counts), list(other_counts)
    coordinator_update(client, counts)
    return first, rank_of(client, client.get_core_engine_for_request(make_request(rid, GROUP)))


def test_the_bound_sends_a_group_to_its_second_choice(hooked):
    client = make_client(hooked, 2)
    first, rank = route_group_request(client, [40, 60], [0, 0])  # first choice far busier
    assert rank == 1 - first


@pytest.mark.parametrize("client_count", [1, 2])
def test_a_full_engine_gives_way_to_one_with_a_free_seat(hooked, client_count):
    """max_num_seqs = 8: with its first choice holding 8 requests (within the
    load bound) and the other 6, a group's request goes to the other engine,
    which can run it now; once both are full the key decides again.  With two
    API servers a request routed here stands for two (one per server), as in
    vLLM's own load view, and the 6 still leave room for it."""
    config = make_config()
    config.scheduler_config.max_num_seqs = 8
    client = make_client(hooked, 2, config=config, client_count=client_count)
    first, rank = route_group_request(client, [0, 8], [0, 6])
    assert rank == 1 - first
    assert frontend.router_of(client).seats == 8
    first, rank = route_group_request(client, [0, 8], [0, 8], "y")
    assert rank == first


@pytest.mark.parametrize("slack, stays", [(None, True), (0, False)])
def test_at_low_load_the_slack_keeps_a_group_on_its_engine(hooked, slack, stays):
    """Its first choice holds 6 requests, the other 2: the bound alone (cap
    ceil(1.1 * 9 / 2) = 5) moves the group; the default slack of 8 keeps it."""
    settings = {} if slack is None else {"dp_load_slack": slack}
    client = make_client(hooked, 2, settings=settings)
    first, rank = route_group_request(client, [0, 6], [0, 2])
    assert (rank == first) is stays


def test_with_two_api_servers_each_counts_half_the_slack(hooked):
    """20 requests against 2 (new-key slack off, so the slack decides): in the
    units of a client of two API servers 10 and 1, mean 6 after the request;
    half the slack (4) caps the first engine at 10, so the request moves.  With
    the whole slack it would stay (cap 14)."""
    client = make_client(hooked, 2, client_count=2, settings={"dp_new_key_slack": None})
    first, rank = route_group_request(client, [0, 20], [0, 2])
    assert rank == 1 - first


@pytest.mark.parametrize("client_count, new_key_slack, stays",
                         [(1, None, True), (1, 4.0, False), (1, 10.0, True),
                          (2, None, True), (2, 4.0, False)])
def test_a_new_key_is_held_to_the_new_key_slack(hooked, client_count, new_key_slack, stays):
    """The key's first choice runs 9 requests, the other none, and the key has
    nothing in flight.  One API server: the bound with the slack caps the first
    engine at 13 after the request, so it stays; a new-key slack of 4 caps it at
    ceil(10 / 2) + 4 = 9 < 10, so it moves; 10 caps it at 13 again.  Two API
    servers count in units of half a request (4.5 and 0) and half the slack: 4
    caps at ceil(5.5 / 2) + 2 = 5 < 5.5, the same decision as one server (the
    whole 4 would cap at 7 and keep it)."""
    settings = {"dp_new_key_slack": new_key_slack}
    client = make_client(hooked, 2, client_count=client_count, settings=settings)
    first, rank = route_group_request(client, [0, 9], [0, 0])
    assert (rank == first) is stays
    assert frontend.router_of(client).new_key_slack == new_key_slack


def test_a_hot_key_past_its_share_goes_to_its_second_choice(hooked):
    """Both engines hold 40 requests (cap 49 after one more, the key's share
    24): while 24 of the group's requests are in flight on its first choice the
    next goes to the other engine; once vLLM drops finished ones from
    ``reqs_in_flight`` the group's first choice takes it again.  With
    dp_key_share 1 the count does not matter."""
    for share, spills in ((None, True), (1.0, False)):
        settings = {} if share is None else {"dp_key_share": share}
        client = make_client(hooked, 2, settings=settings)
        first = hrw_order(prefix_key(GROUP, block_size=BLOCK), range(2))[0]
        for i in range(24):
            coordinator_update(client, [[0, 40], [0, 40]])
            engine = client.get_core_engine_for_request(make_request(f"h{i}", GROUP))
            assert rank_of(client, engine) == first
        coordinator_update(client, [[0, 40], [0, 40]])
        rank = rank_of(client, client.get_core_engine_for_request(make_request("h24", GROUP)))
        assert (rank == 1 - first) is spills
        for i in range(24):
            client.reqs_in_flight.pop(f"h{i}")
        coordinator_update(client, [[0, 40], [0, 40]])
        rank = rank_of(client, client.get_core_engine_for_request(make_request("h25", GROUP)))
        assert rank == first


def test_the_key_ledger_forgets_finished_requests():
    in_flight = {}
    ledger = frontend.KeyLedger()
    keys = [bytes([k]) * 16 for k in range(3)]
    for i in range(30):
        rid = f"r{i}"
        ledger.record(keys[i % 3], rid, i % 2, in_flight)
        in_flight[rid] = None
    assert len(ledger) == 30
    assert ledger.loads(keys[0], in_flight) == {0: 5.0, 1: 5.0}
    for i in range(0, 30, 3):
        del in_flight[f"r{i}"]
    assert ledger.loads(keys[0], in_flight) == {}
    assert len(ledger) == 20  # checked when its key was asked for
    ledger.prune({})
    assert len(ledger) == 0 and ledger.loads(keys[1], in_flight) == {}
    # keys that never come back are pruned once the ledger outgrows what is in flight
    for i in range(3000):
        ledger.record(i.to_bytes(16, "little"), f"once{i}", 0, {})
    assert len(ledger) <= 1025


def test_an_explicit_rank_wins(hooked):
    client = make_client(hooked, 2)
    for i, (_, _, tokens) in enumerate(group_prompts(4, 2)):
        for rank in (0, 1):
            req = make_request(f"r{i}-{rank}", tokens, rank=rank)
            assert rank_of(client, client.get_core_engine_for_request(req)) == rank
            assert req.data_parallel_rank == rank
    # vLLM does not count named-rank requests in its local load view
    assert [c[0] for c in client.lb_engines] == [0, 0]


def stock_choices(module, client, requests, updates):
    out = []
    for i, req in enumerate(requests):
        if i in updates:
            coordinator_update(client, updates[i])
        out.append(rank_of(client, stock_method(module)(client, req)))
    return out


def hooked_choices(client, requests, updates):
    out = []
    for i, req in enumerate(requests):
        if i in updates:
            coordinator_update(client, updates[i])
        out.append(rank_of(client, client.get_core_engine_for_request(req)))
    return out


@pytest.mark.parametrize("settings, scheduler_cls, routed", [
    ({"dp_routing": "off"}, "asyncbatch.Scheduler", False),
    ({}, None, False),  # auto, stock scheduler
    ({"dp_routing": "prefix"}, None, True),
    ({}, "asyncbatch.Scheduler", True),  # auto, asyncbatch scheduler
])
def test_the_setting_decides(hooked, settings, scheduler_cls, routed):
    prompts = group_prompts(6, 5, seed=3)
    updates = {0: [[0, 3], [0, 3]], 10: [[2, 5], [1, 6]], 20: [[0, 1], [0, 1]]}
    reqs = [make_request(f"r{i}", t) for i, (_, _, t) in enumerate(prompts)]
    stock = stock_choices(hooked, make_client(hooked, 2), reqs, updates)
    client = make_client(hooked, 2, settings=settings, scheduler_cls=scheduler_cls)
    got = hooked_choices(client, [make_request(f"r{i}", t) for i, (_, _, t) in
                                  enumerate(prompts)], updates)
    assert (frontend.ROUTER_ATTR in client.__dict__
            and (client.__dict__[frontend.ROUTER_ATTR] is not None) == routed)
    if not routed:
        assert got == stock
    else:
        groups = {}
        for (g, _, _), r in zip(prompts, got, strict=True):
            groups.setdefault(g, set()).add(r)
        assert got != stock and sum(len(s) == 1 for s in groups.values()) >= 5


def test_short_prompts_and_pooling_requests_go_to_vllm(hooked):
    client = make_client(hooked, 2)
    twin = make_client(hooked, 2)
    reqs = [make_request("short", range(2, 2 + BLOCK - 1)),
            make_request("pool", range(2, 300), pooling=True)]
    twins = [make_request("short", range(2, 2 + BLOCK - 1)),
             make_request("pool", range(2, 300), pooling=True)]
    for a, b in zip(reqs, twins, strict=True):
        assert (rank_of(client, client.get_core_engine_for_request(a))
                == rank_of(twin, stock_method(hooked)(twin, b)))
    assert client.eng_start_index == twin.eng_start_index  # vLLM rotated its scan start


def test_api_servers_agree_without_talking(hooked):
    a = make_client(hooked, 4, client_count=2, client_index=0)
    b = make_client(hooked, 4, client_count=2, client_index=1)
    for i, (_, _, tokens) in enumerate(group_prompts(10, 1)):
        coordinator_update(a, [[0, 5]] * 4)
        coordinator_update(b, [[0, 5]] * 4)
        ea = a.get_core_engine_for_request(make_request(f"a{i}", tokens))
        eb = b.get_core_engine_for_request(make_request(f"b{i}", tokens))
        assert rank_of(a, ea) == rank_of(b, eb)


def test_engines_that_go_away(hooked):
    client = make_client(hooked, 4)
    prompts = group_prompts(40, 1, seed=5)

    def route_all(tag, n):
        out = []
        for i, (_, _, t) in enumerate(prompts):
            # equally loaded engines, earlier requests finished: the key decides
            coordinator_update(client, [[0, 2]] * n)
            client.engine_inflight.clear()
            out.append(rank_of(client, client.get_core_engine_for_request(
                make_request(f"{tag}{i}", t))))
        return out

    before = route_all("a", 4)
    # scale down to 3 engines, as vLLM's elastic scaling slices its lists
    client.core_engines = client.core_engines[:3]
    after = route_all("b", 3)
    assert 3 in before
    for (_, _, t), a, b in zip(prompts, before, after, strict=True):
        if a != 3:
            assert b == a  # only the keys of the engine that went away move
        else:
            assert b == hrw_order(prefix_key(t, block_size=BLOCK), range(4))[1]


def test_salts_separate_tenants(hooked):
    client = make_client(hooked, 8)
    tokens = list(range(2, 400))
    ranks = {rank_of(client, client.get_core_engine_for_request(
        make_request(f"s{i}", tokens, salt=f"tenant{i}"))) for i in range(16)}
    assert len(ranks) > 1


def test_register_installs_without_importing_vllm():
    """In a fresh process: register() imports neither torch nor vLLM's client; the
    client class is wrapped when vLLM imports it."""
    code = (
        "import sys, asyncbatch; asyncbatch.register();"
        "assert 'torch' not in sys.modules, 'torch imported';"
        "assert 'vllm.v1.engine.core_client' not in sys.modules;"
        "from asyncbatch.sim.engine import use_cpu_platform; use_cpu_platform();"
        "import vllm.v1.engine.core_client as m;"
        "c = m.DPLBAsyncMPClient;"
        "assert '_asyncbatch_original_get_core_engine_for_request' in c.__dict__;"
        "assert c.get_core_engine_for_request.__name__ == 'get_core_engine_for_request';"
        "import inspect; inspect.getsource(m);"
        "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]

# SPDX-License-Identifier: Apache-2.0
"""What the simulator counts as prefix-cache hits, on the real vLLM scheduler."""

from streams import STOCK

from asyncbatch._compat import prefix_cache_counts_every_lookup
from asyncbatch.sim.engine import SimEngine, make_request


def test_cached_at_admission_counts_each_request_once(make_scheduler):
    """vLLM's prefix-cache counters count every lookup of a waiting request,
    also the repeated ones while it does not fit (up to vLLM 0.32); the admission
    count (vLLM's per-request prefill stats, RequestOutput.num_cached_tokens)
    counts it once."""
    # 11 usable blocks of 16 tokens; a (160 + 12 tokens) takes all 11, so b, which
    # shares a's first 64 prompt tokens, waits at the head of the queue until a ends
    engine = SimEngine(make_scheduler(STOCK, num_blocks=12))
    shared = list(range(10, 74))
    engine.add_request(make_request("a", shared + list(range(100, 196)), max_tokens=12,
                                    ignore_eos=True))
    engine.step()
    engine.add_request(make_request("b", shared + list(range(200, 232)), max_tokens=4,
                                    ignore_eos=True))
    engine.run()
    stats = engine.stats
    assert stats.num_preemptions == 0
    assert stats.admitted_prompt_tokens == 160 + 96
    # b found the 4 shared blocks, counted once
    assert stats.admitted_cached_tokens == 64
    assert stats.prompt_cached_rate == 64 / 256
    if prefix_cache_counts_every_lookup():
        # the counters saw b looked up on every step it waited
        assert stats.prefix_cache_queries >= 160 + 5 * 96
        assert stats.prefix_cache_hits >= 5 * 64
    else:
        # vLLM >= 0.33 counts each request once, at admission
        assert stats.prefix_cache_queries == stats.admitted_prompt_tokens
        assert stats.prefix_cache_hits == stats.admitted_cached_tokens

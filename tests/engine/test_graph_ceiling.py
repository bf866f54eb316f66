# SPDX-License-Identifier: Apache-2.0
"""`apply_graph_ceiling` on a real vLLM 0.26 configuration (CPU).

The CPU platform runs without CUDA graphs, so each test first puts the
configuration in the state vLLM resolves on a GPU (graph mode on, vLLM's default
sizes for ``max_num_seqs``), the way ``VllmConfig._set_cudagraph_sizes`` would.
"""

import pytest
from graph_config import resolve_graphs_as_on_a_gpu

from asyncbatch.glue.graphs import apply_graph_ceiling, has_default_ceiling_method

# vLLM with patches/0005 picks a default ceiling that covers the largest decode batch
PATCHED = has_default_ceiling_method()


def gpu_like(scheduler, *, user_max=None):
    return resolve_graphs_as_on_a_gpu(scheduler.vllm_config, user_max=user_max)


def settings(value):
    return {"additional_config": {"asyncbatch": {"cuda_graph_max_tokens": value}}}


@pytest.mark.skipif(PATCHED, reason="vLLM with patches/0005")
def test_unset_covers_every_decode_batch(make_scheduler):
    vc = gpu_like(make_scheduler(max_num_seqs=1000, max_num_batched_tokens=16384))
    before = list(vc.compilation_config.cudagraph_capture_sizes)
    assert before[-1] == 512  # vLLM's default ceiling

    assert apply_graph_ceiling(vc) == 1008
    sizes = vc.compilation_config.cudagraph_capture_sizes
    assert vc.compilation_config.max_cudagraph_capture_size == 1008 == sizes[-1]
    assert sizes[:len(before)] == before  # vLLM's sizes kept, more of its 16-step added
    assert sizes[len(before):] == list(range(528, 1009, 16))


@pytest.mark.skipif(not PATCHED, reason="vLLM without patches/0005")
def test_unset_keeps_a_default_that_covers_every_decode_batch(make_scheduler):
    vc = gpu_like(make_scheduler(max_num_seqs=1000, max_num_batched_tokens=16384))
    before = list(vc.compilation_config.cudagraph_capture_sizes)
    assert before[-1] == 1008  # vLLM's own default, with the patch
    assert apply_graph_ceiling(vc) == 1008
    assert vc.compilation_config.cudagraph_capture_sizes == before


def test_a_ceiling_the_user_chose_is_kept(make_scheduler):
    vc = gpu_like(make_scheduler(max_num_seqs=1024, max_num_batched_tokens=16384),
                  user_max=768)
    sizes = list(vc.compilation_config.cudagraph_capture_sizes)
    assert apply_graph_ceiling(vc) == 768
    assert vc.compilation_config.cudagraph_capture_sizes == sizes


@pytest.mark.parametrize("value, expected", [(0, 1024 if PATCHED else 512), (2000, 2000),
                                             (64, 64)])
def test_explicit_setting(make_scheduler, value, expected):
    vc = gpu_like(make_scheduler(max_num_seqs=1024, max_num_batched_tokens=2000,
                                 **settings(value)))
    assert apply_graph_ceiling(vc) == expected
    assert vc.compilation_config.cudagraph_capture_sizes[-1] == expected


def test_graphs_off_stay_off(make_scheduler):
    vc = make_scheduler(max_num_seqs=1024, max_num_batched_tokens=16384).vllm_config
    assert not vc.compilation_config.max_cudagraph_capture_size  # the CPU platform's
    assert apply_graph_ceiling(vc) == 0
    assert not vc.compilation_config.cudagraph_capture_sizes

# SPDX-License-Identifier: Apache-2.0
"""patches/0005: vLLM's own default CUDA-graph ceiling covers the largest decode
batch, with no asyncbatch code involved (stock scheduler, stock configuration)."""

import pytest
from graph_config import resolve_graphs_as_on_a_gpu

from asyncbatch.glue.graphs import has_default_ceiling_method, vllm_default_ceiling
from asyncbatch.sim.engine import build_scheduler

STOCK = "vllm.v1.core.sched.async_scheduler.AsyncScheduler"
needs_patch = pytest.mark.skipif(not has_default_ceiling_method(),
                                 reason="vLLM without patches/0005")


def resolved_ceiling(model_dir, **kwargs):
    """The ceiling vLLM resolves on a GPU (graph mode on) for a stock configuration."""
    vc = resolve_graphs_as_on_a_gpu(build_scheduler(model_dir, STOCK, **kwargs).vllm_config)
    return vc.compilation_config.max_cudagraph_capture_size


@needs_patch
@pytest.mark.parametrize("seqs, mbt, expected", [
    (1024, 16384, 1024),   # past the old cap: the largest decode batch
    (1000, 16384, 1008),   # rounded up to the capture step of 16
    (128, 16384, 256),     # the old default where it already covers the batch
    (1000, 1000, 1000),    # never past the largest batch
])
def test_default_covers_the_largest_decode_batch(model_dir, seqs, mbt, expected):
    assert resolved_ceiling(model_dir, max_num_seqs=seqs, max_num_batched_tokens=mbt) == expected


@pytest.mark.skipif(has_default_ceiling_method(), reason="vLLM with patches/0005")
@pytest.mark.parametrize("seqs, mbt", [(1024, 16384), (128, 16384), (256, 384)])
def test_released_default_is_what_asyncbatch_assumes(model_dir, seqs, mbt):
    assert resolved_ceiling(model_dir, max_num_seqs=seqs, max_num_batched_tokens=mbt) == \
        vllm_default_ceiling(seqs, 1, mbt)

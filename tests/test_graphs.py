# SPDX-License-Identifier: Apache-2.0
"""Which CUDA-graph ceiling the worker asks for (`asyncbatch.glue.graphs`), pure Python."""

import pytest

from asyncbatch.config import AsyncBatchConfig, InvalidSettings
from asyncbatch.glue.graphs import target_ceiling, vllm_default_ceiling


def ceiling(setting=None, *, current=None, seqs=1024, q=1, mbt=16384):
    default = vllm_default_ceiling(seqs, q, mbt)
    if current is None:
        current = default
    return target_ceiling(setting, current=current, default=default,
                          max_decode_tokens=seqs * q, max_num_batched_tokens=mbt)


def test_vllm_default_ceiling_matches_vllm_0_26():
    assert vllm_default_ceiling(1024, 1, 16384) == 512
    assert vllm_default_ceiling(128, 1, 16384) == 256
    assert vllm_default_ceiling(64, 2, 16384) == 256
    assert vllm_default_ceiling(1024, 1, 384) == 384


@pytest.mark.parametrize("kwargs, expected", [
    ({}, 1024),                        # vLLM's H100 defaults: every decode batch gets a graph
    ({"seqs": 1000}, 1008),            # rounded up to vLLM's capture step of 16
    ({"seqs": 512, "q": 3}, 1536),     # speculative decoding: tokens per decode step
    ({"mbt": 1000}, 1000),             # never past the largest batch
    ({"seqs": 128}, None),             # vLLM's default (256) already covers 128 requests
    ({"current": 768}, None),          # a ceiling the user chose is kept
    ({"current": 0}, None),            # CUDA graphs off (enforce_eager, cudagraph_mode NONE)
])
def test_unset_raises_only_vllms_default_ceiling(kwargs, expected):
    assert ceiling(None, **kwargs) == expected


@pytest.mark.parametrize("setting, kwargs, expected", [
    (0, {}, None),                     # 0: vLLM's ceiling
    (300, {}, 304),                    # explicit: set, rounded up
    (256, {}, 256),                    # explicit: may lower it too
    (4096, {"mbt": 2048}, 2048),       # explicit: capped at the batch limit
    (512, {}, None),                   # already what vLLM has
    (2048, {"current": 0}, None),      # graphs off stay off
])
def test_explicit_setting(setting, kwargs, expected):
    assert ceiling(setting, **kwargs) == expected


def test_a_default_that_covers_decode_batches_is_kept():
    # vLLM with patches/0005: its own default is the largest decode batch already
    assert target_ceiling(None, current=1024, default=1024, max_decode_tokens=1024,
                          max_num_batched_tokens=16384) is None


def test_setting_is_validated():
    assert AsyncBatchConfig().cuda_graph_max_tokens is None
    with pytest.raises(InvalidSettings, match="cuda_graph_max_tokens"):
        AsyncBatchConfig.from_additional_config({"asyncbatch": {"cuda_graph_max_tokens": -1}})
    with pytest.raises(InvalidSettings, match="cuda_graph_max_tokens"):
        AsyncBatchConfig.from_additional_config({"asyncbatch": {"cuda_graph_max_tokens": "1k"}})

# SPDX-License-Identifier: Apache-2.0
"""asyncbatch.Worker + asyncbatch.Scheduler (three batches in flight) give the same
greedy tokens as stock vLLM, with no host sync inside a step (needs CUDA GPUs)."""

import subprocess

import pytest
from test_generate import generate, mixed_prompts

pytestmark = pytest.mark.gpu

PLUGINS = dict(scheduler_cls="asyncbatch.Scheduler", worker_cls="asyncbatch.Worker")
# any host sync inside execute_model / sample_tokens raises
SYNC_CHECK = {"VLLM_GPU_SYNC_CHECK": "error"}


def num_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def assert_same(stock, ours, max_tokens):
    assert [len(o) for o in ours] == max_tokens
    bad = [i for i, (a, b) in enumerate(zip(stock, ours, strict=True)) if a != b]
    assert not bad, f"{len(bad)} of {len(stock)} prompts differ: {bad}"


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_deep_pipeline_greedy_parity(tmp_path, model, prefix_caching):
    prompts, max_tokens = mixed_prompts()
    args = dict(enable_prefix_caching=prefix_caching, enable_chunked_prefill=True,
                max_num_batched_tokens=1024, distributed_executor_backend="mp")
    stock = generate(tmp_path, "stock", model, prompts, max_tokens, **args)
    ours = generate(tmp_path, "pipelined", model, prompts, max_tokens, env=SYNC_CHECK,
                    full=True, **args, **PLUGINS)
    assert ours["buffer_depth"] == [3]  # the worker side of the third batch is in place
    assert_same(stock, ours["outputs"], max_tokens)


@pytest.mark.skipif("num_gpus() < 2", reason="needs two GPUs")
def test_deep_pipeline_greedy_parity_tp2(tmp_path, model):
    prompts, max_tokens = mixed_prompts(seed=1)
    args = dict(tensor_parallel_size=2, enable_chunked_prefill=True,
                max_num_batched_tokens=1024, distributed_executor_backend="mp")
    stock = generate(tmp_path, "stock-tp2", model, prompts, max_tokens, **args)
    ours = generate(tmp_path, "pipelined-tp2", model, prompts, max_tokens, env=SYNC_CHECK,
                    full=True, **args, **PLUGINS)
    assert ours["buffer_depth"] == [3, 3]
    assert_same(stock, ours["outputs"], max_tokens)


def test_v1_runner_refuses_an_explicit_deep_pipeline(tmp_path, model):
    with pytest.raises(subprocess.CalledProcessError):
        generate(tmp_path, "v1", model, [[5, 6, 7]], [2],
                 env={"VLLM_USE_V2_MODEL_RUNNER": "0"},
                 additional_config={"asyncbatch": {"pipeline_depth": 3}}, **PLUGINS)
    log = (tmp_path / "v1.log").read_text()
    assert "pipeline_depth" in log and "V1 model runner" in log

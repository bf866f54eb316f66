# SPDX-License-Identifier: Apache-2.0
"""asyncbatch.Worker + asyncbatch.Scheduler (three batches in flight) give the same
greedy tokens as stock vLLM, with no host sync inside a step (needs CUDA GPUs)."""

import os
import subprocess

import pytest
from test_generate import generate, mixed_prompts


def _worker_unverified():
    try:
        from asyncbatch.glue.overrides import worker_unverified

        return worker_unverified()
    except ImportError:
        return None


# On a vLLM release the worker was not verified on, these tests run only to verify
# it (ASYNCBATCH_UNVERIFIED_WORKER=1); else test_refused_where_not_verified runs.
VERIFYING = os.environ.get("ASYNCBATCH_UNVERIFIED_WORKER") == "1"
UNVERIFIED = _worker_unverified() if not VERIFYING else None
pytestmark = pytest.mark.gpu
needs_verified_worker = pytest.mark.skipif(UNVERIFIED is not None, reason=str(UNVERIFIED))

PLUGINS = dict(scheduler_cls="asyncbatch.Scheduler", worker_cls="asyncbatch.Worker")
# 5, then 7 or 9, repeated: the tokens allowed next depend on the last one
GRAMMAR = "(t5(t7|t9))+"
# any host sync inside execute_model / sample_tokens raises
SYNC_CHECK = {"VLLM_GPU_SYNC_CHECK": "error"}


def num_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def assert_same(stock, ours, max_tokens):
    assert [len(o) for o in ours] == max_tokens
    bad = [i for i, (a, b) in enumerate(zip(stock, ours, strict=True)) if a != b]
    assert not bad, f"{len(bad)} of {len(stock)} prompts differ: {bad}"


@needs_verified_worker
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


@needs_verified_worker
def test_deep_pipeline_structured_outputs(tmp_path, model):
    """Requests under a grammar join a running pipeline: the first 16 requests
    (``max_num_seqs``) are plain, and after them every third samples under a
    regex whose next allowed tokens depend on the last one (the test tokenizer
    spells token i "ti": 5, then 7 or 9, then 5 ...), so a bitmask computed from
    a grammar that has not seen the last token fails. Same tokens and finish
    reasons as stock, and no grammar error."""
    prompts, max_tokens = mixed_prompts(n=48, seed=2)
    regex = [GRAMMAR if i >= 16 and i % 3 == 0 else None for i in range(len(prompts))]
    args = dict(max_num_seqs=16, distributed_executor_backend="mp")
    stock = generate(tmp_path, "stock-so", model, prompts, max_tokens, regex=regex,
                     full=True, **args)
    ours = generate(tmp_path, "pipelined-so", model, prompts, max_tokens, regex=regex,
                    env=SYNC_CHECK, full=True, **args, **PLUGINS)
    assert ours["buffer_depth"] == [3]
    assert ours["finish_reasons"] == stock["finish_reasons"]
    assert "error" not in stock["finish_reasons"]
    assert ours["outputs"] == stock["outputs"]
    for i, r in enumerate(regex):
        if r:  # the grammar's tokens, then EOS (1) if the model chose to stop
            tokens = stock["outputs"][i]
            body = tokens[:-1] if tokens[-1] == 1 else tokens
            assert body[0::2] == [5] * len(body[0::2]) and set(body[1::2]) <= {7, 9}


@needs_verified_worker
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


@needs_verified_worker
def test_decode_batches_past_vllms_graph_ceiling(tmp_path, model):
    """640 requests decode together: past vLLM's default CUDA-graph ceiling (512
    tokens), so stock vLLM runs those steps piecewise, and the worker raises the
    ceiling to 640 to run them as graphs. Greedy tokens equal stock vLLM's with the
    same ceiling set by hand (the graphs, and so the padded shapes, are the same)."""
    import random

    rng = random.Random(3)
    prompts = [[rng.randrange(2, 30000) for _ in range(rng.randrange(8, 48))]
               for _ in range(640)]
    max_tokens = [rng.randrange(4, 40) for _ in prompts]
    args = dict(max_num_seqs=640, max_num_batched_tokens=16384,
                distributed_executor_backend="mp")
    stock = generate(tmp_path, "stock-cg640", model, prompts, max_tokens,
                     compilation_config={"max_cudagraph_capture_size": 640}, **args)
    ours = generate(tmp_path, "pipelined-cg", model, prompts, max_tokens, env=SYNC_CHECK,
                    full=True, **args, **PLUGINS)
    assert ours["cuda_graph_max_tokens"] == [640]
    assert ours["buffer_depth"] == [3]
    assert_same(stock, ours["outputs"], max_tokens)


@needs_verified_worker
def test_v1_runner_refuses_an_explicit_deep_pipeline(tmp_path, model):
    with pytest.raises(subprocess.CalledProcessError):
        generate(tmp_path, "v1", model, [[5, 6, 7]], [2],
                 env={"VLLM_USE_V2_MODEL_RUNNER": "0"},
                 additional_config={"asyncbatch": {"pipeline_depth": 3}}, **PLUGINS)
    log = (tmp_path / "v1.log").read_text()
    assert "pipeline_depth" in log and "V1 model runner" in log


@pytest.mark.skipif(UNVERIFIED is None, reason="the worker is verified on this vLLM")
def test_refused_where_not_verified(tmp_path, model):
    with pytest.raises(subprocess.CalledProcessError):
        generate(tmp_path, "unverified", model, [[5, 6, 7]], [2], **PLUGINS)
    assert "has not been verified on a GPU" in (tmp_path / "unverified.log").read_text()

# SPDX-License-Identifier: Apache-2.0
"""Greedy outputs of asyncbatch.Scheduler equal stock vLLM's (needs a CUDA GPU)."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from asyncbatch.sim.model_dir import write_model_dir

pytestmark = pytest.mark.gpu
HERE = Path(__file__).parent
SHAPE = os.environ.get("ASYNCBATCH_GPU_TEST_SHAPE", "llama-1b")


def generate(tmp_path, name, model, prompts, max_tokens, **engine_args):
    spec = tmp_path / f"{name}.json"
    out = tmp_path / f"{name}.out.json"
    engine_args.setdefault("gpu_memory_utilization", 0.5)
    engine_args.setdefault("max_model_len", 4096)
    spec.write_text(json.dumps(dict(model=str(model), prompts=prompts, max_tokens=max_tokens,
                                    engine_args=engine_args)))
    subprocess.run([sys.executable, str(HERE / "run_llm.py"), str(spec), str(out)], check=True)
    return json.loads(out.read_text())["outputs"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("model"), SHAPE)


def mixed_prompts(n=64, seed=0):
    """Mixed lengths, some sharing long prefixes; requests finish at different steps."""
    rng = random.Random(seed)
    shared = [[rng.randrange(2, 30000) for _ in range(rng.choice([64, 200, 512]))]
              for _ in range(4)]
    prompts, max_tokens = [], []
    for i in range(n):
        head = shared[i % 4] if i % 3 else []
        prompts.append(head + [rng.randrange(2, 30000) for _ in range(rng.randrange(1, 700))])
        max_tokens.append(rng.randrange(1, 96))
    return prompts, max_tokens


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_greedy_parity_with_stock(tmp_path, model, prefix_caching):
    prompts, max_tokens = mixed_prompts()
    args = dict(enable_prefix_caching=prefix_caching, enable_chunked_prefill=True,
                max_num_batched_tokens=1024)
    stock = generate(tmp_path, "stock", model, prompts, max_tokens, **args)
    ours = generate(tmp_path, "asyncbatch", model, prompts, max_tokens,
                    scheduler_cls="asyncbatch.Scheduler", **args)
    assert [len(o) for o in ours] == max_tokens
    mismatched = [i for i, (a, b) in enumerate(zip(stock, ours, strict=True)) if a != b]
    assert not mismatched, f"{len(mismatched)} of {len(prompts)} prompts differ: {mismatched}"

# SPDX-License-Identifier: Apache-2.0
"""Greedy outputs of asyncbatch.Scheduler equal stock vLLM's (needs a CUDA GPU)."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
HERE = Path(__file__).parent


def generate(tmp_path, name, model, prompts, max_tokens, *, env=None, full=False,
             regex=None, **engine_args):
    """Greedy outputs of one engine in a fresh process (``full``: the whole run_llm
    result, with finish reasons, and the worker's buffer depth where there is one;
    ``regex``: per prompt, a regex its output must follow, or None)."""
    spec = tmp_path / f"{name}.json"
    out = tmp_path / f"{name}.out.json"
    engine_args.setdefault("gpu_memory_utilization", 0.5)
    engine_args.setdefault("max_model_len", 4096)
    spec.write_text(json.dumps(dict(model=str(model), prompts=prompts, max_tokens=max_tokens,
                                    regex=regex, engine_args=engine_args)))
    log = tmp_path / f"{name}.log"
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, str(HERE / "run_llm.py"), str(spec), str(out)],
                            stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}).returncode
    if rc:
        print("".join(log.read_text().splitlines(True)[-60:]), file=sys.stderr)
        raise subprocess.CalledProcessError(rc, f"run_llm.py {name} (log {log})")
    result = json.loads(out.read_text())
    return result if full else result["outputs"]


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

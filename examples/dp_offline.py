# SPDX-License-Identifier: Apache-2.0
"""Offline data parallelism with prefix groups kept together: one engine per GPU.

vLLM refuses ``LLM(data_parallel_size > 1)`` for dense models; its own example
(``examples/offline_inference/data_parallel.py``) starts one process per GPU and
gives each a contiguous slice of the prompts, so the members of a prefix group
land on several GPUs and each computes the shared prefix.  Here
`asyncbatch.partition_by_prefix` gives whole groups to GPUs, balanced by token
cost, each GPU runs its part with ``asyncbatch.Scheduler``, and the outputs come
back in input order.

    python examples/dp_offline.py --model MODEL_DIR --gpus 2
    python examples/dp_offline.py --model MODEL_DIR --gpus 2 --load-format dummy

Without ``--prompts-file`` (one JSON prompt string or token-id list per line) it
builds a demo set: ``--groups`` groups of ``--members`` prompts that share a long
prefix, interleaved.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import sys
import time
from typing import Any


def run_part(gpu: int, model: str, prompts: list[Any], engine_kwargs: dict[str, Any],
             sampling: dict[str, Any], conn: Any) -> None:
    """One GPU: its own process, its own engine, the prompts of its part."""
    os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)  # before vLLM sees a GPU
    try:
        from vllm import LLM, SamplingParams

        llm = LLM(model=model, **engine_kwargs)
        inputs: list[Any] = [{"prompt_token_ids": p} if isinstance(p, list) else p
                             for p in prompts]
        t0 = time.perf_counter()
        outputs = llm.generate(inputs, SamplingParams(**sampling), use_tqdm=False)
        elapsed = time.perf_counter() - t0
        conn.send(("ok", [[o.outputs[0].text, list(o.outputs[0].token_ids)] for o in outputs],
                   elapsed))
    except BaseException as e:  # the parent reports it
        conn.send(("error", f"{type(e).__name__}: {e}", 0.0))
    finally:
        conn.close()


def generate_data_parallel(model: str, prompts: list[Any], gpus: int, *,
                           engine_kwargs: dict[str, Any], sampling: dict[str, Any],
                           tokenizer: Any = None) -> list[Any]:
    """Outputs (text, token ids) of ``prompts``, in input order, from ``gpus``
    engines that each got whole prefix groups."""
    import asyncbatch

    parts = asyncbatch.partition_by_prefix(prompts, gpus, tokenizer=tokenizer,
                                           output_tokens=sampling.get("max_tokens", 0) or 0)
    ctx = mp.get_context("spawn")
    procs, pipes = [], []
    for gpu, part in enumerate(parts):
        if not part:
            continue
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=run_part, args=(gpu, model, [prompts[i] for i in part],
                                                  engine_kwargs, sampling, child))
        proc.start()
        procs.append(proc)
        pipes.append((gpu, part, parent))
    results: list[Any] = [None] * len(prompts)
    try:
        for gpu, part, parent in pipes:
            status, payload, elapsed = parent.recv()
            if status != "ok":
                raise RuntimeError(f"GPU {gpu}: {payload}")
            print(f"GPU {gpu}: {len(part)} prompts in {elapsed:.1f} s", file=sys.stderr)
            for i, out in zip(part, payload, strict=True):
                results[i] = out
    finally:
        for proc in procs:
            proc.join(timeout=600)
            if proc.is_alive():
                proc.kill()
    return results


def demo_prompts(groups: int, members: int, prefix_len: int, suffix_len: int,
                 vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(groups):
        prefix = [rng.randrange(2, vocab) for _ in range(prefix_len)]
        prompts += [prefix + [rng.randrange(2, vocab) for _ in range(suffix_len)]
                    for _ in range(members)]
    rng.shuffle(prompts)
    return prompts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a local model folder")
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--load-format", default="auto", help="dummy: random weights")
    p.add_argument("--prompts-file", help="one JSON prompt (string or token ids) per line")
    p.add_argument("--groups", type=int, default=32)
    p.add_argument("--members", type=int, default=8)
    p.add_argument("--prefix-len", type=int, default=2048)
    p.add_argument("--suffix-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--out", help="write the outputs (JSON lines, input order) here")
    args = p.parse_args()

    tokenizer = None
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts = [json.loads(line) for line in f if line.strip()]
        if any(isinstance(x, str) for x in prompts):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.model)
    else:
        with open(os.path.join(args.model, "config.json")) as f:
            vocab = min(int(json.load(f).get("vocab_size", 32000)), 32000)
        prompts = demo_prompts(args.groups, args.members, args.prefix_len, args.suffix_len,
                               vocab)
    engine_kwargs = dict(scheduler_cls="asyncbatch.Scheduler", enable_prefix_caching=True,
                         load_format=args.load_format, seed=0)
    sampling = dict(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    outputs = generate_data_parallel(args.model, prompts, args.gpus,
                                     engine_kwargs=engine_kwargs, sampling=sampling,
                                     tokenizer=tokenizer)
    print(f"{len(prompts)} prompts on {args.gpus} GPUs in {time.perf_counter() - t0:.1f} s "
          "(including engine start-up)", file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            for text, token_ids in outputs:
                f.write(json.dumps({"text": text, "token_ids": token_ids}) + "\n")


if __name__ == "__main__":
    main()

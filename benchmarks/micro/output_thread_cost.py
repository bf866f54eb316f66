# SPDX-License-Identifier: Apache-2.0
"""The Python work of the worker's output thread per step, on the CPU.

    $(scripts/venv.sh)/bin/python benchmarks/micro/output_thread_cost.py [--requests 1000]

With async scheduling, vLLM 0.26's multiprocess worker hands each step's output to
a second thread (``WorkerProc.async_output_busy_loop``).  After the device-to-host
copy's event, that thread converts the sampled tokens to lists
(``AsyncOutput.get_output`` in the V2 runner: ``tolist()`` and a trim per request)
and pickles ``ModelRunnerOutput`` into the shared-memory queue.  Both hold the GIL,
so this is the longest the worker's main thread can be kept from the GIL by that
thread in one step (more if Python's switch interval forces turns in between).
Prints the median and p90 in milliseconds over ``--rounds``.
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=200)
    a = ap.parse_args()

    import torch
    from vllm.v1.outputs import ModelRunnerOutput

    n = a.requests
    req_ids = [f"{i}-{'a' * 8}" for i in range(n)]
    sampled_gpu_copy = torch.randint(0, 128_000, (n, 1), dtype=torch.int64)
    num_sampled = torch.ones(n, dtype=torch.int32).numpy()
    convert, serialize, size = [], [], 0
    for _ in range(a.rounds):
        t0 = time.perf_counter()
        sampled = sampled_gpu_copy.tolist()
        for token_ids, k in zip(sampled, num_sampled.tolist(), strict=True):
            del token_ids[k:]
        t1 = time.perf_counter()
        out = ModelRunnerOutput(req_ids=req_ids,
                                req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                sampled_token_ids=sampled)
        size = len(pickle.dumps(("SUCCESS", out), protocol=pickle.HIGHEST_PROTOCOL))
        t2 = time.perf_counter()
        convert.append((t1 - t0) * 1e3)
        serialize.append((t2 - t1) * 1e3)
    for name, xs in (("tolist + trim", convert), ("build + pickle", serialize)):
        xs.sort()
        print(f"{name}: median {statistics.median(xs):.3f} ms, "
              f"p90 {xs[int(len(xs) * 0.9)]:.3f} ms")
    print(f"{n} requests, {size:,} bytes pickled")


if __name__ == "__main__":
    main()

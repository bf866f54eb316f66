# SPDX-License-Identifier: Apache-2.0
"""Put this folder first on PYTHONPATH and set ASYNCBATCH_STACK_SAMPLES=DIR: every
Python process started with that environment (a benchmark's engine processes,
stock or asyncbatch) samples its main thread's stack into DIR/stacks-<pid>.json
(see asyncbatch/bench/stacks.py).  `benchmarks/worker_ab.py --stacks` does this.

ASYNCBATCH_SWITCH_INTERVAL_US=N sets Python's thread switch interval to N
microseconds in every such process (`worker_ab.py` variants ending in ``~swN``).
"""

import os
import sys

if os.environ.get("ASYNCBATCH_SWITCH_INTERVAL_US"):
    sys.setswitchinterval(int(os.environ["ASYNCBATCH_SWITCH_INTERVAL_US"]) / 1e6)

if os.environ.get("ASYNCBATCH_STACK_SAMPLES"):
    try:
        from asyncbatch.bench.stacks import start_from_env

        start_from_env()
    except ImportError:  # asyncbatch not importable in this process: nothing to sample
        pass

# SPDX-License-Identifier: Apache-2.0
"""Host time of one scheduler step, stock AsyncScheduler vs asyncbatch.Scheduler.

One step is one ``schedule()`` and one ``update_from_output()`` (two batches in
flight, as in vLLM's EngineCore), with 256 running requests and 5,000 waiting,
half of them in prefix groups of 8.  Run:

    $(scripts/venv.sh)/bin/python -m pytest benchmarks/micro -q \
        --benchmark-group-by=param:max_num_seqs

and compare the means of the two rows of each group.
"""

import random

import pytest

from asyncbatch.sim.engine import SimEngine, build_scheduler, make_request, use_cpu_platform
from asyncbatch.sim.model_dir import write_model_dir

STOCK = "vllm.v1.core.sched.async_scheduler.AsyncScheduler"
ASYNCBATCH = "asyncbatch.Scheduler"
BLOCK = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    use_cpu_platform()
    return write_model_dir(tmp_path_factory.mktemp("model"), "tiny")


def loaded_engine(model_dir, cls, max_num_seqs, num_running=256, num_waiting=5000):
    rng = random.Random(0)
    scheduler = build_scheduler(model_dir, cls, num_blocks=60_000, block_size=BLOCK,
                                max_num_seqs=max_num_seqs, max_num_batched_tokens=8192,
                                max_model_len=32768)
    engine = SimEngine(scheduler)
    for i in range(num_running):
        prompt = [rng.randrange(2, 1000) for _ in range(128)]
        engine.add_request(make_request(f"run{i}", prompt, max_tokens=20_000))
    while len(scheduler.running) < num_running or scheduler.waiting:
        engine.step()
    prefixes = [[rng.randrange(2, 1000) for _ in range(4 * BLOCK)]
                for _ in range(num_waiting // 16)]
    for i in range(num_waiting):
        head = prefixes[i // 8 % len(prefixes)] if i % 2 == 0 else []
        tail = [rng.randrange(2, 1000) for _ in range(rng.randrange(16, 256))]
        engine.add_request(make_request(f"wait{i}", head + tail, max_tokens=128))
    for _ in range(4):
        engine.step()
    return engine


@pytest.mark.parametrize("max_num_seqs", [256, 320])
@pytest.mark.parametrize("cls", [STOCK, ASYNCBATCH], ids=["stock", "asyncbatch"])
def test_step(benchmark, model_dir, cls, max_num_seqs):
    """max_num_seqs=256: the running batch is full, nothing is admitted (the
    steady state of a saturated server); 320: up to 64 admissions a step."""
    engine = loaded_engine(model_dir, cls, max_num_seqs)

    def two_steps():
        # One schedule() and one update_from_output(): two SimEngine steps in
        # the steady state of a full batch queue.
        engine.step()
        engine.step()

    benchmark.pedantic(two_steps, rounds=60, iterations=1, warmup_rounds=5)
    assert len(engine.scheduler.running) >= 256

# SPDX-License-Identifier: Apache-2.0
"""Soak: a long random request stream through the real vLLM 0.26 scheduler,
stock AsyncScheduler and asyncbatch.Scheduler, invariants checked after every
step (`asyncbatch.sim.soak`).  CI size by default; ASYNCBATCH_SOAK=full runs
100,000 requests per scheduler and policy."""

import pytest
from reliability_support import SOAK_FIGURES, soak_mode

from asyncbatch.sim.soak import ASYNCBATCH, STOCK, SoakConfig, SoakRun
from runner_view import vllm_follows_the_glue_runner  # noqa: F401  (a fixture)

# Requests per run: (fcfs, priority).  About 1,100 requests/s per scheduler on
# one core when the machine is quiet: CI mode takes about a minute.
NUM_REQUESTS = {"ci": (25_000, 8_000), "full": (100_000, 100_000)}

RUNS = [
    pytest.param(STOCK, "fcfs", id="stock-fcfs"),
    pytest.param(ASYNCBATCH, "fcfs", id="asyncbatch-fcfs"),
    pytest.param(STOCK, "priority", id="stock-priority"),
    pytest.param(ASYNCBATCH, "priority", id="asyncbatch-priority"),
]


@pytest.mark.parametrize("scheduler_cls, scheduling_policy", RUNS)
def test_soak(model_dir, scheduler_cls, scheduling_policy):
    num_fcfs, num_priority = NUM_REQUESTS[soak_mode()]
    config = SoakConfig(
        num_requests=num_fcfs if scheduling_policy == "fcfs" else num_priority,
        seed=7 if scheduling_policy == "fcfs" else 8,
        scheduler_cls=scheduler_cls,
        scheduling_policy=scheduling_policy,
    )
    f = SoakRun(config, model_dir).run()
    SOAK_FIGURES.append(f.line())
    assert f.num_requests == config.num_requests
    assert f.num_blocks_leaked == 0
    # The stream reached every corner it is meant to.
    assert f.num_preemptions > 0
    assert f.num_finished_stop > 0 and f.num_finished_length_at_model_len > 0
    for phase in ("waiting", "waiting_in_group", "prefill", "decode", "preempted"):
        assert f.aborts_by_phase.get(phase, 0) > 0, phase
    if scheduler_cls == ASYNCBATCH:
        assert f.max_bypass_steps <= config.max_wait_steps + config.wait_slack
        # The bound was exercised, not just never reached.
        assert f.num_overdue_admissions > 0
        assert f.max_bypass_steps >= config.max_wait_steps // 2
    elif scheduling_policy == "fcfs":
        assert f.max_bypass_steps == 0


def test_soak_with_fcfs_setting_and_no_prefix_caching(model_dir):
    """The pass-through policy, and the prefix policy without a prefix cache."""
    for settings, caching in (({"policy": "fcfs"}, True), ({"max_wait_steps": 4}, False)):
        config = SoakConfig(num_requests=2_000, seed=3, settings=settings,
                            enable_prefix_caching=caching)
        f = SoakRun(config, model_dir).run()
        SOAK_FIGURES.append(f"{f.line()} [settings {settings}, prefix caching {caching}]")
        assert f.num_blocks_leaked == 0 and f.leftovers == {}


def run_three_in_flight(model_dir, config):
    """A soak with asyncbatch.Worker's three batches in flight (the EngineCore side),
    the scheduler configured as on a GPU with vLLM's V2 model runner."""
    run = SoakRun(config, model_dir)
    assert run.engine.max_in_flight == 3 and run.scheduler.pipeline_depth == 3
    assert run.scheduler.use_v2_model_runner
    return run.run()


def test_soak_with_three_batches_in_flight(model_dir):
    """asyncbatch.Worker's third batch in flight (the EngineCore side): the same
    invariants after every step, a request finishing or aborted with two
    outputs still in flight."""
    config = SoakConfig(num_requests=8_000, seed=9, worker_cls="asyncbatch.Worker")
    f = run_three_in_flight(model_dir, config)
    SOAK_FIGURES.append(f"{f.line()} [three batches in flight]")
    assert f.num_requests == config.num_requests
    assert f.num_blocks_leaked == 0 and f.leftovers == {}
    assert f.num_preemptions > 0 and f.num_finished_stop > 0
    assert f.max_bypass_steps <= config.max_wait_steps + config.wait_slack


# Requests per run with the request states outside the waiting queue.
NUM_STATE_REQUESTS = {"ci": 6_000, "full": 100_000}


@pytest.mark.parametrize("scheduler_cls, scheduling_policy", RUNS)
def test_soak_request_states(model_dir, scheduler_cls, scheduling_policy):
    """Grammars that compile over several steps (some fail), remote KV loads,
    streaming input and prefix cache resets under load, with aborts in each of
    those states: no crash, no leaked block, every request accounted for."""
    config = SoakConfig(
        num_requests=NUM_STATE_REQUESTS[soak_mode()], seed=11,
        scheduler_cls=scheduler_cls, scheduling_policy=scheduling_policy,
    ).with_request_states()
    f = SoakRun(config, model_dir).run()
    SOAK_FIGURES.append(f"{f.line()} [request states]")
    assert f.num_requests == config.num_requests
    assert f.num_blocks_leaked == 0 and f.leftovers == {}
    # Each state was reached, and aborted in.
    assert f.num_grammar_errors > 0 and f.num_grammar_requests > f.num_grammar_errors
    assert f.num_remote_loads > 0 and f.num_streaming_chunks > 0
    assert f.num_resets > 0 and f.num_reset_failures > 0
    for phase in ("grammar_compiling", "remote_kv_loading", "streaming_input", "waiting",
                  "prefill", "decode", "preempted"):
        assert f.aborts_by_phase.get(phase, 0) > 0, phase
    if scheduler_cls == ASYNCBATCH:
        assert f.max_bypass_steps <= config.max_wait_steps + config.wait_slack
    else:
        # The accounting follows vLLM's order: stock passes nobody over.
        assert f.max_bypass_steps == 0


def test_soak_request_states_three_batches_in_flight(model_dir):
    config = SoakConfig(num_requests=3_000, seed=12,
                        worker_cls="asyncbatch.Worker").with_request_states()
    f = run_three_in_flight(model_dir, config)
    SOAK_FIGURES.append(f"{f.line()} [request states, three batches in flight]")
    assert f.num_requests == config.num_requests
    assert f.num_blocks_leaked == 0 and f.leftovers == {}
    assert f.num_grammar_errors > 0 and f.num_remote_loads > 0 and f.num_streaming_chunks > 0

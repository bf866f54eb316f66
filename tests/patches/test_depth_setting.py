# SPDX-License-Identifier: Apache-2.0
"""``pipeline_depth`` on vLLM with patches/0004 (``SchedulerConfig.async_scheduling_depth``,
which asyncbatch sets) and without it (asyncbatch replaces
``VllmConfig.max_concurrent_batches``): the same depth, batch count and refusals, in
the EngineCore (``asyncbatch.Scheduler``) and in a worker process
(``asyncbatch.Worker``, built on a pickled copy of a configuration no asyncbatch code
has touched, as a worker process receives it).

The CPU platform builds the V1 model runner: tests that need the V2 runner make
`runs_v2_model_runner` say so, and vLLM follows (tests/engine/runner_view.py)."""

import pickle

import pytest

from asyncbatch.glue import pipeline
from asyncbatch.glue.pipeline import PipelineDepthUnsupported, apply_depth, has_depth_setting
from asyncbatch.sim.engine import SimEngine, build_scheduler

WORKER = "asyncbatch.Worker"
STOCK = "vllm.v1.core.sched.async_scheduler.AsyncScheduler"
SETTING = has_depth_setting()
needs_setting = pytest.mark.skipif(not SETTING, reason="vLLM without patches/0004")
needs_fallback = pytest.mark.skipif(SETTING, reason="vLLM with patches/0004")


@pytest.fixture
def v2_runner(monkeypatch):
    monkeypatch.setattr(pipeline, "runs_v2_model_runner", lambda vllm_config: True)
    # vLLM >= 0.33's GPU worker refuses the V2 runner without Triton (none on the CPU);
    # these tests build the worker but never its model runner.
    from vllm.v1.worker import gpu_worker

    monkeypatch.setattr(gpu_worker, "HAS_TRITON", True, raising=False)


def settings(depth):
    return {"additional_config": {"asyncbatch": {"pipeline_depth": depth}}} if depth else {}


def worker_side(model_dir, **kwargs):
    """asyncbatch.Worker on the configuration a worker process receives: built with
    vLLM's own scheduler, so nothing of asyncbatch has run on it, and pickled."""
    from asyncbatch.worker import Worker

    config = build_scheduler(model_dir, STOCK, **kwargs).vllm_config
    config = pickle.loads(pickle.dumps(config))
    if SETTING:
        assert config.scheduler_config.async_scheduling_depth is None
    worker = Worker(vllm_config=config, local_rank=0, rank=0,
                    distributed_init_method="tcp://127.0.0.1:1", is_driver_worker=True)
    return worker.pipeline_depth, config


CASES = [
    # worker_cls, pipeline_depth, expected depth = max_concurrent_batches
    (WORKER, None, 3),
    (None, None, 2),
    (WORKER, 2, 2),
    (WORKER, 3, 3),
    (None, 2, 2),
]


@pytest.mark.parametrize("worker_cls, depth, expected", CASES)
def test_engine_core_and_worker_agree(model_dir, v2_runner, worker_cls, depth, expected):
    kwargs = dict(worker_cls=worker_cls, **settings(depth))
    s = build_scheduler(model_dir, "asyncbatch.Scheduler", **kwargs)
    assert s.pipeline_depth == expected
    assert s.vllm_config.max_concurrent_batches == expected  # EngineCore.batch_queue_size
    assert SimEngine(s).max_in_flight == expected
    if SETTING:
        assert s.vllm_config.scheduler_config.async_scheduling_depth == expected
    if worker_cls == WORKER:
        worker_depth, config = worker_side(model_dir, **kwargs)
        assert worker_depth == expected
        assert config.max_concurrent_batches == expected  # the V2 runner's buffer pools


def test_explicit_depth_without_the_worker_is_refused(model_dir, v2_runner):
    with pytest.raises(PipelineDepthUnsupported, match="--worker-cls asyncbatch.Worker"):
        build_scheduler(model_dir, "asyncbatch.Scheduler", **settings(3))


def test_explicit_depth_on_the_v1_runner_is_refused_in_the_worker_too(model_dir):
    with pytest.raises(PipelineDepthUnsupported, match="V1 model runner"):
        build_scheduler(model_dir, "asyncbatch.Scheduler", worker_cls=WORKER, **settings(3))
    with pytest.raises(PipelineDepthUnsupported, match="V1 model runner"):
        worker_side(model_dir, worker_cls=WORKER, **settings(3))


def test_v1_runner_keeps_two(model_dir):
    s = build_scheduler(model_dir, "asyncbatch.Scheduler", worker_cls=WORKER)
    assert s.pipeline_depth == 2 and s.vllm_config.max_concurrent_batches == 2


def test_apply_depth_again_on_the_same_config(model_dir, v2_runner):
    """One process with both (vLLM's in-process executor): the worker, then the
    scheduler, apply the depth to the same configuration."""
    s = build_scheduler(model_dir, "asyncbatch.Scheduler", worker_cls=WORKER)
    assert apply_depth(s.vllm_config) == 3
    assert s.vllm_config.max_concurrent_batches == 3


@needs_setting
def test_setting_path_keeps_vllms_property(model_dir, v2_runner):
    from vllm.config import VllmConfig

    assert not hasattr(VllmConfig.max_concurrent_batches.fget, "asyncbatch_stock")
    config = build_scheduler(model_dir, "asyncbatch.Scheduler", worker_cls=WORKER).vllm_config
    assert config.scheduler_config.async_scheduling_depth == 3


@needs_setting
def test_setting_path_refuses_a_different_vllm_depth(model_dir, v2_runner):
    config = build_scheduler(model_dir, STOCK, worker_cls=WORKER).vllm_config
    config.scheduler_config.async_scheduling_depth = 4
    with pytest.raises(PipelineDepthUnsupported, match="--async-scheduling-depth"):
        apply_depth(config)
    config.scheduler_config.async_scheduling_depth = 3
    assert apply_depth(config) == 3


@needs_setting
def test_vllm_depth_setting(model_dir, v2_runner):
    """The patch itself: validation, the CLI flag, and max_concurrent_batches."""
    from pydantic import ValidationError
    from vllm.config import SchedulerConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    with pytest.raises(ValidationError):
        SchedulerConfig.default_factory(async_scheduling_depth=1)
    assert SchedulerConfig.default_factory().async_scheduling_depth is None
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = EngineArgs.from_cli_args(parser.parse_args(["--async-scheduling-depth", "3"]))
    assert args.async_scheduling_depth == 3
    assert EngineArgs.from_cli_args(parser.parse_args([])).async_scheduling_depth is None

    config = build_scheduler(model_dir, STOCK).vllm_config
    sched, parallel = config.scheduler_config, config.parallel_config
    assert (sched.async_scheduling_depth, config.max_concurrent_batches) == (None, 2)
    sched.async_scheduling_depth = 4
    assert config.max_concurrent_batches == 4
    parallel.pipeline_parallel_size = 4
    assert config.max_concurrent_batches == 5  # pp + 1 when larger
    parallel.pipeline_parallel_size = 1
    sched.async_scheduling = False
    assert config.max_concurrent_batches == 1  # no async scheduling: unchanged


@needs_setting
def test_vllm_depth_setting_is_ignored_on_the_v1_runner(model_dir):
    config = build_scheduler(model_dir, STOCK).vllm_config
    config.scheduler_config.async_scheduling_depth = 4
    assert not config.use_v2_model_runner and config.max_concurrent_batches == 2


@needs_fallback
def test_fallback_replaces_the_property(model_dir, v2_runner):
    from vllm.config import SchedulerConfig, VllmConfig

    import asyncbatch.glue.scheduler  # noqa: F401  (installs the replacement)

    assert "async_scheduling_depth" not in SchedulerConfig.__dataclass_fields__
    assert hasattr(VllmConfig.max_concurrent_batches.fget, "asyncbatch_stock")

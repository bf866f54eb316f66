# SPDX-License-Identifier: Apache-2.0
"""vLLM sees the model runner that a test makes asyncbatch see.

The CPU platform builds the V1 model runner, so tests of the third batch in
flight make `asyncbatch.glue.pipeline.runs_v2_model_runner` answer True.  On
released vLLM that is enough: asyncbatch's replacement of
``VllmConfig.max_concurrent_batches`` asks it.  On vLLM with patches/0004 the
property is vLLM's own and asks ``VllmConfig.use_v2_model_runner``; the fixture
below makes that answer follow the glue's while a test has replaced it (and
skips the V2 runner's start-up validation, which needs Triton), so the same
test pretends the same runner on both paths.  Without a replacement, vLLM is
untouched.
"""

import pytest

from asyncbatch.glue import pipeline
from asyncbatch.sim.engine import use_cpu_platform

GLUE_RUNNER_CHECK = pipeline.runs_v2_model_runner


def runner_replaced() -> bool:
    return pipeline.runs_v2_model_runner is not GLUE_RUNNER_CHECK


@pytest.fixture(autouse=True)
def vllm_follows_the_glue_runner(monkeypatch):
    use_cpu_platform()  # before vllm.config is imported
    from vllm.config import VllmConfig

    stock_use_v2 = VllmConfig.use_v2_model_runner.fget
    stock_validate = VllmConfig._validate_v2_model_runner

    def use_v2_model_runner(self):
        if runner_replaced():
            return bool(pipeline.runs_v2_model_runner(self))
        return stock_use_v2(self)

    def validate_v2_model_runner(self):
        if not runner_replaced():
            stock_validate(self)

    monkeypatch.setattr(VllmConfig, "use_v2_model_runner", property(use_v2_model_runner))
    monkeypatch.setattr(VllmConfig, "_validate_v2_model_runner", validate_v2_model_runner)

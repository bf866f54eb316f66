# SPDX-License-Identifier: Apache-2.0
"""Fixtures for the upstream-hook tests: the engine tests' helpers (tests/engine)."""

import os
import sys

import pytest

if os.environ.get("ASYNCBATCH_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed")

here = os.path.dirname(__file__)
sys.path[:0] = [here, os.path.join(here, "..", "engine")]

# Before any test module imports vLLM: vLLM binds its platform on first use, and
# vLLM >= 0.29 decides the model runner from it.
from asyncbatch.sim.engine import use_cpu_platform  # noqa: E402

use_cpu_platform()
from asyncbatch.sim.engine import build_scheduler  # noqa: E402
from runner_view import vllm_follows_the_glue_runner  # noqa: E402,F401


@pytest.fixture
def make_asyncbatch(model_dir):
    def make(**kwargs):
        return build_scheduler(model_dir, "asyncbatch.Scheduler", **kwargs)

    return make

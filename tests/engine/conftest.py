# SPDX-License-Identifier: Apache-2.0
"""Fixtures that build real vLLM 0.26 schedulers on the CPU."""

import os

import pytest

if os.environ.get("ASYNCBATCH_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed")

# Before any test module imports vLLM: vLLM binds its platform on first use, and
# vLLM >= 0.29 decides the model runner from it.
from asyncbatch.sim.engine import use_cpu_platform  # noqa: E402

use_cpu_platform()
from streams import ASYNCBATCH  # noqa: E402

from asyncbatch.sim.engine import build_scheduler  # noqa: E402
from runner_view import vllm_follows_the_glue_runner  # noqa: E402,F401


@pytest.fixture
def make_scheduler(model_dir):
    def make(cls=ASYNCBATCH, **kwargs):
        return build_scheduler(model_dir, cls, **kwargs)

    return make

# SPDX-License-Identifier: Apache-2.0
"""Reliability tests: soak through the real vLLM 0.26 scheduler, policy
properties, bad input.  ``ASYNCBATCH_SOAK=full`` runs the long soak (>= 100,000
requests per scheduler) instead of the CI-sized one."""

import pytest
from reliability_support import SOAK_FIGURES, needs_vllm, soak_mode


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    needs_vllm()
    from asyncbatch.sim.engine import use_cpu_platform
    from asyncbatch.sim.model_dir import write_model_dir

    use_cpu_platform()
    return write_model_dir(tmp_path_factory.mktemp("model"), "tiny")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if SOAK_FIGURES:
        terminalreporter.section(f"soak figures ({soak_mode()} mode)")
        for line in SOAK_FIGURES:
            terminalreporter.write_line(line)

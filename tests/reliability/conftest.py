# SPDX-License-Identifier: Apache-2.0
"""Reliability tests: soak through the real vLLM 0.26 scheduler, policy
properties, bad input.  ``ASYNCBATCH_SOAK=full`` runs the long soak (>= 100,000
requests per scheduler) instead of the CI-sized one."""

from reliability_support import SOAK_FIGURES, soak_mode


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if SOAK_FIGURES:
        terminalreporter.section(f"soak figures ({soak_mode()} mode)")
        for line in SOAK_FIGURES:
            terminalreporter.write_line(line)


def pytest_configure(config):
    # Before any test module imports vLLM: vLLM binds its platform on first use, and
    # vLLM >= 0.29 decides the model runner from it.
    try:
        import vllm  # noqa: F401
    except ImportError:
        return
    from asyncbatch.sim.engine import use_cpu_platform

    use_cpu_platform()

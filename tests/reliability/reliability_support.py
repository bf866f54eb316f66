# SPDX-License-Identifier: Apache-2.0
"""Shared by the reliability tests and their conftest."""

import os

import pytest

# one line per soak run, printed at the end of the test session
SOAK_FIGURES: list[str] = []


def soak_mode() -> str:
    """``ci`` (default, bounded to a few minutes) or ``full`` (ASYNCBATCH_SOAK=full)."""
    return os.environ.get("ASYNCBATCH_SOAK", "ci")


def needs_vllm() -> None:
    if os.environ.get("ASYNCBATCH_REQUIRE_VLLM") != "1":
        pytest.importorskip("vllm", reason="vLLM 0.26 is not installed")

# SPDX-License-Identifier: Apache-2.0
import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without CUDA, tests marked ``gpu`` are skipped (they run on a GPU machine)."""
    if os.environ.get("ASYNCBATCH_FORCE_GPU_TESTS") == "1":
        return
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

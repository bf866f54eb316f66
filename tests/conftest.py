# SPDX-License-Identifier: Apache-2.0
import os

import pytest

# every fast answer of asyncbatch's allocate_slots fast path is checked against
# vLLM's own path (asyncbatch/glue/fastpath.py)
os.environ.setdefault("ASYNCBATCH_VERIFY_FAST_PATH", "1")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A local model folder (config.json + tokenizer, tiny Llama shape) for CPU
    schedulers.  Imports vLLM only when a test asks for it, and skips the test
    where vLLM is missing (unless ASYNCBATCH_REQUIRE_VLLM=1, as in CI)."""
    if os.environ.get("ASYNCBATCH_REQUIRE_VLLM") != "1":
        pytest.importorskip("vllm", reason="vLLM 0.26 is not installed")
    from asyncbatch.sim.engine import use_cpu_platform
    from asyncbatch.sim.model_dir import write_model_dir

    use_cpu_platform()
    return write_model_dir(tmp_path_factory.mktemp("model"), "tiny")


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

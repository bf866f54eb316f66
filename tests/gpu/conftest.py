# SPDX-License-Identifier: Apache-2.0
import os

import pytest

from asyncbatch.sim.model_dir import write_model_dir

SHAPE = os.environ.get("ASYNCBATCH_GPU_TEST_SHAPE", "llama-1b")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A dummy-weight model folder (config + tokenizer) of the test shape."""
    return write_model_dir(tmp_path_factory.mktemp("model"), SHAPE)

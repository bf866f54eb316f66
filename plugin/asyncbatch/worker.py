# SPDX-License-Identifier: Apache-2.0
"""`asyncbatch.Worker`: vLLM's GPU worker, ready for more than two batches in flight.

Select it with ``--worker-cls asyncbatch.Worker`` (``LLM(worker_cls=...)``), together
with ``--scheduler-cls asyncbatch.Scheduler``.  The pair runs three batches in
flight instead of vLLM's two (``pipeline_depth``, see `asyncbatch.glue.pipeline`):
the worker prepares step N+2 while N and N+1 are queued on the GPU, so the host
chain between two steps (output copy, IPC, ``update_from_output``, ``schedule``,
IPC, input preparation) no longer has to fit inside one GPU step.  The worker's
part is to make the worker process see the same depth as the EngineCore, so that
the V2 model runner sizes its round-robin host buffers (``UvaBufferPool``: the
pinned staging of block-table and request-state writes that GPU kernels read in
place) for that many batches: the host never rewrites the buffer of a step the
GPU has not finished reading.  Sampled tokens stay on the GPU as in the V2 runner
(``last_sampled_tokens``, written by step N's sampler on the main stream before
step N+1's input kernels read them); the one host sync per step is still the
output copy, on its own stream and thread.

It refuses, at start-up and with every reason, a configuration in which the
deeper pipeline would be unsafe (see `asyncbatch.glue.pipeline`).

It also captures CUDA graphs for full decode batches (``cuda_graph_max_tokens``,
see `asyncbatch.glue.graphs`): vLLM's default ceiling of 512 tokens sends a decode
step of more running requests than that through piecewise launches from Python,
which is what a small model's GPU waits for.
"""

from __future__ import annotations

import os
from typing import Any

from vllm.logger import init_logger
from vllm.v1.worker.gpu_worker import Worker as VllmWorker

from asyncbatch._compat import check_vllm_version
from asyncbatch.glue.graphs import apply_graph_ceiling
from asyncbatch.glue.overrides import worker_unverified
from asyncbatch.glue.pipeline import (
    STOCK_DEPTH,
    apply_depth,
    install_depth_override,
    runs_v2_model_runner,
)

# Under vLLM's logger, so that its handler and VLLM_LOGGING_LEVEL apply.
logger = init_logger(f"vllm.{__name__}")

# The V2 runner sizes its buffer pools from VllmConfig.max_concurrent_batches when it
# is built (Worker.init_device), after this module has been imported and after
# Worker.__init__ has set the depth on vLLM with async_scheduling_depth.
install_depth_override()


class PipelineBuffersTooFew(RuntimeError):
    pass


class WorkerNotVerified(RuntimeError):
    pass


# Set to 1 to start the worker on a vLLM release it was not verified on, to verify it
# (the GPU tests and A/B runs that would add the release to the register).
UNVERIFIED_WORKER_ENV = "ASYNCBATCH_UNVERIFIED_WORKER"


class Worker(VllmWorker):
    """vLLM's GPU worker; applies ``pipeline_depth`` in the worker process."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_vllm_version()
        unverified = worker_unverified()
        if unverified and os.environ.get(UNVERIFIED_WORKER_ENV) == "1":
            logger.warning("asyncbatch: %s Starting anyway (%s=1): for verifying it only.",
                           unverified, UNVERIFIED_WORKER_ENV)
        elif unverified:
            raise WorkerNotVerified(unverified)
        super().__init__(*args, **kwargs)
        self.pipeline_depth = apply_depth(self.vllm_config)
        # before init_device builds the model runner, which reads the capture sizes
        self.cuda_graph_max_tokens = apply_graph_ceiling(self.vllm_config)

    def init_device(self) -> None:
        super().init_device()
        runner = type(self.model_runner)
        if self.pipeline_depth > STOCK_DEPTH:
            pools = pipeline_buffer_count()
            if pools < self.pipeline_depth:
                raise PipelineBuffersTooFew(
                    f"asyncbatch: the model runner sized its input buffers for {pools} "
                    f"batches in flight, but pipeline_depth is {self.pipeline_depth}")
        logger.info("asyncbatch worker: %s.%s, %d batches in flight, CUDA graphs up to %d "
                    "tokens", runner.__module__, runner.__qualname__,
                    self.vllm_config.max_concurrent_batches, self.cuda_graph_max_tokens)

    def asyncbatch_buffer_depth(self) -> int:
        """Batches in flight this worker's input buffers are sized for (for
        ``LLM.collective_rpc("asyncbatch_buffer_depth")``; 0 on the V1 runner,
        which has no round-robin buffers)."""
        if not runs_v2_model_runner(self.vllm_config):
            return 0
        return pipeline_buffer_count()

    def asyncbatch_cuda_graph_max_tokens(self) -> int:
        """The largest batch, in tokens, this worker runs as a CUDA graph (0: none);
        for ``LLM.collective_rpc("asyncbatch_cuda_graph_max_tokens")``."""
        return int(self.vllm_config.compilation_config.max_cudagraph_capture_size or 0)


def pipeline_buffer_count() -> int:
    """How many batches in flight the V2 runner's round-robin buffers are sized for."""
    from vllm.v1.worker.gpu import buffer_utils

    return int(buffer_utils._DEFAULT_MAX_CONCURRENCY)

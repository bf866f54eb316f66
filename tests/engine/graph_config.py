# SPDX-License-Identifier: Apache-2.0
"""A CPU-built vLLM configuration in the CUDA-graph state vLLM resolves on a GPU."""


def resolve_graphs_as_on_a_gpu(vllm_config, *, user_max=None):
    """Graph mode on and the capture sizes ``VllmConfig._set_cudagraph_sizes`` picks
    (the CPU platform turns graphs off); ``user_max``: a ceiling set by hand."""
    from vllm.config import CUDAGraphMode

    vllm_config.model_config.enforce_eager = False
    cc = vllm_config.compilation_config
    cc.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE
    cc.max_cudagraph_capture_size = user_max
    cc.cudagraph_capture_sizes = None
    vllm_config._set_cudagraph_sizes()
    return vllm_config

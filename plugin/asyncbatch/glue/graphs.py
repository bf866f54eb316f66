# SPDX-License-Identifier: Apache-2.0
"""CUDA graphs for full decode batches, applied in the worker process.

vLLM 0.26 captures CUDA graphs for batches of up to ``max_cudagraph_capture_size``
tokens, by default ``min(2 * max_num_seqs * decode_query_len, 512)``.  A larger
batch runs the model piecewise: the compiled pieces between the attention calls
are launched one by one from Python.  With vLLM's default ``max_num_seqs`` of
1024 on an H100, a decode step of more than 512 running requests takes that path,
and for a small model the worker's main thread then spends most of the step
launching kernels while the GPU waits (stack samples and NVML utilization in
``benchmarks/results/worker/``: Llama-1B shape, 1000 requests in decode).

`apply_graph_ceiling` raises the ceiling, in the worker's copy of the
configuration and before the model runner is built, to the largest decode batch
the scheduler can form (``max_num_seqs * decode_query_len``, at most
``max_num_batched_tokens``).  The capture sizes above 256 keep vLLM's own step of
16 (``VllmConfig._set_cudagraph_sizes`` computes them).  Only the worker uses
these sizes (graph capture, padding, the attention metadata builders), so the
EngineCore's copy needs no change.  The setting ``cuda_graph_max_tokens`` chooses:
unset raises vLLM's default ceiling as above, but leaves a ceiling the user chose
(one that differs from vLLM's default) alone; ``0`` leaves vLLM's ceiling alone; a
positive value sets the ceiling to that many tokens.  The worker sees only the
resolved configuration, so a ceiling set by hand to exactly vLLM's default cannot
be told from the default; ``0`` keeps it.  ``VllmConfig._set_cudagraph_sizes`` is
private to vLLM, which is one reason asyncbatch pins vLLM 0.26.  On vLLM with
``patches/0005`` the default itself covers the largest decode batch, and unset
changes nothing.

Stock vLLM gets the same graphs with ``--max-cudagraph-capture-size N``; the
benchmark in ``benchmarks/results/worker/`` measures stock both ways.
"""

from __future__ import annotations

import functools
from typing import Any

from asyncbatch.config import settings_of

# vLLM 0.26's cap on the default ceiling (VllmConfig._set_cudagraph_sizes).
VLLM_DEFAULT_CAP = 512
# ... and its step between capture sizes above 256 tokens.
GRAPH_STEP = 16


@functools.cache
def has_default_ceiling_method() -> bool:
    """Whether the installed vLLM has ``VllmConfig.default_max_cudagraph_capture_size``
    (``patches/0005``, whose default already covers the largest decode batch)."""
    from vllm.config import VllmConfig

    return hasattr(VllmConfig, "default_max_cudagraph_capture_size")


def vllm_default_ceiling(max_num_seqs: int, decode_query_len: int,
                         max_num_batched_tokens: int) -> int:
    """The ceiling vLLM 0.26 as released picks when the user sets none."""
    return min(max_num_seqs * decode_query_len * 2, VLLM_DEFAULT_CAP, max_num_batched_tokens)


def target_ceiling(setting: int | None, *, current: int, default: int, max_decode_tokens: int,
                   max_num_batched_tokens: int) -> int | None:
    """The ceiling to capture up to, or None to keep ``current``.

    ``current`` is vLLM's resolved ``max_cudagraph_capture_size`` (0 when CUDA
    graphs are off, which is kept); ``default`` is the one vLLM picks when the
    user sets none; ``max_decode_tokens`` is ``max_num_seqs`` x tokens per decode
    step.  The result never exceeds ``max_num_batched_tokens``: no batch is larger.
    """
    if current <= 0 or setting == 0:
        return None
    if setting is None:
        if current != default:
            return None  # the user chose this ceiling
        wanted = max_decode_tokens
    else:
        wanted = setting
    # above 256 tokens vLLM captures every 16th size: round up so that the largest
    # batch has a graph of its own rather than falling just past the last one
    wanted = min(-(-wanted // GRAPH_STEP) * GRAPH_STEP, max_num_batched_tokens)
    if setting is None and wanted <= current:
        return None
    return wanted if wanted != current else None


def apply_graph_ceiling(vllm_config: Any) -> int:
    """Raise (or set) the CUDA-graph ceiling of this process's configuration as
    ``cuda_graph_max_tokens`` says; return the ceiling now in effect.

    Raises:
        InvalidSettings: the asyncbatch settings do not validate.
    """
    setting = settings_of(vllm_config.additional_config).cuda_graph_max_tokens
    cc = vllm_config.compilation_config
    current = int(cc.max_cudagraph_capture_size or 0)
    max_num_seqs = vllm_config.scheduler_config.max_num_seqs
    decode_query_len = 1 + vllm_config.num_speculative_tokens
    max_num_batched_tokens = vllm_config.scheduler_config.max_num_batched_tokens
    if has_default_ceiling_method():
        default = min(vllm_config.default_max_cudagraph_capture_size(), max_num_batched_tokens)
    else:
        default = vllm_default_ceiling(max_num_seqs, decode_query_len, max_num_batched_tokens)
    target = target_ceiling(setting, current=current, default=default,
                            max_decode_tokens=max_num_seqs * decode_query_len,
                            max_num_batched_tokens=max_num_batched_tokens)
    if target is None:
        return current
    cc.max_cudagraph_capture_size = target
    cc.cudagraph_capture_sizes = None
    vllm_config._set_cudagraph_sizes()
    return int(cc.max_cudagraph_capture_size or 0)


__all__ = ["apply_graph_ceiling", "has_default_ceiling_method", "target_ceiling",
           "vllm_default_ceiling"]

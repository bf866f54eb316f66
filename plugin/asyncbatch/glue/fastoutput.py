# SPDX-License-Identifier: Apache-2.0
"""A steady-decode fast path for ``Scheduler.update_from_output`` (vLLM 0.26, 0.33).

After every step the EngineCore hands the step's sampled tokens to
``update_from_output``, which walks every scheduled request through one general
loop: speculative-decoding accounting, encoder inputs, ``_update_request_with_output``
(append the token, hash any block it filled, ``check_stop``, then
the placeholder count and ``cache_blocks``, which 0.26 does in
``AsyncScheduler`` and 0.33 in the loop), structured output, routed experts (0.33:
the aux output connector), prefill statistics, stops, logprobs, sampling masks
(0.33), NaN counts and prompt logprobs, and one ``EngineCoreOutput``.  With ~1000
requests in decode that loop is about half of the EngineCore's host time per
step, and with the worker's CUDA graphs and three batches in flight the
EngineCore's host time is what the GPU of a small model waits for (benchmarks/results/profile/).

`DecodeOutputFastPath` takes the requests whose step was plain decode out of that
loop: one scheduled token, one sampled token that stops nothing, a running request
with no encoder inputs, no grammar, no logprobs, no prefill statistics left to
report and no stale frame to discard.  For those it makes exactly the changes
vLLM's loop makes, in the same calls where a call has state of its own (the block
hasher, ``cache_blocks``), and builds the same ``EngineCoreOutput``.  Every other
request (a prefill chunk, a stop, anything unusual) goes through vLLM's own
``update_from_output`` with the step's other fields unchanged, which also does the
step-wide work (deferred frees, stats, KV events, finished ids).  Outputs come
back in vLLM's order.

The token cannot stop the request when `_may_stop` is False: it mirrors
``check_stop`` without the status changes, and any token it cannot rule out goes
to vLLM's path, where ``check_stop`` decides.  It is installed only where its
per-request conditions are the whole story (`fast_output_gaps`), and not on a vLLM
with patches/0007, which does the same inside its own loop.  Tests compare
every step's ``EngineCoreOutputs`` and the requests' state with the fast path on
and off (tests/engine/test_fast_output.py).
"""

from __future__ import annotations

import copy
from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
from vllm.v1.request import RequestStatus

from asyncbatch._compat import output_loop_since_033

# vLLM with patches/0007 takes the same requests out of its loop itself
HAS_VLLM_PLAIN_DECODE_OUTPUT = hasattr(Scheduler, "_update_plain_decode")


def fast_output_gaps(scheduler: Any) -> list[str]:
    """Why the fast path cannot stand in for ``update_from_output``'s loop here
    (empty: it can)."""
    gaps = []
    if scheduler.num_spec_tokens or scheduler.num_sampled_tokens_per_step != 1:
        gaps.append("speculative decoding")
    if scheduler.connector is not None:
        gaps.append("a KV connector")
    if (getattr(scheduler, "enable_return_routed_experts", False)
            or getattr(scheduler, "aux_output_connector", None) is not None):
        gaps.append("routed experts returned (an aux output connector)")
    if getattr(scheduler, "return_sampling_mask", False):
        gaps.append("sampling masks returned")
    if scheduler.enable_kv_cache_events:
        # the fast requests' cache events would be published before the others'
        gaps.append("KV cache events published")
    if scheduler.perf_metrics is not None and scheduler.perf_metrics.is_enabled():
        gaps.append("per-step performance metrics")  # they read the whole step's output
    return gaps


class DecodeOutputFastPath:
    """Stands in for a scheduler's ``update_from_output`` (see the module).

    Args:
        scheduler: the vLLM scheduler whose state it updates.
        slow: vLLM's ``update_from_output`` bound to that scheduler.

    ``steps`` counts the calls, ``fast`` the requests it handled and ``slow`` those
    it passed to vLLM's path.
    """

    def __init__(self, scheduler: Any, slow: Any) -> None:
        self.slow_path = slow
        self.requests: dict[str, Any] = scheduler.requests
        self.kv_cache_manager = scheduler.kv_cache_manager
        self.max_model_len: int = scheduler.max_model_len
        self.hash_block_size: int = scheduler.hash_block_size
        self.running = RequestStatus.RUNNING
        # vLLM 0.33's loop (see `output_loop_since_033`), else 0.26's
        self.since_033 = output_loop_since_033()
        self.steps = 0
        self.fast = 0
        self.slow = 0

    def __call__(self, scheduler_output: Any, model_runner_output: Any) -> dict[int, Any]:
        self.steps += 1
        sampled = model_runner_output.sampled_token_ids
        since_033 = self.since_033
        if (not sampled or model_runner_output.pooler_output
                or model_runner_output.kv_connector_output is not None
                or getattr(model_runner_output, "routed_experts", None) is not None
                or getattr(model_runner_output, "aux_output_connector_output", None)
                or getattr(model_runner_output, "sampling_masks", None) is not None
                or model_runner_output.num_nans_in_logits is not None
                or scheduler_output.scheduled_spec_decode_tokens):
            self.slow += len(scheduler_output.num_scheduled_tokens)
            return self.slow_path(scheduler_output, model_runner_output)

        requests = self.requests
        index = model_runner_output.req_id_to_index
        prompt_logprobs = model_runner_output.prompt_logprobs_dict
        prompt_id_logprobs = getattr(model_runner_output, "prompt_token_id_logprobs_dict", None)
        running = self.running
        max_model_len = self.max_model_len
        hash_block_size = self.hash_block_size
        cache_blocks = self.kv_cache_manager.cache_blocks
        may_stop = self._may_stop_033 if since_033 else self._may_stop
        fast: dict[int, list[Any]] = {}
        rest: dict[str, int] = {}
        for req_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
            request = requests.get(req_id)
            if (num_tokens != 1 or request is None
                    or len(tokens := sampled[index[req_id]]) != 1
                    or request.status is not running
                    or (request.num_stale_output_tokens if since_033
                        else request.async_tokens_to_discard)
                    or request.num_output_placeholders < 1
                    or request.prefill_stats is not None
                    or request.mm_features
                    or request.structured_output_request is not None
                    or (params := request.sampling_params) is None
                    or params.num_logprobs is not None
                    or (prompt_logprobs and req_id in prompt_logprobs)
                    or (prompt_id_logprobs and req_id in prompt_id_logprobs)):
                rest[req_id] = num_tokens
                continue
            token = tokens[0]
            output_ids = request._output_token_ids
            all_ids = request._all_token_ids
            if may_stop(request, params, token, len(output_ids) + 1, len(all_ids) + 1,
                        max_model_len):
                rest[req_id] = num_tokens
                continue
            # vLLM's loop, as it runs for this request:
            request.num_in_flight_tokens -= 1
            # Request.append_output_token_ids, whose block hasher has work only when
            # the token fills a block
            output_ids.append(token)
            all_ids.append(token)
            if (request._block_hasher is not None
                    and (len(request.block_hashes) + 1) * hash_block_size <= len(all_ids)):
                request.update_block_hashes()
            # the placeholder resolved, and the blocks the token completes cached
            # (0.26: AsyncScheduler._update_request_with_output; 0.33: the loop)
            request.num_output_placeholders -= 1
            cache_blocks(request, request.num_computed_tokens - (
                request.num_in_flight_tokens if since_033 else request.num_output_placeholders))
            output = EngineCoreOutput(
                request_id=req_id, new_token_ids=tokens, stop_reason=request.stop_reason,
                events=request.take_events(), trace_headers=request.trace_headers,
                num_nans_in_logits=request.num_nans_in_logits)
            client = request.client_index
            if client in fast:
                fast[client].append(output)
            else:
                fast[client] = [output]
        n_fast = len(scheduler_output.num_scheduled_tokens) - len(rest)
        self.fast += n_fast
        self.slow += len(rest)
        if not n_fast:
            return self.slow_path(scheduler_output, model_runner_output)
        rest_output = copy.copy(scheduler_output)
        rest_output.num_scheduled_tokens = rest
        result = self.slow_path(rest_output, model_runner_output)
        return self._merge(result, fast, scheduler_output.num_scheduled_tokens)

    @staticmethod
    def _may_stop(request: Any, params: Any, token: int, num_output: int, num_tokens: int,
                  max_model_len: int) -> bool:
        """False if ``check_stop`` would not stop ``request`` once ``token`` is
        appended (``num_output``, ``num_tokens``: its counts then); True if it
        might."""
        if num_output < params.min_tokens:
            return False
        return (token == params.eos_token_id
                or (params.stop_token_ids and token in params.stop_token_ids)
                or num_tokens >= max_model_len
                or num_output >= request.max_tokens
                or params.repetition_detection is not None)

    @staticmethod
    def _may_stop_033(request: Any, params: Any, token: int, num_output: int,
                      num_tokens: int, max_model_len: int) -> bool:
        """`_may_stop` in the order of vLLM 0.33's ``check_stop``: ``min_tokens``
        holds back only the repetition check."""
        return (token == params.eos_token_id
                or (params.stop_token_ids and token in params.stop_token_ids)
                or num_tokens >= max_model_len
                or num_output >= request.max_tokens
                or (params.repetition_detection is not None
                    and num_output >= params.min_tokens))

    @staticmethod
    def _merge(result: dict[int, Any], fast: dict[int, list[Any]],
               order: dict[str, int]) -> dict[int, Any]:
        """Add the fast outputs to vLLM's result for the other requests, in the
        order vLLM's loop would have made them (the step's scheduling order; vLLM's
        error outputs, which come after its loop, stay last)."""
        position: dict[str, int] | None = None
        for client, outputs in fast.items():
            eco = result.get(client)
            if eco is None:
                result[client] = EngineCoreOutputs(outputs=outputs)
                continue
            if eco.outputs:
                if position is None:
                    position = {rid: i for i, rid in enumerate(order)}
                last = len(position)
                outputs = outputs + eco.outputs
                outputs.sort(key=lambda o: position.get(o.request_id, last))
            eco.outputs = outputs
        return result

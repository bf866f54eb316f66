# SPDX-License-Identifier: Apache-2.0
"""A simulated KV connector: requests that load part of their prompt's KV from a
remote instance (prefill/decode disaggregation), for soaks on the CPU.

Scheduler side only, as vLLM's own test connector (``MockKVConnector`` in
vLLM's ``tests/v1/kv_connector/unit/utils.py``): a request named in `plan`
finds that many tokens remotely, loaded asynchronously, so vLLM's scheduler
parks it in ``WAITING_FOR_REMOTE_KVS`` with its blocks allocated.  The loads in
flight are listed in `loading`; whoever plays the worker reports them finished
(``KVConnectorOutput.finished_recving``) when it decides, as vLLM's workers do,
also for a request aborted while its load was in flight.
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
)

NAME = "AsyncbatchSimConnector"


def kv_transfer_config() -> Any:
    """The ``VllmConfig.kv_transfer_config`` that selects this connector."""
    from vllm.config import KVTransferConfig

    return KVTransferConfig(kv_connector=NAME, kv_role="kv_both",
                            kv_connector_module_path=__name__)


class AsyncbatchSimConnector(KVConnectorBase_V1):
    # request_id -> prompt tokens it finds remotely (set by the driver before the
    # request is added); a request not named here finds nothing
    plan: dict[str, int]
    # request_id -> loads started for it and not yet reported finished
    loading: dict[str, int]

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self.plan = {}
        self.loading = {}
        self.num_loads = 0

    # ------------------------------------------------------------ scheduler side

    def get_num_new_matched_tokens(self, request: Any,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        planned = self.plan.get(request.request_id, 0)
        # Never the whole prompt: vLLM computes at least the last token itself.
        tokens = min(planned, request.num_tokens - 1) - num_computed_tokens
        if tokens <= 0:
            return 0, False
        return tokens, True

    def update_state_after_alloc(self, request: Any, blocks: Any,
                                 num_external_tokens: int) -> None:
        if num_external_tokens > 0:
            rid = request.request_id
            self.loading[rid] = self.loading.get(rid, 0) + 1
            self.num_loads += 1
            # One load per request: after it lands the request computes the rest.
            self.plan.pop(rid, None)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        return KVConnectorMetadata()

    # --------------------------------------------------------------- worker side
    # (not used: the driver plays the worker and reports loads finished)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        pass

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any,
                      **kwargs: Any) -> None:
        pass

    def wait_for_save(self) -> None:
        pass

# SPDX-License-Identifier: Apache-2.0
"""Plugin settings, read from vLLM's ``--additional-config '{"asyncbatch": {...}}'``.

Every setting, its default and its meaning is listed in ``configs/settings.md``;
``tests/test_config.py`` keeps that file and this model in step.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

CONFIG_KEY = "asyncbatch"


class InvalidSettings(ValueError):
    pass


class AsyncBatchConfig(BaseModel):
    """Validated plugin settings.  Unknown keys and wrong types are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    policy: Literal["prefix", "fcfs"] = Field(
        default="prefix",
        description=(
            '"prefix": group waiting requests that share a prompt prefix and admit each group '
            'together, decode-heavy groups first, gated by a KV-memory forecast. "fcfs": '
            "vLLM's own order (first come first served, or by priority under "
            "--scheduling-policy priority), nothing else changed."
        ),
    )
    grouping: bool = Field(
        default=True,
        description=(
            'With policy "prefix": false makes each request its own group; decode_first, '
            "the memory forecast and the wait bound still apply."
        ),
    )
    min_shared_blocks: int = Field(
        default=1,
        ge=1,
        description=(
            "Leading full KV blocks (of --block-size tokens) two prompts must share to be "
            "grouped."
        ),
    )
    decode_first: bool = Field(
        default=True,
        description=(
            "Admit groups with more decode tokens per prompt token to compute first "
            "(in factor-of-sqrt(2) buckets; arrival order within a bucket)."
        ),
    )
    max_wait_steps: int = Field(
        default=512,
        ge=0,
        description=(
            "Wait bound: no request is passed over (a later arrival admitted before it) in "
            "more than this many scheduler steps; then the oldest waiting request goes "
            "first. 0 = arrival order."
        ),
    )
    max_wait_s: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Wait bound in seconds since arrival, on top of max_wait_steps; null = none."
        ),
    )
    memory_gate: bool = Field(
        default=True,
        description=(
            "Admit a request only if the KV blocks it and the running requests are forecast "
            "to need (prompt + expected output) fit, so admissions do not cause preemptions."
        ),
    )
    kv_headroom: float = Field(
        default=-0.3,
        ge=-1.0,
        le=0.5,
        description=(
            "Share of the KV cache the memory forecast keeps free. Negative values let the "
            "forecast overcommit (vLLM preempts if it comes true): a strict forecast (0) "
            "avoids preemptions but admits fewer requests than vLLM does, which cost 10% "
            "on a random workload in the CPU replay; -0.3 matched vLLM's preemption count."
        ),
    )
    forecast_horizon: int = Field(
        default=1024,
        ge=16,
        description=(
            "Tokens of future growth per request the memory forecast looks ahead; requests "
            "with a larger max_tokens (an unset max_tokens is the context length) count "
            "only this much, so they do not hold back admissions for their whole life."
        ),
    )
    release_done_prefixes: bool = Field(
        default=False,
        description=(
            "When the last request using a shared prefix finishes and no waiting request "
            "needs it, put its cached blocks first in line for eviction (vLLM's LRU keeps "
            "them longest). Off by default: no effect in the CPU replay, and it evicts "
            "prefixes that requests arriving later could have reused."
        ),
    )

    decode_fast_path: bool = Field(
        default=True,
        description=(
            "Answer vLLM's per-request KV cache calls of steady decode (allocate_slots "
            "when no new block is needed and no block filled, cache_blocks when no block "
            "is left to cache) without walking the KV cache manager; the answers are the "
            "ones vLLM's own path gives. Only with one KV cache group of full attention "
            "and no KV connector; elsewhere vLLM's path runs, and on a vLLM with "
            "patches/0006 vLLM answers these calls itself. H100, Llama-1B shape, 1000 "
            "requests in decode, with the worker: 1.13x with it against without it (see "
            "benchmarks/results/worker/)."
        ),
    )

    decode_fast_output: bool = Field(
        default=True,
        description=(
            "Take the requests whose step was plain decode (one token that stops nothing, "
            "no logprobs, no grammar, no encoder inputs) out of vLLM's general per-request "
            "loop in update_from_output, and make for them the same changes and the same "
            "outputs; every other request goes through vLLM's loop. Not with speculative "
            "decoding, a KV connector, KV cache events, routed experts or per-step "
            "performance metrics; there vLLM's loop runs for every request. On a vLLM with "
            "patches/0007 vLLM's loop does the same itself. CPU, 865 "
            "requests in decode: update_from_output 2.4-2.7 ms against 4.9-5.9 ms without "
            "it. H100, Llama-1B shape, 1000 requests in decode, with the worker: 1.11x "
            "with it against without it (see benchmarks/results/worker/)."
        ),
    )

    pipeline_depth: int | None = Field(
        default=None,
        ge=2,
        le=4,
        description=(
            "Batches in flight between the scheduler and the GPU. vLLM's async scheduling "
            "keeps 2; 3 lets the worker prepare a step while the two before it are queued "
            "on the GPU, to hide host latency for small models (H100, Llama-1B shape: the "
            "scheduler and worker with 3 in flight, the worker's CUDA graphs and the decode "
            "fast path and fast output gave 1.41x over stock async, 1.38x over stock async "
            "given the same graphs; before the fast path, 3 in flight added 1.02x, within "
            "noise; 4 was no better than 3). "
            "Unset (null): 3 where "
            "it is supported (--worker-cls asyncbatch.Worker, which sizes the worker's input "
            "buffers to the depth; the V2 model runner; no pipeline parallelism; no "
            "speculative decoding; no sliding-window or chunked-local attention), else 2. "
            "A value above 2 where it is not supported is an error. A request may compute "
            "one token past its end, which is discarded; a request under a grammar "
            "(structured outputs) keeps the cadence of 2; a preempted request resumes "
            "only once the steps in flight that sample for it have returned (vLLM 0.33 "
            "does this itself; on 0.26 the scheduler does)."
        ),
    )

    cuda_graph_max_tokens: int | None = Field(
        default=None,
        ge=0,
        description=(
            "With --worker-cls asyncbatch.Worker: the largest batch, in tokens, that runs "
            "as a CUDA graph. Unset (null): vLLM's default ceiling (at most 512) is raised "
            "to the largest decode batch (max_num_seqs x tokens per decode step, at most "
            "max_num_batched_tokens), so a decode step of more than 512 running requests "
            "does not fall back to launching the model piecewise from Python (H100, "
            "Llama-1B shape, 1000 running: 0.95x to 1.20x over four A/B files, 1.09x geometric "
            "mean, for stock vLLM given the same graphs); a "
            "ceiling set with --max-cudagraph-capture-size that differs from vLLM's default "
            "is kept. 0: vLLM's ceiling. N: graphs up to N tokens (rounded up to a multiple "
            "of 16)."
        ),
    )

    dp_routing: Literal["auto", "prefix", "off"] = Field(
        default="auto",
        description=(
            "With vllm serve --data-parallel-size N > 1 (vLLM's internal load balancing): "
            "which engine a request that names none (no X-data-parallel-rank) goes to. "
            '"prefix": by its prefix key (dp_prefix_tokens), rendezvous-hashed over the '
            "engines, the first engine in that order whose load stays within dp_load_bound "
            "of the mean, so requests sharing a prefix meet on one engine and a hot prefix "
            "spills to its second choice. The engine order is a pure function of the key, "
            "so several API servers agree on it without talking. "
            '"auto": "prefix" when the engines run asyncbatch.Scheduler, else vLLM\'s '
            'balancing. "off": vLLM\'s balancing, by load alone. See '
            "docs/scale-out.md."
        ),
    )
    dp_prefix_tokens: int = Field(
        default=64,
        ge=1,
        description=(
            "Leading prompt tokens the data-parallel routing key covers, in whole KV blocks "
            "(rounded down, at least one block); a shorter prompt is keyed on its whole "
            "blocks, and one shorter than a block is balanced by load. The key also covers "
            "cache_salt, the LoRA adapter and multimodal items in those tokens. 64 (4 "
            "blocks of 16) passes the chat-template header of common models."
        ),
    )
    dp_load_bound: float = Field(
        default=0.1,
        ge=0.0,
        description=(
            "eps of the data-parallel routing's load bound: an engine takes a request only "
            "if its load (requests waiting and running there, as the DP coordinator reports "
            "them) stays within ceil((1 + eps) x the mean load); else the key's next engine "
            "is tried. With 2 engines, 0.1 keeps the busier within about 1.22x the other."
        ),
    )
    dp_load_slack: float = Field(
        default=8.0,
        ge=0.0,
        description=(
            "Requests an engine may always hold above the mean load, whatever "
            "dp_load_bound allows: at low load ((1 + eps) x the mean is the mean plus a "
            "request or two) the bound alone would split prefix groups over differences "
            "that cost nothing. Split evenly over the API servers, as vLLM's load view is. "
            "0: the relative bound alone."
        ),
    )
    dp_key_share: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description=(
            "Most of an engine's load cap (dp_load_bound, dp_load_slack) that the requests "
            "of one prefix key may hold, and always dp_load_slack requests; past it the "
            "key's next engine takes them. A hot prefix is spread over the engines before it "
            "fills its first one and turns that engine's other prefix groups away, which "
            "would leave the engines holding equal numbers of requests but unequal work. "
            "Each API server counts its own requests. 1: no limit."
        ),
    )
    dp_new_key_slack: float | None = Field(
        default=4.0,
        ge=0.0,
        description=(
            "Requests above the mean load an engine may hold when it takes a request whose "
            "prefix key has no request in flight (counted per API server): such a request "
            "has no group to join yet, so it is balanced almost as vLLM balances, where "
            "dp_load_bound would let prompts that share nothing drift apart. Split evenly "
            "over the API servers. null: the same bound as every request."
        ),
    )

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> AsyncBatchConfig:
        """Build the settings from ``VllmConfig.additional_config``.

        Raises:
            InvalidSettings: with a message that names the offending key and the
                allowed values.
        """
        if not isinstance(additional_config, Mapping):
            return cls()
        raw = additional_config.get(CONFIG_KEY)
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise InvalidSettings(
                f'--additional-config: "{CONFIG_KEY}" must be a JSON object of settings, '
                f"got {type(raw).__name__} {raw!r}. Allowed keys: {_allowed_keys()}."
            )
        try:
            return cls.model_validate(dict(raw))
        except ValidationError as e:
            raise InvalidSettings(_explain(e)) from None


# The last settings parsed and the raw value they came from: the scheduler, the depth
# property and the worker all ask for the settings of the one configuration of their
# process, so each process validates them once.
_parsed: tuple[str, AsyncBatchConfig] | None = None


def settings_of(additional_config: Any) -> AsyncBatchConfig:
    """`AsyncBatchConfig.from_additional_config`, validated once per distinct value
    (cheap to call again: the raw settings are compared as JSON, which tells
    ``true`` from ``1`` and ``2.0`` from ``2`` as the strict model does).

    Raises:
        InvalidSettings: as `AsyncBatchConfig.from_additional_config` (never cached).
    """
    global _parsed
    raw = additional_config.get(CONFIG_KEY) if isinstance(additional_config, Mapping) else None
    try:
        text: str | None = json.dumps(raw, sort_keys=True)
    except (TypeError, ValueError):
        text = None  # not JSON: validate every time (and let the model say what is wrong)
    last = _parsed
    if text is not None and last is not None and last[0] == text:
        return last[1]
    settings = AsyncBatchConfig.from_additional_config(additional_config)
    if text is not None:
        _parsed = (text, settings)
    return settings


def _allowed_keys() -> str:
    return ", ".join(AsyncBatchConfig.model_fields)


def _allowed_values(key: str) -> str:
    properties = AsyncBatchConfig.model_json_schema()["properties"]
    if key not in properties:
        return "a known setting"
    schema = properties[key]
    if "anyOf" in schema:
        return " or ".join(_describe(option) for option in schema["anyOf"])
    return _describe(schema)


def _describe(schema: dict[str, Any]) -> str:
    if "enum" in schema:
        return "one of " + ", ".join(json.dumps(v) for v in schema["enum"])
    if "const" in schema:
        return json.dumps(schema["const"])
    bounds = []
    for word, op in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="),
                     ("exclusiveMaximum", "<")):
        if word in schema:
            bounds.append(f"{op} {schema[word]}")
    kind = {"null": "null", "integer": "an integer", "number": "a number",
            "boolean": "true or false", "string": "a string"}.get(schema.get("type", ""), "a value")
    return kind + (f" {' and '.join(bounds)}" if bounds else "")


def _explain(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<settings>"
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown setting {key!r}; allowed settings: {_allowed_keys()}")
        else:
            got = json.dumps(item.get("input"), default=repr)
            lines.append(f"setting {key!r} = {got} is invalid: expected {_allowed_values(key)}")
    return (
        f'invalid --additional-config \'{{"{CONFIG_KEY}": ...}}\': ' + "; ".join(lines)
    )

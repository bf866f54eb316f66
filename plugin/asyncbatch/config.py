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

    policy: Literal["fcfs"] = Field(
        default="fcfs",
        description=(
            "Waiting-queue policy. 'fcfs': vLLM's own order (first come first served, or "
            "by priority under --scheduling-policy priority)."
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


def _allowed_keys() -> str:
    return ", ".join(AsyncBatchConfig.model_fields)


def _allowed_values(key: str) -> str:
    field = AsyncBatchConfig.model_fields.get(key)
    if field is None:
        return ""
    schema = AsyncBatchConfig.model_json_schema()["properties"][key]
    if "enum" in schema:
        return "one of " + ", ".join(json.dumps(v) for v in schema["enum"])
    if "const" in schema:
        return json.dumps(schema["const"])
    bounds = []
    for word, op in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="),
                     ("exclusiveMaximum", "<")):
        if word in schema:
            bounds.append(f"{op} {schema[word]}")
    kind = schema.get("type", "value")
    return f"{kind}" + (f" {' and '.join(bounds)}" if bounds else "")


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

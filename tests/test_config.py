# SPDX-License-Identifier: Apache-2.0
"""Settings validation and the settings reference in configs/."""

import json
import re
from pathlib import Path

import pytest

from asyncbatch.config import AsyncBatchConfig, InvalidSettings

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_when_absent():
    assert AsyncBatchConfig.from_additional_config({}) == AsyncBatchConfig()
    assert AsyncBatchConfig.from_additional_config(None) == AsyncBatchConfig()
    assert AsyncBatchConfig.from_additional_config({"other_plugin": {"x": 1}}).policy == "prefix"


def test_unknown_key_names_key_and_allowed():
    with pytest.raises(InvalidSettings) as e:
        AsyncBatchConfig.from_additional_config({"asyncbatch": {"polcy": "fcfs"}})
    msg = str(e.value)
    assert "'polcy'" in msg and "policy" in msg


def test_wrong_value_names_allowed_values():
    with pytest.raises(InvalidSettings) as e:
        AsyncBatchConfig.from_additional_config({"asyncbatch": {"policy": "random"}})
    assert "'policy'" in str(e.value) and '"fcfs"' in str(e.value)


def test_not_an_object():
    with pytest.raises(InvalidSettings, match="JSON object"):
        AsyncBatchConfig.from_additional_config({"asyncbatch": "fcfs"})


def test_every_setting_is_documented_with_its_default():
    doc = (ROOT / "configs" / "settings.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", doc, flags=re.M))
    fields = AsyncBatchConfig.model_fields
    assert set(rows) == set(fields)
    for name, field in fields.items():
        assert json.loads(rows[name]) == field.default, name


def test_example_config_is_valid():
    example = json.loads((ROOT / "configs" / "example.json").read_text())
    AsyncBatchConfig.from_additional_config(example)

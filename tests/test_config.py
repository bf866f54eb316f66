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


def test_settings_are_validated_once_per_value(monkeypatch):
    from asyncbatch import config

    calls = []
    parse = AsyncBatchConfig.from_additional_config.__func__
    monkeypatch.setattr(AsyncBatchConfig, "from_additional_config",
                        classmethod(lambda cls, raw: calls.append(raw) or parse(cls, raw)))
    monkeypatch.setattr(config, "_parsed", None)
    raw = {"asyncbatch": {"policy": "fcfs", "max_wait_steps": 7}}
    first = config.settings_of(raw)
    assert config.settings_of(raw) is first and config.settings_of(dict(raw)) is first
    assert len(calls) == 1
    raw["asyncbatch"]["max_wait_steps"] = 8  # changed in place: parsed again
    assert config.settings_of(raw).max_wait_steps == 8 and len(calls) == 2
    with pytest.raises(config.InvalidSettings):
        config.settings_of({"asyncbatch": {"policy": "random"}})
    with pytest.raises(config.InvalidSettings):  # an error is never cached
        config.settings_of({"asyncbatch": {"policy": "random"}})
    assert config.settings_of(None) == AsyncBatchConfig()
    # a value equal under == but not under the strict model is validated again
    assert config.settings_of({"asyncbatch": {"min_shared_blocks": 1}}).min_shared_blocks == 1
    with pytest.raises(config.InvalidSettings):
        config.settings_of({"asyncbatch": {"min_shared_blocks": True}})


def test_a_subclass_of_the_worker_is_recognised_by_name():
    from asyncbatch.glue.pipeline import uses_asyncbatch_worker

    Worker = type("Worker", (), {"__module__": "asyncbatch.worker"})
    Mine = type("Mine", (Worker,), {"__module__": "mine"})
    assert uses_asyncbatch_worker("asyncbatch.Worker")
    assert uses_asyncbatch_worker(Worker) and uses_asyncbatch_worker(Mine)
    assert not uses_asyncbatch_worker(type("Other", (), {}))
    assert not uses_asyncbatch_worker("vllm.v1.worker.gpu_worker.Worker")

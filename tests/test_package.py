# SPDX-License-Identifier: Apache-2.0
"""Plugin entry point and version check (no vLLM import needed)."""

import pytest

import asyncbatch
from asyncbatch import _compat


@pytest.mark.parametrize("version", ["0.26.0", "0.26.1", "0.26.0+cu130", "0.26.2.dev3",
                                     "0.29.0", "0.33.0", "0.33.1rc1"])
def test_supported_versions(version):
    assert _compat.check_vllm_version(version) == version


@pytest.mark.parametrize("version", ["0.25.1", "0.34.0", "1.26.0", "0.2.6", "main"])
def test_unsupported_version_names_both(version):
    with pytest.raises(_compat.UnsupportedVllmVersion) as e:
        _compat.check_vllm_version(version)
    msg = str(e.value)
    assert version in msg and "0.26 to 0.33" in msg and asyncbatch.__version__ in msg


def test_supported_range_matches_pyproject():
    import pathlib

    import tomllib

    pyproject = pathlib.Path(__file__).parents[1] / "pyproject.toml"
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    assert f"vllm{_compat.SUPPORTED_RANGE}" in deps


@pytest.mark.parametrize("version, verified", [("0.26.0", True), ("0.33.0+cu130", True),
                                               ("0.29.0", False), ("0.33.1", False)])
def test_verified_releases(version, verified):
    assert _compat.is_verified_release(version) is verified


def test_missing_vllm(monkeypatch):
    monkeypatch.setattr(_compat, "installed_vllm_version", lambda: None)
    with pytest.raises(_compat.UnsupportedVllmVersion, match="not installed"):
        _compat.check_vllm_version()


def test_register_checks_once(monkeypatch):
    calls = []
    monkeypatch.setattr(asyncbatch, "_registered", False)
    monkeypatch.setattr(_compat, "check_vllm_version", lambda: calls.append(1) or "0.26.0")
    asyncbatch.register()
    asyncbatch.register()
    assert calls == [1]


def test_register_refuses_wrong_vllm(monkeypatch):
    monkeypatch.setattr(asyncbatch, "_registered", False)
    monkeypatch.setattr(_compat, "installed_vllm_version", lambda: "0.34.0")
    with pytest.raises(_compat.UnsupportedVllmVersion, match="0.34.0"):
        asyncbatch.register()
    assert asyncbatch._registered is False


def test_unknown_attribute():
    with pytest.raises(AttributeError, match="Schedulr"):
        asyncbatch.Schedulr  # noqa: B018


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "asyncbatch"]
    assert len(eps) == 1 and eps[0].value == "asyncbatch:register"


def test_one_version_in_pyproject_package_and_result_stamps():
    import re
    from pathlib import Path

    from asyncbatch.bench.report import environment_stamp

    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    declared = re.search(r'^version = "([^"]+)"', pyproject, re.MULTILINE)
    assert declared and asyncbatch.__version__ == declared.group(1)
    # result files name the version that ran, also from a checkout on PYTHONPATH
    stamp = environment_stamp("m", "llama-1b", gpu="none", argv=["replay"])
    assert stamp["asyncbatch_version"] == asyncbatch.__version__

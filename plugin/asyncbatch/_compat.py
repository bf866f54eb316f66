# SPDX-License-Identifier: Apache-2.0
"""The one place that knows which vLLM release asyncbatch is written against."""

from __future__ import annotations

from importlib import metadata

# vLLM's scheduler interface is not stable across releases: the plugin overrides
# hooks of vllm.v1.core.sched.scheduler.Scheduler whose names and contracts
# change between minor versions.
SUPPORTED_VLLM = "0.26"


class UnsupportedVllmVersion(RuntimeError):
    pass


def installed_vllm_version() -> str | None:
    try:
        return metadata.version("vllm")
    except metadata.PackageNotFoundError:
        return None


def check_vllm_version(version: str | None = None) -> str:
    """Raise `UnsupportedVllmVersion` unless vLLM ``0.26.x`` is installed.

    Args:
        version: the version to check; the installed distribution's by default.

    Returns:
        The checked version string.
    """
    if version is None:
        version = installed_vllm_version()
    if version is None:
        raise UnsupportedVllmVersion(
            f"asyncbatch needs vLLM {SUPPORTED_VLLM}.x, but vLLM is not installed. "
            f"Install it with: pip install 'vllm=={SUPPORTED_VLLM}.0'"
        )
    release = version.split("+", 1)[0]
    major_minor = ".".join(release.split(".")[:2])
    if major_minor != SUPPORTED_VLLM:
        raise UnsupportedVllmVersion(
            f"asyncbatch {_own_version()} supports vLLM {SUPPORTED_VLLM}.x only, but vLLM "
            f"{version} is installed. Install vllm=={SUPPORTED_VLLM}.0, or uninstall "
            "asyncbatch (or set VLLM_PLUGINS to exclude it) to run this vLLM without it."
        )
    return version


def _own_version() -> str:
    from asyncbatch import __version__

    return __version__

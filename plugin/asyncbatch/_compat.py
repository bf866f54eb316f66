# SPDX-License-Identifier: Apache-2.0
"""The compat room: which vLLM releases asyncbatch supports, and every difference
between them that the glue depends on.

Nothing outside this module compares version numbers.  The glue and the
simulator ask this module (`parked_queues`, `is_parked`,
`prefix_cache_counts_every_lookup`) and each answer is decided here, by the
feature the installed vLLM has.  Overrides of
vLLM internals are listed, with the releases each was verified on, in
`asyncbatch.glue.overrides`.

Importing this module imports neither torch nor vLLM.
"""

from __future__ import annotations

import re
from importlib import metadata
from typing import Any

# Supported vLLM minor releases, both ends included.  `pyproject.toml` says the same
# (vllm>=0.26,<0.34); a test keeps the two in step.
OLDEST = (0, 26)
NEWEST = (0, 33)
SUPPORTED_RANGE = f">={OLDEST[0]}.{OLDEST[1]},<{NEWEST[0]}.{NEWEST[1] + 1}"
# Releases that CI runs the whole test suite and vLLM's own scheduler tests on, and
# that every override of a vLLM internal was verified against (glue/overrides.py).
VERIFIED_RELEASES = ("0.26.0", "0.33.0")


class UnsupportedVllmVersion(RuntimeError):
    pass


def installed_vllm_version() -> str | None:
    try:
        return metadata.version("vllm")
    except metadata.PackageNotFoundError:
        return None


def release(version: str) -> str:
    """``0.33.0`` of ``0.33.0+cu130``, ``0.33.0rc1`` or ``0.33``; ValueError if
    ``version`` does not start with a release number."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if match is None:
        raise ValueError(f"not a version: {version!r}")
    major, minor_, micro = match.groups()
    return f"{int(major)}.{int(minor_)}.{int(micro or 0)}"


def minor(version: str) -> tuple[int, int]:
    major, minor_, _ = (int(p) for p in release(version).split("."))
    return major, minor_


def check_vllm_version(version: str | None = None) -> str:
    """Raise `UnsupportedVllmVersion` unless the installed vLLM (or ``version``) is
    a supported release (`SUPPORTED_RANGE`).

    Returns:
        The checked version string.
    """
    if version is None:
        version = installed_vllm_version()
    wanted = f"vLLM {OLDEST[0]}.{OLDEST[1]} to {NEWEST[0]}.{NEWEST[1]}"
    if version is None:
        raise UnsupportedVllmVersion(
            f"asyncbatch needs {wanted}, but vLLM is not installed. "
            f"Install it with: pip install 'vllm{SUPPORTED_RANGE}'")
    try:
        supported = OLDEST <= minor(version) <= NEWEST
    except ValueError:
        supported = False
    if not supported:
        raise UnsupportedVllmVersion(
            f"asyncbatch {_own_version()} supports {wanted} (vllm{SUPPORTED_RANGE}), but "
            f"vLLM {version} is installed. Install a supported vLLM, or uninstall asyncbatch "
            "(or set VLLM_PLUGINS to exclude it) to run this vLLM without it.")
    return version


def is_verified_release(version: str | None = None) -> bool:
    """Whether the installed vLLM is one that CI verifies (`VERIFIED_RELEASES`)."""
    version = version if version is not None else installed_vllm_version()
    try:
        return version is not None and release(version) in VERIFIED_RELEASES
    except ValueError:
        return False


def _own_version() -> str:
    from asyncbatch import __version__

    return __version__


# ---------------------------------------------------------------- differences
# Each function below answers one question the glue has, on any supported vLLM.
# They import vLLM lazily: call them only where vLLM is in use.




def parked_queues(scheduler: Any) -> list[Any]:
    """vLLM's own queues beside ``waiting`` that hold waiting requests:
    ``skipped_waiting`` (<= 0.30) or ``kv_holding_waiting`` (>= 0.31)."""
    return [q for q in (getattr(scheduler, "skipped_waiting", None),
                        getattr(scheduler, "kv_holding_waiting", None)) if q is not None]


def is_parked(scheduler: Any, request: Any) -> bool:
    """Whether vLLM holds ``request`` back from admission (grammar compiling,
    remote KV loading, streaming input...): in ``skipped_waiting`` (<= 0.30), or
    marked in ``deferred_waiting`` (>= 0.31)."""
    deferred = getattr(scheduler, "deferred_waiting", None)
    if deferred is not None:
        return request in deferred
    return request in scheduler.skipped_waiting






def output_loop_since_033() -> bool:
    """Whether ``Scheduler.update_from_output``'s per-request loop is laid out as in
    vLLM 0.33 (stale output counted by ``num_stale_output_tokens``, placeholders and
    ``cache_blocks`` resolved in the loop itself, ``check_stop`` testing
    ``min_tokens`` only before the repetition check, an aux output connector) rather
    than as in 0.26 (``async_tokens_to_discard``, placeholders in
    ``AsyncScheduler._update_request_with_output``, ``min_tokens`` first).  The
    decode fast output mirrors one of the two; on the releases between them its
    source hash check keeps it off."""
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    return "_update_request_with_output" not in vars(AsyncScheduler)


def prefix_cache_counts_every_lookup() -> bool:
    """Whether vLLM's prefix-cache counters (``PrefixCacheStats.queries/hits``) count
    every lookup of a waiting request, also the repeated ones while it does not fit
    (<= 0.32), or each request once, when it is admitted (0.33:
    ``KVCacheManager.record_prefix_cache_stats``)."""
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    return not hasattr(KVCacheManager, "record_prefix_cache_stats")

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






def vllm_holds_resumes_in_flight() -> bool:
    """Whether vLLM's own ``schedule()`` keeps a preempted request waiting while an
    output of it is still in flight (0.33: it skips a request whose deliverable
    ``num_stale_output_tokens`` have not returned).  vLLM 0.26 resumes it at once,
    which is safe with two batches in flight only; `asyncbatch.Scheduler` holds it
    back itself where vLLM does not (``Scheduler.schedule``)."""
    import inspect

    from vllm.v1.core.sched.scheduler import Scheduler

    return "num_stale_output_tokens" in inspect.getsource(Scheduler.schedule)


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


# ------------------------------------------------- data-parallel front end
# vLLM's load-balancing client (DPLBAsyncMPClient) keeps one entry per engine in
# ``lb_engines``, refreshed from the DP coordinator every ~100 ms and bumped
# locally for each routed request: [waiting, running] (<= 0.32) or [waiting,
# running, kv_cache_usage] (0.33, which also keeps an exact per-engine count of
# this client's unfinished requests, ``engine_inflight``).


def dp_stock_route(client_cls: Any) -> Any:
    """vLLM's own ``get_core_engine_for_request`` of ``client_cls``
    (``DPLBAsyncMPClient``), also where asyncbatch's hook wraps it."""
    from asyncbatch.dp.frontend import METHOD, ORIGINAL_ATTR

    return client_cls.__dict__.get(ORIGINAL_ATTR) or client_cls.__dict__[METHOD]


def dp_counts_width(client_cls: Any) -> int:
    """Entries per engine in ``lb_engines``: 2 (<= 0.32) or 3 (0.33, with the KV
    cache usage)."""
    import inspect

    return 3 if "kv_cache_usage" in inspect.getsource(dp_stock_route(client_cls)) else 2


def dp_client_count(client: Any) -> int:
    """How many API servers share the engines (vLLM's ``client_count``), at least 1."""
    return max(1, int(getattr(client, "client_count", 1) or 1))


def dp_engine_loads(client: Any) -> list[float]:
    """Each engine's load in requests, engines in rank order, in units of one
    request routed by this client (vLLM adds ``client_count`` to an engine's
    waiting count per routed request, for the other API servers' share).

    - <= 0.32: ``waiting + running`` (vLLM's balancer picks the least ``4 *
      waiting + running``; the bound counts requests, so that a group arriving
      together, which waits a moment, does not count four times);
    - 0.33: vLLM's own score, ``max(client_count * in_flight, waiting +
      running)`` plus ``6 * waiting * max(0, kv_cache_usage - 0.5)``.
    """
    client_count = dp_client_count(client)
    inflight = getattr(client, "engine_inflight", None)
    engines = list(getattr(client, "core_engines", ()))
    loads: list[float] = []
    for idx, entry in enumerate(client.lb_engines):
        waiting, running = float(entry[0]), float(entry[1])
        score = waiting + running
        if len(entry) >= 3 and inflight is not None:
            own = inflight[engines[idx]] if idx < len(engines) else 0
            score = max(client_count * own, score)
            if waiting:
                score += waiting * 6.0 * max(0.0, float(entry[2]) - 0.5)
        loads.append(score / client_count)
    return loads


def dp_count_routed(client: Any, rank: int) -> None:
    """What vLLM's balancer does to its load view after choosing ``rank``: one
    more waiting request per API server (``client_count``), until the next
    coordinator update replaces the counts."""
    counts = client.lb_engines
    if 0 <= rank < len(counts):
        counts[rank][0] += dp_client_count(client)


def scheduler_is_asyncbatch(vllm_config: Any) -> bool:
    """Whether the engines run asyncbatch's scheduler (``--scheduler-cls
    asyncbatch.Scheduler``, its full name, or a subclass of it)."""
    scheduler_cls = getattr(getattr(vllm_config, "scheduler_config", None),
                            "scheduler_cls", None)
    if scheduler_cls is None:
        return False
    if isinstance(scheduler_cls, str):
        if scheduler_cls in ("asyncbatch.Scheduler", "asyncbatch.glue.scheduler.Scheduler"):
            return True
        if scheduler_cls.startswith("vllm."):
            return False
        module_name, _, attr = scheduler_cls.rpartition(".")
        try:
            import importlib

            scheduler_cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError):
            return False
    mro = getattr(scheduler_cls, "__mro__", ())
    return any(getattr(c, "__module__", "").startswith("asyncbatch.") for c in mro)

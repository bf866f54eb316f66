# SPDX-License-Identifier: Apache-2.0
"""asyncbatch: a prefix-grouping asynchronous scheduler for vLLM 0.26.

Importing this package is cheap: it imports neither torch nor vLLM.  The vLLM
classes are resolved lazily, on first attribute access, so that vLLM can name
them by qualified name (``--scheduler-cls asyncbatch.Scheduler``) in the
EngineCore process while the pure-Python policy (``asyncbatch.policy``) can be
imported and tested without vLLM installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Scheduler", "Worker", "__version__", "partition_by_prefix", "register"]

if TYPE_CHECKING:
    from asyncbatch.dp.partition import partition_by_prefix
    from asyncbatch.glue.scheduler import Scheduler
    from asyncbatch.worker import Worker

_registered = False


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group.

    vLLM calls it once per process (front end, EngineCore, workers), and may call
    it again; it checks that the installed vLLM is the one this plugin is
    written against, and installs the data-parallel routing hook
    (`asyncbatch.dp.frontend`), which patches vLLM's load-balancing client when
    its module is imported and decides per client whether to route (setting
    ``dp_routing``).  It does no CUDA work and imports nothing heavy.
    """
    global _registered
    if _registered:
        return
    from asyncbatch._compat import check_vllm_version

    check_vllm_version()
    from asyncbatch.dp.frontend import install

    install()
    _registered = True


def __getattr__(name: str) -> Any:
    if name == "Scheduler":
        from asyncbatch.glue.scheduler import Scheduler

        return Scheduler
    if name == "partition_by_prefix":
        from asyncbatch.dp.partition import partition_by_prefix

        return partition_by_prefix
    if name == "Worker":
        from asyncbatch.worker import Worker

        return Worker
    raise AttributeError(f"module 'asyncbatch' has no attribute {name!r}")

# SPDX-License-Identifier: Apache-2.0
"""Adapter that runs vLLM's own ``tests/v1/core`` against a chosen scheduler.

`conformance/run.py` copies this file to ``tests/conftest.py`` of a tree staged
from vLLM's source distribution, in place of vLLM's root conftest (which serves
the whole vLLM test suite: hub downloads, GPU clean-up, servers).  The test
files themselves are vLLM's, unedited.  ``ASYNCBATCH_CONFORMANCE`` picks the
scheduler that every scheduler the tests build becomes:

- ``stock``: vLLM's ``AsyncScheduler`` (the reference);
- ``fcfs`` / ``prefix``: ``asyncbatch.Scheduler`` with that ``policy`` (and the
  settings in ``ASYNCBATCH_CONFORMANCE_SETTINGS``, a JSON object, if set).

Each is built with async scheduling on (vLLM's CpuPlatform switches it off, and
a test that asks for the synchronous ``Scheduler`` gets the asynchronous one),
so the reference and the plugin run the same protocol.  Outcomes are written to
``ASYNCBATCH_CONFORMANCE_OUT`` as JSON (test id -> passed/failed/skipped).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from types import FunctionType
from typing import Any

import pytest

VARIANT = os.environ.get("ASYNCBATCH_CONFORMANCE", "stock")
if VARIANT not in ("stock", "fcfs", "prefix"):
    raise pytest.UsageError(f"ASYNCBATCH_CONFORMANCE={VARIANT!r}: use stock, fcfs or prefix")

# More asyncbatch settings for the plugin's variants, as a JSON object.
SETTINGS = json.loads(os.environ.get("ASYNCBATCH_CONFORMANCE_SETTINGS") or "{}")

os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
# Every fast answer of asyncbatch's decode fast path is checked against vLLM's path.
os.environ.setdefault("ASYNCBATCH_VERIFY_FAST_PATH", "1")

from asyncbatch.sim.engine import use_cpu_platform  # noqa: E402

use_cpu_platform()

from vllm.v1.core.sched.async_scheduler import AsyncScheduler  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler as VllmScheduler  # noqa: E402


def _scheduler_under_test() -> type:
    if VARIANT == "stock":
        base: type = AsyncScheduler
    else:
        import asyncbatch

        base = asyncbatch.Scheduler

    class ConformanceScheduler(base):  # type: ignore[valid-type,misc]
        def __init__(self, *, vllm_config: Any, **kwargs: Any) -> None:
            global _touched
            _touched = True
            vllm_config.scheduler_config.async_scheduling = True
            if VARIANT != "stock":
                extra = dict(vllm_config.additional_config or {})
                extra["asyncbatch"] = {**extra.get("asyncbatch", {}), **SETTINGS,
                                       "policy": VARIANT}
                vllm_config.additional_config = extra
            super().__init__(vllm_config=vllm_config, **kwargs)

    ConformanceScheduler.__qualname__ = ConformanceScheduler.__name__ = (
        f"{base.__name__}Under{VARIANT.capitalize()}")
    return ConformanceScheduler


SCHEDULER = _scheduler_under_test()

# Whether the running test has called the scheduler under test (any method, on an
# instance built with or without ``__init__``). The stock run records it per test, so
# that the plugin's runs need only the tests that reach a scheduler: the others
# exercise the same vLLM code whichever scheduler is chosen.
_touched = False


def _record_calls(cls: type) -> None:
    seen: set[str] = set(vars(cls))
    for klass in cls.__mro__[1:]:
        if klass is object:
            continue
        for name, value in vars(klass).items():
            if name in seen or not isinstance(value, FunctionType) or name in (
                    "__init_subclass__", "__new__", "__getattribute__", "__getattr__",
                    "__setattr__", "__delattr__", "__repr__"):
                continue
            seen.add(name)
            setattr(cls, name, _recording(value))


def _recording(method: Any) -> Any:
    @functools.wraps(method)
    def recording(*args: Any, **kwargs: Any) -> Any:
        global _touched
        _touched = True
        return method(*args, **kwargs)

    return recording


if VARIANT == "stock":
    _record_calls(SCHEDULER)


_STOCK_CLASSES = (VllmScheduler, AsyncScheduler)


def _switch(module: Any) -> None:
    for name, value in list(vars(module).items()):
        if any(value is cls for cls in _STOCK_CLASSES):
            setattr(module, name, SCHEDULER)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Test modules bind vLLM's classes at import (``from ... import Scheduler``):
    # rebind them in every module of the staged tree once collection imported it.
    for name, module in list(sys.modules.items()):
        if module is not sys.modules[__name__] and (
                name.startswith("tests.") or name.startswith("test_")):
            _switch(module)


def pytest_configure(config: pytest.Config) -> None:
    # vLLM's markers (its pyproject.toml), so that --strict-markers setups accept them.
    for marker in ("slow_test", "skip_global_cleanup", "core_model", "hybrid_model",
                   "cpu_model", "cpu_test", "split", "distributed", "optional"):
        config.addinivalue_line("markers", f"{marker}: vLLM test marker")


# vLLM's root conftest fixtures that tests/v1/core uses (from vLLM 0.33's
# tests/conftest.py, which this adapter replaces).
@pytest.fixture()
def caplog_vllm(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> Any:
    import logging

    logger_config = getattr(__import__("vllm.logger", fromlist=["x"]),
                            "DEFAULT_LOGGING_CONFIG", None)
    if logger_config is not None:
        monkeypatch.setitem(logger_config["loggers"]["vllm"], "propagate", True)
    monkeypatch.setattr(logging.getLogger("vllm"), "propagate", True)
    with caplog.at_level(logging.INFO):
        yield caplog


_outcomes: dict[str, str] = {}
# the tests that called the scheduler under test (recorded in the stock run)
_touched_tests: set[str] = set()
# test ids in the order they ran
_ran: dict[str, None] = {}


def pytest_runtest_logstart(nodeid: str, location: Any) -> None:
    global _touched
    _touched = False


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.nodeid not in _ran:
        _ran[report.nodeid] = None  # run order, which the plugin's runs keep
    if _touched:
        _touched_tests.add(report.nodeid)
    # A test failed if any phase failed; else it took the outcome of its call, or
    # was skipped (in setup or call).
    if report.outcome == "failed":
        _outcomes[report.nodeid] = "failed"
    elif report.when == "call" or report.outcome == "skipped":
        _outcomes.setdefault(report.nodeid, report.outcome)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    # A test module that cannot be imported here (it needs what the staged tree
    # leaves out) counts as one failed test, in every variant alike.
    if report.outcome == "failed":
        _outcomes[report.nodeid] = "failed"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    out = os.environ.get("ASYNCBATCH_CONFORMANCE_OUT")
    if out:
        with open(out, "w") as f:
            json.dump({"variant": VARIANT, "scheduler": SCHEDULER.__name__,
                       "outcomes": dict(sorted(_outcomes.items())),
                       "touched": sorted(_touched_tests) if VARIANT == "stock" else None,
                       "order": list(_ran)},
                      f, indent=1)

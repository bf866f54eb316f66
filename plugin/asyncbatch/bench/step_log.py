# SPDX-License-Identifier: Apache-2.0
"""Stock vLLM schedulers that log every step, for ``asyncbatch-bench calibrate``.

The EngineCore process resolves them by qualified name (``scheduler_cls``) and
appends one JSON line per event to the file named by ``ASYNCBATCH_STEP_LOG``:
``{"s": [prefill tokens, decode seqs, kv tokens, seqs], "t0": .., "t1": ..}``
when a step is scheduled (``t0``/``t1``: entry/exit of ``schedule()``) and
``{"u": t}`` when its output arrives (entry of ``update_from_output``).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from asyncbatch.sim.costmodel import step_features


class _StepLogMixin:
    _step_log_file: Any = None

    def _log(self, record: dict[str, Any]) -> None:
        if self._step_log_file is None:
            path = os.environ.get("ASYNCBATCH_STEP_LOG")
            if not path:
                return
            self._step_log_file = open(path, "a", buffering=1)  # noqa: SIM115
        self._step_log_file.write(json.dumps(record) + "\n")

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = super().schedule(*args, **kwargs)  # type: ignore[misc]
        t1 = time.perf_counter()
        f = step_features(self, out)
        self._log({"s": [f.num_prefill_tokens, f.num_decode_seqs, f.num_kv_tokens, f.num_seqs],
                   "t0": t0, "t1": t1})
        return out

    def update_from_output(self, *args: Any, **kwargs: Any) -> Any:
        self._log({"u": time.perf_counter()})
        return super().update_from_output(*args, **kwargs)  # type: ignore[misc]


class StepLogAsyncScheduler(_StepLogMixin, AsyncScheduler):
    pass


class StepLogSyncScheduler(_StepLogMixin, Scheduler):
    pass

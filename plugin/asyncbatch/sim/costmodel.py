# SPDX-License-Identifier: Apache-2.0
"""Step-time cost model of a GPU model runner, and the two-in-flight timeline.

A step's GPU time is linear in what the scheduler put in it::

    gpu_s = gpu_step_s + prefill_token_s * num_prefill_tokens
            + decode_seq_s * num_decode_seqs + kv_token_s * num_kv_tokens

where ``num_kv_tokens`` is the context length (tokens whose KV the step's
attention reads) summed over the scheduled requests.  ``host_step_s`` is the
CPU time of a step outside the GPU (schedule, input preparation, output
processing).

With async scheduling (two batches in flight, vLLM's ``step_with_batch_queue``)
the host prepares step ``i`` while the GPU runs step ``i - 1``, but it cannot
schedule step ``i`` before the output of step ``i - 2`` is processed::

    host_done[i] = max(host_done[i-1], gpu_end[i-2]) + host_step_s
    gpu_end[i]   = max(gpu_end[i-1], host_done[i]) + gpu_s[i]

With one batch in flight (``async_scheduling=False``) nothing overlaps:
``gpu_end[i] = gpu_end[i-1] + host_step_s + gpu_s[i]``.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

COEFFICIENTS = ("gpu_step_s", "prefill_token_s", "decode_seq_s", "kv_token_s", "host_step_s")


@dataclass(frozen=True)
class StepFeatures:
    num_prefill_tokens: int = 0
    num_decode_seqs: int = 0
    num_kv_tokens: int = 0
    num_seqs: int = 0


@dataclass(frozen=True)
class CostModel:
    gpu_step_s: float
    prefill_token_s: float
    decode_seq_s: float
    kv_token_s: float
    host_step_s: float
    # where the numbers came from (free text, kept in results)
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def gpu_time(self, f: StepFeatures) -> float:
        if f.num_seqs == 0:
            return 0.0
        return (self.gpu_step_s + self.prefill_token_s * f.num_prefill_tokens
                + self.decode_seq_s * f.num_decode_seqs + self.kv_token_s * f.num_kv_tokens)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CostModel:
        missing = [c for c in COEFFICIENTS if c not in data]
        if missing:
            raise ValueError(f"cost model is missing {', '.join(missing)}")
        return cls(**{c: float(data[c]) for c in COEFFICIENTS},
                   source=str(data.get("source", "")), meta=dict(data.get("meta", {})))

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        return cls.from_json(json.loads(Path(path).read_text()))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path


def step_features(scheduler: Any, scheduler_output: Any) -> StepFeatures:
    """Features of a step, read right after ``scheduler.schedule()`` returned it.

    vLLM advances ``request.num_computed_tokens`` when it schedules, so the
    context before the step is ``num_computed_tokens - num_scheduled``.
    """
    prefill = decode = kv = 0
    for req_id, n in scheduler_output.num_scheduled_tokens.items():
        request = scheduler.requests.get(req_id)
        if request is None:
            continue
        after = request.num_computed_tokens
        before = after - n
        p = max(0, min(after, request.num_prompt_tokens) - before)
        prefill += p
        decode += p == 0
        kv += after
    return StepFeatures(prefill, decode, kv, len(scheduler_output.num_scheduled_tokens))


class StepClock:
    """The timeline above, one step at a time: `add` takes the next step's
    features and returns its simulated completion time.  ``not_before`` delays
    the step's host work (an engine that was idle until a request arrived)."""

    def __init__(self, model: CostModel, max_in_flight: int = 2) -> None:
        self.model = model
        self.max_in_flight = max_in_flight
        self.host_done = 0.0
        self.gpu_end = 0.0
        self.busy_s = 0.0  # GPU time of every step added
        # completion times of the last max_in_flight steps: the oldest gates the next
        self._ends: deque[float] = deque(maxlen=max(1, max_in_flight))

    def add(self, f: StepFeatures, not_before: float = 0.0) -> float:
        g = self.model.gpu_time(f)
        self.busy_s += g
        h = self.model.host_step_s
        if self.max_in_flight <= 1:
            self.gpu_end = max(self.gpu_end, not_before) + h + g
        else:
            gate = self._ends[0] if len(self._ends) == self.max_in_flight else 0.0
            self.host_done = max(self.host_done, gate, not_before) + h
            self.gpu_end = max(self.gpu_end, self.host_done) + g
        self._ends.append(self.gpu_end)
        return self.gpu_end


def timeline(model: CostModel, steps: list[StepFeatures], max_in_flight: int = 2) -> list[float]:
    """Simulated completion time (s) of every step, in order."""
    clock = StepClock(model, max_in_flight)
    return [clock.add(f) for f in steps]


def fit(rows: list[tuple[StepFeatures, float]]) -> tuple[list[float], float]:
    """Least-squares fit of ``dt = gpu_step_s + prefill_token_s * p + decode_seq_s * d
    + kv_token_s * k`` with non-negative coefficients.

    Returns:
        ``([gpu_step_s, prefill_token_s, decode_seq_s, kv_token_s], r2)``.
    """
    import numpy as np

    x = np.array([[1.0, f.num_prefill_tokens, f.num_decode_seqs, f.num_kv_tokens]
                  for f, _ in rows])
    y = np.array([dt for _, dt in rows])
    active = list(range(4))
    coef = np.zeros(4)
    # Drop a coefficient that comes out negative and refit (tiny active-set NNLS).
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef[:] = 0
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    pred = x @ coef
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum()) or 1.0
    return coef.tolist(), 1.0 - ss_res / ss_tot

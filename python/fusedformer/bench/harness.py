"""Timing: warm up, then run until a time budget is spent; report the median with min and max."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    runs: int

    def to_dict(self) -> dict:
        return asdict(self)


def measure(
    fn: Callable[[], object],
    *,
    warmup: int = 2,
    min_runs: int = 5,
    max_runs: int = 200,
    budget_s: float = 2.0,
    sync: Callable[[object], object] | None = None,
) -> Timing:
    """Times ``fn()``: ``warmup`` untimed calls, then at least ``min_runs`` and at most
    ``max_runs`` timed calls, stopping once ``budget_s`` seconds of timed calls have passed.

    ``sync(result)`` forces fn's result before the clock stops (``mx.eval`` for lazy MLX
    arrays).
    """
    if min_runs < 1 or max_runs < min_runs:
        raise ValueError(f"[bench] need 1 <= min_runs <= max_runs, got {min_runs}, {max_runs}")

    def call():
        out = fn()
        if sync is not None:
            sync(out)
        return out

    for _ in range(warmup):
        call()
    samples = []
    spent = 0.0
    while len(samples) < max_runs and (len(samples) < min_runs or spent < budget_s):
        t0 = time.perf_counter()
        call()
        dt = time.perf_counter() - t0
        samples.append(dt)
        spent += dt
    ms = [s * 1e3 for s in samples]
    return Timing(statistics.median(ms), min(ms), max(ms), len(ms))

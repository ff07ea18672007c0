"""The step-timing loop every benchmark uses (gpu_check, step_time)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class StepTime:
    """Mean time of one step: wall seconds, and the process's CPU seconds (all its threads;
    barely moved by other processes sharing the cores, unlike wall time)."""

    wall_s: float
    cpu_s: float


def time_steps(
    step: Callable[[], object], steps: int, warmup: int = 0, sync: Callable[[], None] | None = None
) -> StepTime:
    """Run `warmup` untimed calls of `step`, then time `steps` calls. `sync` (a device
    synchronize) runs only at the boundaries: work queued on a GPU is counted at the end without
    a sync inside the loop, which would itself slow the steps down."""
    if steps < 1:
        raise ValueError(f"steps={steps} is not valid; time at least 1 step")
    for _ in range(warmup):
        step()
    if sync is not None:
        sync()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    if sync is not None:
        sync()
    return StepTime((time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps)

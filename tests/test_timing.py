"""benchmarks.timing.time_steps: the step-timing loop of gpu_check and step_time."""

from __future__ import annotations

import time

import pytest

from benchmarks.timing import time_steps


def test_warmup_is_untimed_and_sync_runs_only_at_the_boundaries() -> None:
    calls: list[int] = []  # how many syncs had run at each call
    syncs: list[int] = []  # how many calls had run at each sync
    time_steps(lambda: calls.append(len(syncs)), 3, warmup=2, sync=lambda: syncs.append(len(calls)))
    assert calls == [0, 0, 1, 1, 1] and syncs == [2, 5]


def test_wall_and_cpu_time_per_step() -> None:
    t = time_steps(lambda: time.sleep(0.02), 3)
    assert 0.02 <= t.wall_s < 1.0  # per step, not the total
    assert t.cpu_s < t.wall_s  # sleeping costs no CPU


def test_zero_steps_is_refused() -> None:
    with pytest.raises(ValueError, match=r"steps=0 is not valid"):
        time_steps(lambda: None, 0)

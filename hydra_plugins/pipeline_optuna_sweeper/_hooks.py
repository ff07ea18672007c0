"""Calls the sweeper makes to code outside it: before it starts its worker processes (or
submits them as jobs), whether it submitted them, and when it fails a trial whose worker was lost.

The MLflow sweep callback creates the sweep's parent run lazily, when the first job starts (so a
sweep that launches nothing leaves no run); a coordinator launches no job itself, so it asks for
the parent here, before the workers copy its environment (PIPELINE_PARENT_RUN_ID) and join it.
It also ends the child run of a trial failed as stale (its process died elsewhere).
The module name starts with "_" so that Hydra's plugin scan does not execute it a second time
(that would make a second list, and a hook registered in one would not be called from the other).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_BEFORE_WORKERS: list[Callable[[], None]] = []


def before_workers(fn: Callable[[], None]) -> None:
    """Call `fn` before this process starts sweep workers (once per registration)."""
    if fn not in _BEFORE_WORKERS:
        _BEFORE_WORKERS.append(fn)


def starting_workers() -> None:
    for fn in list(_BEFORE_WORKERS):
        fn()


# A trial whose worker was lost (no heartbeat): whoever started something for it ends it (the
# MLflow sweep callback ends the trial's child run KILLED). The trial is FAIL when this runs.
_TRIAL_LOST: list[Callable[[Any], None]] = []


def on_trial_lost(fn: Callable[[Any], None]) -> None:
    """Call `fn(frozen_trial)` for each trial this process fails as stale (once per registration)."""
    if fn not in _TRIAL_LOST:
        _TRIAL_LOST.append(fn)


def trial_lost(trial: Any) -> None:
    for fn in list(_TRIAL_LOST):
        try:
            fn(trial)
        except Exception as e:  # ending a run elsewhere must not stop this worker
            log.warning("after trial %s was lost, %s failed: %s", getattr(trial, "number", "?"), fn, e)


_SUBMITTED: list[bool] = []


def submitted() -> None:
    """Record that this process submitted the sweep's workers as jobs and returns without them:
    the sweep's end (summary, parent run closed) is then for its last worker, not this process."""
    _SUBMITTED.append(True)


def clear_submitted() -> None:
    """At the start of a sweep (several can run in one process, e.g. in tests)."""
    _SUBMITTED.clear()


def jobs_submitted() -> bool:
    return bool(_SUBMITTED)

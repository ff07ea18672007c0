"""Calls the coordinator makes just before it starts its worker processes (or submits them as
jobs), and whether it submitted them.

The MLflow sweep callback creates the sweep's parent run lazily, when the first job starts (so a
sweep that launches nothing leaves no run); a coordinator launches no job itself, so it asks for
the parent here, before the workers copy its environment (PIPELINE_PARENT_RUN_ID) and join it.
The module name starts with "_" so that Hydra's plugin scan does not execute it a second time
(that would make a second list, and a hook registered in one would not be called from the other).
"""

from __future__ import annotations

from collections.abc import Callable

_BEFORE_WORKERS: list[Callable[[], None]] = []


def before_workers(fn: Callable[[], None]) -> None:
    """Call `fn` before this process starts sweep workers (once per registration)."""
    if fn not in _BEFORE_WORKERS:
        _BEFORE_WORKERS.append(fn)


def starting_workers() -> None:
    for fn in list(_BEFORE_WORKERS):
        fn()


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

"""The persistent study: samplers and pruners by name, trial bookkeeping, resume.

A trial's outcome lives in Optuna's state plus two user attributes:
    COMPLETE                         finished with a value
    PRUNED                           stopped early by the pruner
    FAIL + fail_reason               the job raised, or returned no finite number
    FAIL + skipped                   the config was invalid; the job never launched
    FAIL + interrupted               the worker stopped (Ctrl-C, SIGKILL): retried on the next run
A retry is a new WAITING trial with the same params and the system attribute `retry_of`; the
trial it replaces is then `superseded` and left out of the counts.

Exactly once with several workers: a grid is enqueued up front, one WAITING trial per point
(`enqueue_grid`, under the store lock), and workers only claim WAITING trials (`claim`); the
claim is an atomic WAITING -> RUNNING update (storage.py), so no point is handed out twice.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
from collections import Counter
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.pruners import BasePruner
from optuna.samplers import BaseSampler, GridSampler
from optuna.trial import FrozenTrial, Trial, TrialState, create_trial

from . import heartbeat
from .search_space import SearchSpace, SearchSpaceError

log = logging.getLogger(__name__)


def worker() -> str:
    """Names the process that runs a trial, so a later run can tell a dead worker's trial
    (its pid gone on this host) from a live one."""
    return f"{socket.gethostname()}:{os.getpid()}"


OUTCOMES = ("complete", "pruned", "failed", "skipped")

_SAMPLERS = {
    "tpe": "TPESampler",
    "random": "RandomSampler",
    "cmaes": "CmaEsSampler",
    "qmc": "QMCSampler",
    "gp": "GPSampler",
    "nsgaii": "NSGAIISampler",
    "bruteforce": "BruteForceSampler",
}
_PRUNERS = {
    "none": "NopPruner",
    "median": "MedianPruner",
    "hyperband": "HyperbandPruner",
    "percentile": "PercentilePruner",
    "successive_halving": "SuccessiveHalvingPruner",
    "threshold": "ThresholdPruner",
    "patient": "PatientPruner",
    "wilcoxon": "WilcoxonPruner",
}


class ExhaustiveGridSampler(GridSampler):
    """GridSampler that (1) without a seed visits the grid in order: the cartesian product of
    the dimensions sorted by name, each in its declared order (GridSampler always shuffles),
    and (2) does not call `study.stop()` in `after_trial`: that raises outside
    `study.optimize` (we ask and tell); the sweeper checks `is_exhausted` itself."""

    def __init__(self, search_space: dict[str, list[Any]], seed: int | None = None) -> None:
        super().__init__(search_space, seed=seed)
        if seed is None:  # GridSampler keeps its points in _all_grids, indexed by grid_id
            self._all_grids = list(itertools.product(*self._search_space.values()))

    def after_trial(self, study, trial, state, values) -> None:
        pass


def enqueue_grid(study: optuna.Study, sampler: GridSampler, space: SearchSpace, limit: int | None = None) -> int:
    """Add a WAITING trial for every grid point (the first `limit` in the sampler's order) that
    has no trial yet; returns how many were added. Call it under the store lock."""
    seen = {
        t.system_attrs["grid_id"]
        for t in study.get_trials(deepcopy=False)
        if "grid_id" in t.system_attrs and sampler._same_search_space(t.system_attrs.get("search_space", {}))
    }
    distributions = {d.name: d.distribution for d in space.dimensions}
    names = list(sampler._search_space)  # GridSampler orders a point's values by sorted name
    n = len(sampler._all_grids) if limit is None else min(limit, len(sampler._all_grids))
    missing = [i for i in range(n) if i not in seen]
    for grid_id in missing:
        study.add_trial(
            create_trial(
                state=TrialState.WAITING,
                params=dict(zip(names, sampler._all_grids[grid_id])),
                distributions={name: distributions[name] for name in names},
                system_attrs={"grid_id": grid_id, "search_space": sampler._search_space},
            )
        )
    return len(missing)


def claim(study: optuna.Study) -> Trial | None:
    """Take the oldest WAITING trial for this process, or None when there is none left.
    The WAITING -> RUNNING update is atomic in the storage, so a trial goes to one worker."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        try:
            taken = study._storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING)
        except UpdateFinishedTrialError:
            continue
        if taken:
            study._storage.set_trial_system_attr(t._trial_id, "worker", worker())
            return Trial(study, t._trial_id)
    return None


def tell(
    study: optuna.Study, trial: Trial, value: float | None = None, state: TrialState | None = None, **attrs: Any
) -> bool:
    """Set the user attributes `attrs` and tell the result; False (with a warning) when the
    trial is already finished: another worker failed it as stale because its heartbeat came too
    late (heartbeat.py), and the retry queued then is the attempt that counts."""
    try:
        for key, v in attrs.items():
            study._storage.set_trial_user_attr(trial._trial_id, key, v)
        if study._storage.get_trial(trial._trial_id).state.is_finished():
            raise UpdateFinishedTrialError
        study.tell(trial, value, state=state)
    except UpdateFinishedTrialError:
        t = study._storage.get_trial(trial._trial_id)
        log.warning(
            "trial %d was already %s (%s); its result here is dropped and its retry counts",
            t.number,
            t.state.name,
            t.user_attrs.get("fail_reason", "finished by another process"),
        )
        return False
    return True


def make_sampler(name: str, seed: int | None, kwargs: dict[str, Any], space: SearchSpace) -> BaseSampler:
    if name == "auto":
        name = "grid" if space.is_discrete else "tpe"
    if name == "grid":
        return ExhaustiveGridSampler(space.grid(), seed=seed, **kwargs)
    cls = _by_name(optuna.samplers, _SAMPLERS.get(name, name), BaseSampler, "sampler", ["auto", "grid", *_SAMPLERS])
    if seed is not None:
        kwargs = {**kwargs, "seed": seed}
    return cls(**kwargs)


def make_pruner(name: str, kwargs: dict[str, Any]) -> BasePruner:
    cls = _by_name(optuna.pruners, _PRUNERS.get(name, name), BasePruner, "pruner", list(_PRUNERS))
    return cls(**kwargs)


def _by_name(module: Any, name: str, base: type, field: str, short: list[str]) -> Any:
    cls = getattr(module, name, None)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        classes = sorted(
            n
            for n in dir(module)
            if isinstance(getattr(module, n), type) and issubclass(getattr(module, n), base) and n != base.__name__
        )
        raise SearchSpaceError(
            f"hydra.sweeper.{field}={name!r} is not known; valid: {short} or a class of {module.__name__}: {classes}"
        )
    return cls


def outcome(t: FrozenTrial) -> str:
    """complete | pruned | failed | skipped | interrupted | running | waiting."""
    if t.state == TrialState.COMPLETE:
        return "complete"
    if t.state == TrialState.PRUNED:
        return "pruned"
    if t.state == TrialState.FAIL:
        if t.user_attrs.get("skipped"):
            return "skipped"
        return "interrupted" if t.user_attrs.get("interrupted") else "failed"
    return t.state.name.lower()


def latest_attempts(study: optuna.Study) -> list[FrozenTrial]:
    """Trials not replaced by a retry: one per grid point (or per sample)."""
    trials = study.get_trials(deepcopy=False)
    superseded = {t.system_attrs["retry_of"] for t in trials if "retry_of" in t.system_attrs}
    return [t for t in trials if t.number not in superseded]


def counts(study: optuna.Study) -> Counter[str]:
    return Counter(outcome(t) for t in latest_attempts(study))


def worker_dead(worker_id: str) -> bool:
    """True when `worker_id` (host:pid) names a process on this host that is gone; a worker
    on another host cannot be checked and counts as alive."""
    host, _, pid = worker_id.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _is_stale(t: FrozenTrial) -> bool:
    return worker_dead(str(t.system_attrs.get("worker", "")))


def mark(study: optuna.Study, trial_id: int, **attrs: Any) -> None:
    for key, value in attrs.items():
        study._storage.set_trial_user_attr(trial_id, key, value)


def recover(study: optuna.Study, retry_failed: bool) -> None:
    """Fail the RUNNING trials of dead workers, then queue a retry of every interrupted trial
    (and, with retry_failed, of every failed or skipped one) that has none yet."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _is_stale(t):
            log.warning(
                "trial %d was left RUNNING by a dead worker (%s): failing it, will retry",
                t.number,
                t.system_attrs["worker"],
            )
            try:
                mark(study, t._trial_id, interrupted=True, fail_reason="worker died")
                study.tell(t.number, state=TrialState.FAIL)
            except UpdateFinishedTrialError:  # failed as stale by a worker elsewhere meanwhile
                continue
        else:
            log.warning(
                "trial %d is RUNNING in a live or remote worker (%s); leaving it alone",
                t.number,
                t.system_attrs.get("worker", "unknown"),
            )
    retry = {"interrupted", "failed", "skipped"} if retry_failed else {"interrupted"}
    for t in latest_attempts(study):
        if outcome(t) in retry:
            log.info("trial %d (%s) is queued for a retry", t.number, outcome(t))
            system_attrs = {k: v for k, v in t.system_attrs.items() if k not in ("worker", heartbeat.MARK)}
            study.add_trial(
                create_trial(
                    state=TrialState.WAITING,
                    params=t.params,
                    distributions=t.distributions,
                    system_attrs={**system_attrs, "retry_of": t.number},
                )
            )

"""A heartbeat for every running trial, so that a worker that dies on another machine loses its
trial to the others instead of leaving it RUNNING for ever.

Optuna's RDB storage keeps one heartbeat timestamp per trial (the database's own clock) and
lists the RUNNING trials whose heartbeat is older than a grace period
(https://optuna.readthedocs.io/en/stable/reference/generated/optuna.storages.RDBStorage.html).
Optuna beats and checks only inside `study.optimize`; this sweeper asks and tells, so it does
both itself:
- a claimed trial gets its first heartbeat at once, then one every `heartbeat_interval` seconds
  from a thread while it runs (`Beating`);
- before each claim, and while it waits for the last trials of others, a worker fails the
  trials whose heartbeat is older than `grace_period` (`fail_stale`): each is told FAIL as
  interrupted ("worker lost") and queued again as a new WAITING trial with the same params and
  `retry_of`, at most `max_retry` times per point; past that it stays a failed trial.
The storage's FAIL update is atomic, so of two workers that find the same stale trial, one fails
and retries it. Optuna's own `fail_stale_trials` + `RetryFailedTrialCallback` are not used: the
callback runs after the trial is FAIL, when Optuna refuses to set its attributes (the reason),
and the retry would copy the dead attempt's user attributes.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import BaseStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial, TrialState, create_trial

from . import _hooks

log = logging.getLogger(__name__)

MARK = "heartbeat"  # system attr of a trial claimed with the heartbeat on (its worker beats for it)
RETRIES = "stale_retries"  # system attr: how many times this point was retried after a lost worker


@dataclass(frozen=True)
class Settings:
    """`hydra.sweeper.heartbeat_interval`, `grace_period`, `max_retry` (README: Scaling out)."""

    interval: int | None = 10  # seconds between beats; None: no heartbeat
    grace: int | None = 30  # a trial whose last beat is older than this is stale
    max_retry: int = 2  # retries of a point whose worker was lost (0: fail it)

    def __post_init__(self) -> None:
        if self.interval is not None and not _positive_int(self.interval):
            raise ValueError(
                f"hydra.sweeper.heartbeat_interval={self.interval!r} is not valid; use a number of "
                "seconds >= 1, or null to turn the heartbeat off"
            )
        if self.grace is not None and not (_positive_int(self.grace) and self.grace > (self.interval or 0)):
            raise ValueError(
                f"hydra.sweeper.grace_period={self.grace!r} is not valid; use a number of seconds above "
                f"heartbeat_interval ({self.interval}), e.g. 3x it"
            )
        if not (isinstance(self.max_retry, int) and not isinstance(self.max_retry, bool) and self.max_retry >= 0):
            raise ValueError(f"hydra.sweeper.max_retry={self.max_retry!r} is not valid; use an integer >= 0")

    @property
    def on(self) -> bool:
        return self.interval is not None

    @property
    def grace_s(self) -> int:
        assert self.interval is not None
        return self.grace if self.grace is not None else 3 * self.interval

    def storage_kwargs(self) -> dict[str, Any]:
        """RDBStorage arguments: the storage's stale-trial query needs both."""
        if self.interval is None:
            return {}
        return {"heartbeat_interval": self.interval, "grace_period": self.grace_s}


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def enabled(storage: BaseStorage) -> bool:
    """Optuna's own test (optuna.storages._heartbeat.is_heartbeat_enabled); a study's storage is
    Optuna's cache in front of the RDBStorage, and answers for it."""
    return isinstance(storage, BaseHeartbeat) and storage.get_heartbeat_interval() is not None


@contextmanager
def quiet() -> Iterator[None]:
    """Optuna flags its heartbeat as experimental and warns when it is used outside optimize."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        yield


def begin(storage: BaseStorage, trial_id: int) -> None:
    """The first beat of a trial just claimed, then its mark: from here on it can go stale."""
    if enabled(storage):
        storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]
        storage.set_trial_system_attr(trial_id, MARK, True)


class Beating:
    """While the block runs, a daemon thread records a heartbeat for `trial_ids` every interval
    seconds. A failed beat (a database hiccup) is logged and the next one tried."""

    def __init__(self, storage: BaseStorage, trial_ids: list[int]) -> None:
        self.storage, self.trial_ids = storage, trial_ids
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Beating:
        if enabled(self.storage):
            self._thread = threading.Thread(target=self._loop, name="optuna-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        interval = float(self.storage.get_heartbeat_interval())  # type: ignore[attr-defined]
        while not self._stop.wait(interval):
            for trial_id in self.trial_ids:
                try:
                    self.storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]
                except Exception as e:  # the next beat may get through; grace is several beats
                    log.warning("heartbeat of trial id %d not recorded: %s", trial_id, e)


def fail_stale(study: optuna.Study, settings: Settings) -> list[FrozenTrial]:
    """Fail this study's RUNNING trials whose heartbeat is older than the grace period, end their
    runs elsewhere (`_hooks.trial_lost`), and queue each again unless it was retried
    `settings.max_retry` times already. Returns the trials this process failed."""
    storage = study._storage
    if not enabled(storage):
        return []
    lost = []
    # The same query Optuna's fail_stale_trials runs (BaseHeartbeat's stale-trial list).
    for trial_id in storage._get_stale_trial_ids(study._study_id):  # type: ignore[attr-defined]
        t = storage.get_trial(trial_id)
        retries = int(t.system_attrs.get(RETRIES, 0))
        grace, max_retry = settings.grace_s, settings.max_retry
        who = t.system_attrs.get("worker", "unknown")
        again = retries < max_retry
        reason = f"worker lost: {who} sent no heartbeat for {grace} s"
        if not again:
            reason += (
                f"; not retried: the point lost its worker {retries + 1} times (max_retry={max_retry}); "
                "rerun with hydra.sweeper.retry_failed=true to try it again"
            )
        try:  # attributes first: Optuna refuses them once the trial is finished
            storage.set_trial_user_attr(trial_id, "fail_reason", reason)
            if again:
                storage.set_trial_user_attr(trial_id, "interrupted", True)
            if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:  # it finished meanwhile, or another worker failed it
            continue
        t = storage.get_trial(trial_id)
        lost.append(t)
        log.warning("trial %d: %s%s", t.number, reason, "; queued again" if again else "")
        _hooks.trial_lost(t)
        if again:
            keep = {k: v for k, v in t.system_attrs.items() if k not in ("worker", MARK)}
            study.add_trial(
                create_trial(
                    state=TrialState.WAITING,
                    params=t.params,
                    distributions=t.distributions,
                    system_attrs={**keep, "retry_of": t.number, RETRIES: retries + 1},
                )
            )
    return lost


def awaited(study: optuna.Study) -> bool:
    """True while a trial of this study runs with a heartbeat: its worker may still die, and a
    worker with nothing to claim then waits to take over its retry."""
    if not enabled(study._storage):
        return False
    return any(MARK in t.system_attrs for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))

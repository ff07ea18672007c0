"""The per-trial heartbeat on a real SQLite Optuna storage: a trial whose heartbeat is old is
failed as a lost worker's and queued again, at most max_retry times; a beating one is left alone.

The end to end case (PostgreSQL, an `mlflow server`, a worker SIGKILLed mid-trial) is the slow
tests/test_scale_out.py.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.trial import TrialState

from hydra_plugins.pipeline_optuna_sweeper import _hooks, search_space
from hydra_plugins.pipeline_optuna_sweeper import heartbeat as hb
from hydra_plugins.pipeline_optuna_sweeper import study as study_lib
from hydra_plugins.pipeline_optuna_sweeper._errors import SearchSpaceError
from hydra_plugins.pipeline_optuna_sweeper.storage import open_storage
from hydra_plugins.pipeline_optuna_sweeper.sweeper import OptunaSweeper
from pipeline import errors  # noqa: F401  (open_storage's import, paid at collection like the rest of the suite)


def _study(db: Path, settings: hb.Settings, points: int) -> optuna.Study:
    """A grid study of `points` WAITING trials on a heartbeat-enabled SQLite storage."""
    space = search_space.parse([f"a=range(0,{points})"], OverridesParser.create())
    sampler = study_lib.make_sampler("grid", None, {}, space)
    storage = open_storage(f"sqlite:///{db}", settings.storage_kwargs())
    study = optuna.create_study(storage=storage, study_name="hb", sampler=sampler)
    study_lib.enqueue_grid(study, sampler, space)
    return study


def _age(db: Path, trial_id: int, seconds: int) -> None:
    """Move a trial's last heartbeat into the past, as if its worker had stopped then."""
    with sqlite3.connect(db) as con:
        con.execute(
            "UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, ?) WHERE trial_id = ?",
            (f"-{seconds} seconds", trial_id),
        )


def _claim(study: optuna.Study) -> optuna.Trial:
    trial = study_lib.claim(study)
    assert trial is not None
    hb.begin(study._storage, trial._trial_id)
    return trial


def test_a_stale_trial_is_failed_and_queued_again_at_most_max_retry_times(tmp_path, monkeypatch):
    lost: list[optuna.trial.FrozenTrial] = []
    monkeypatch.setattr(_hooks, "_TRIAL_LOST", [])
    _hooks.on_trial_lost(lost.append)
    db = tmp_path / "o.db"
    settings = hb.Settings(interval=1, grace=5, max_retry=2)
    study = _study(db, settings, points=2)
    live = _claim(study)  # point a=0: its worker keeps beating
    victim = _claim(study)  # point a=1: its worker dies, three times
    victim.set_user_attr("mlflow_run_id", "run-of-attempt-0")
    assert hb.fail_stale(study, settings) == []  # fresh heartbeats: nothing is stale
    assert hb.awaited(study)  # RUNNING with a heartbeat: an idle worker waits for these

    for attempt in range(3):
        _age(db, victim._trial_id, 60)
        failed = hb.fail_stale(study, settings)
        assert [t.number for t in failed] == [victim.number]
        assert hb.fail_stale(study, settings) == []  # failed once, not again
        t = study._storage.get_trial(victim._trial_id)
        assert t.state == TrialState.FAIL and "sent no heartbeat for 5 s" in t.user_attrs["fail_reason"]
        waiting = study.get_trials(states=(TrialState.WAITING,))
        if attempt < 2:  # queued again: same point, linked to the attempt it replaces
            assert study_lib.outcome(t) == "interrupted"
            (retry,) = waiting
            assert retry.params == {"a": 1} and retry.system_attrs["grid_id"] == 1
            assert retry.system_attrs["retry_of"] == victim.number
            assert retry.system_attrs[hb.RETRIES] == attempt + 1
            assert hb.MARK not in retry.system_attrs and not retry.user_attrs
            victim = _claim(study)
            assert victim.number == retry.number
        else:  # max_retry reached: a failed trial, nothing queued
            assert study_lib.outcome(t) == "failed" and "max_retry=2" in t.user_attrs["fail_reason"]
            assert waiting == []

    # The live trial was never touched; the point a=1 counts once, as failed.
    assert study._storage.get_trial(live._trial_id).state == TrialState.RUNNING
    assert study_lib.counts(study) == {"running": 1, "failed": 1}
    assert len(study.trials) == 4  # 2 points + 2 retries
    # Whoever started something for a lost trial heard of each loss once, with its attributes.
    assert [t.number for t in lost] == [1, 2, 3]
    assert lost[0].user_attrs["mlflow_run_id"] == "run-of-attempt-0"
    assert all(t.state == TrialState.FAIL for t in lost)
    study.tell(live, 1.0)
    assert not hb.awaited(study)


def test_the_heartbeat_thread_keeps_a_running_trial_fresh_and_stops_with_it(tmp_path):
    db = tmp_path / "o.db"
    settings = hb.Settings(interval=1, grace=3)
    study = _study(db, settings, points=1)
    trial = _claim(study)
    with hb.Beating(study._storage, [trial._trial_id]):
        time.sleep(4.5)  # past the grace period: only the thread's beats keep it fresh
        assert hb.fail_stale(study, settings) == []

    def last_beat() -> str:
        with sqlite3.connect(db) as con:
            return con.execute(
                "SELECT heartbeat FROM trial_heartbeats WHERE trial_id = ?", (trial._trial_id,)
            ).fetchone()[0]

    before = last_beat()
    time.sleep(1.5)
    assert last_beat() == before  # the thread ended with the block


def test_a_trial_told_after_it_was_failed_as_stale_is_dropped_not_raised(tmp_path):
    db = tmp_path / "o.db"
    settings = hb.Settings(interval=1, grace=5, max_retry=1)
    study = _study(db, settings, points=1)
    trial = _claim(study)
    _age(db, trial._trial_id, 60)
    hb.fail_stale(study, settings)  # its worker was only late: the others gave it up
    assert study_lib.tell(study, trial, 0.5) is False
    assert study._storage.get_trial(trial._trial_id).state == TrialState.FAIL
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 1  # the retry is what counts


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"heartbeat_interval": 0}, "heartbeat_interval=0"),
        ({"heartbeat_interval": 10, "grace_period": 10}, "grace_period=10"),
        ({"max_retry": -1}, "max_retry=-1"),
    ],
)
def test_bad_heartbeat_settings_name_the_field(kwargs, field):
    with pytest.raises(SearchSpaceError, match=f"hydra.sweeper.{field} is not valid"):
        OptunaSweeper(**kwargs)


def test_the_heartbeat_can_be_turned_off():
    assert OptunaSweeper(heartbeat_interval=None).heartbeat.storage_kwargs() == {}
    assert hb.Settings(interval=20, grace=None).storage_kwargs() == {"heartbeat_interval": 20, "grace_period": 60}

"""SIGINT and SIGTERM sent to a real sweep (`python -m pipeline.train -m`, real SQLite stores):
the trial in flight ends FAIL (interrupted) in Optuna and KILLED in MLflow, the sweep stops
within seconds and prints how to resume, and the next start runs exactly what is missing."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

# Slow and not yet verified after the final merges: SIGINT failed and SIGTERM timed out on a
# machine loaded by ten concurrent test runs (issue 13 stays open until both pass idle).
pytestmark = pytest.mark.slow

# Long enough (a few seconds a trial) to be caught in flight.
ARGS = [
    "hydra/sweeper=optuna",
    "model/pos_enc=choice(rope,alibi,nope)",
    "study=sig",
    "budget=cpu",
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.context_length=32",
    "data.batch_size=4",
    "data.val_batches=1",
    "trainer.max_steps=120",
    "trainer.val_check_interval=60",
    "trainer.enable_progress_bar=false",
    "eval.enabled=false",
    "tracking.system_metrics=false",
]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "MLFLOW_"))}
    return {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}


def _count(db: Path, sql: str) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute(sql).fetchone()[0]
    except sqlite3.Error:  # not created yet
        return 0


def _wait_for_second_trial_training(proc: subprocess.Popen, tmp_path: Path) -> None:
    """Until one trial is COMPLETE and the next one's MLflow child run is RUNNING."""
    deadline = time.time() + 1200  # minutes on a loaded machine (tokenizing, then a first trial)
    while not (
        _count(tmp_path / "optuna.db", "SELECT count(*) FROM trials WHERE state = 'COMPLETE'") >= 1
        and _count(tmp_path / "mlflow.db", "SELECT count(*) FROM runs WHERE status = 'RUNNING'") >= 2
    ):
        assert proc.poll() is None and time.time() < deadline, "the sweep ended before the signal"
        time.sleep(0.2)
    time.sleep(1.0)  # into its training


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_trial_stops_the_sweep_and_the_next_start_resumes_exactly(tmp_path, sig):
    command = [sys.executable, "-m", "pipeline.train", "-m", *ARGS]
    with open(tmp_path / "out.log", "wb") as out, open(tmp_path / "err.log", "wb") as errf:  # files: a full pipe blocks
        proc = subprocess.Popen(command, cwd=tmp_path, env=_env(tmp_path), stdout=out, stderr=errf)
        _wait_for_second_trial_training(proc, tmp_path)
        sent = time.time()
        proc.send_signal(sig)
        proc.wait(timeout=60)
    stop_s = time.time() - sent
    err = (tmp_path / "err.log").read_text()
    assert proc.returncode == 128 + sig, err[-3000:]
    # Seconds, not the rest of the trial or the sweep: 23 s measured at load average 14 on 2 cores
    # (eight test suites at once), where the first trial alone took minutes.
    print(f"\n{sig.name}: the sweep stopped {stop_s:.1f} s after the signal")
    assert stop_s < 45, stop_s
    assert f"stopped by {sig.name}" in err and "resume with:" in err and "-m pipeline.train -m" in err

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    trials = optuna.load_study(study_name="sig", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL]
    assert trials[1].user_attrs["interrupted"] is True
    assert trials[1].user_attrs["fail_reason"] == f"interrupted: {sig.name}"

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sig")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "true"]
    children = {r.data.tags["trial"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert parent.info.status == "KILLED"
    assert children["0"].info.status == "FINISHED"
    assert children["1"].info.status == "KILLED"
    assert children["1"].data.tags["failure_reason"] == f"interrupted: {sig.name}"

    # The next start: the interrupted point once more, then the one never started; nothing else.
    again = subprocess.run(command, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    trials = optuna.load_study(study_name="sig", storage=storage).trials
    new = trials[2:]
    assert len(new) == 2 and new[0].system_attrs["retry_of"] == 1 and new[0].params == trials[1].params
    complete = [t.params["model/pos_enc"] for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(complete) == ["alibi", "nope", "rope"]  # each point once
    runs = client.search_runs([exp.experiment_id])
    finished = sorted(r.data.tags["pos_enc"] for r in runs if r.info.status == "FINISHED" and "trial" in r.data.tags)
    assert finished == ["alibi", "nope", "rope"]
    assert [r.info.status for r in runs if r.data.tags.get("sweep") == "true"] == ["FINISHED"]

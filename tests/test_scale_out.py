"""Shared stores: an Optuna study on PostgreSQL and runs logged to a real `mlflow server`.

Slow: a throwaway PostgreSQL cluster, a tracking server process and sweeps on it: a 2-point
one, and two workers on a 6-point grid, one of them SIGKILLed mid-trial (the heartbeat).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from hydra_plugins.pipeline_optuna_sweeper import study as study_lib
from tests.helpers import postgres
from tests.helpers.cli import TINY, cli

pytestmark = pytest.mark.slow


def start_mlflow_server(backend: str, artifacts: Path, cwd: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server` as `make server` starts it, on a free port; returns (process, URL)."""
    port = postgres.free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", backend, "--artifacts-destination", str(artifacts)],
        cwd=cwd, stdout=subprocess.DEVNULL, stderr=open(cwd / "server.log", "w"),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(1)
        if proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"mlflow server did not start: {(cwd / 'server.log').read_text()[-2000:]}")


@pytest.fixture
def pg():
    reason = postgres.available()
    if reason:
        pytest.skip(reason)
    with postgres.cluster() as urls:
        yield urls


def test_sweep_on_postgres_logs_to_a_tracking_server(pg, tmp_path: Path) -> None:
    server, url = start_mlflow_server(pg["mlflow"], tmp_path / "artifacts", tmp_path)
    try:
        t0 = time.monotonic()
        proc = cli(
            "pipeline.train",
            ["-m", "hydra/sweeper=optuna", "model/pos_enc=choice(rope,alibi)", f"hydra.sweeper.storage={pg['optuna']}",
             "study=shared", f"tracking.uri={url}", *TINY, "eval.enabled=false"],
            tmp_path, timeout=900,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        print(f"2-point sweep on PostgreSQL + tracking server: {time.monotonic() - t0:.1f} s")
        # The study lives in PostgreSQL, not in a local optuna.db.
        study = optuna.load_study(study_name="shared", storage=pg["optuna"])
        assert sorted(t.params["model/pos_enc"] for t in study.trials if t.state == TrialState.COMPLETE) == [
            "alibi", "rope",
        ]  # fmt: skip
        assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()
        # The runs live behind the server: children FINISHED with their curves and config artifact.
        client = MlflowClient(url)
        exp = client.get_experiment_by_name("shared")
        runs = client.search_runs([exp.experiment_id])
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert sorted(r.data.tags["pos_enc"] for r in children) == ["alibi", "rope"]
        for r in children:
            assert r.info.status == "FINISHED"
            assert client.get_metric_history(r.info.run_id, "val/loss")
            assert "config.yaml" in [a.path for a in client.list_artifacts(r.info.run_id)]
        assert any(p.name == "config.yaml" for p in (tmp_path / "artifacts").rglob("*"))  # served by the server
    finally:
        server.terminate()
        server.wait(timeout=30)


def _worker(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """One sweeping process (workers=0: it claims and runs trials itself), as a second machine
    would start it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "MLFLOW_"))}
    env.update({"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    return subprocess.Popen([sys.executable, "-m", "pipeline.train", *args], cwd=cwd, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)  # fmt: skip


def _running(storage: str, study: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name=study, storage=storage).get_trials(states=(TrialState.RUNNING,))
    except KeyError:  # not created yet
        return []


def _pid(t: optuna.trial.FrozenTrial) -> int:
    return int(str(t.system_attrs.get("worker", ":0")).rpartition(":")[2] or 0)


GRACE, INTERVAL = 10, 2  # short heartbeat settings, so the retry comes soon after the kill
# Trials of ~20-40 s on a loaded 2-core machine: a worker takes about a minute to start there,
# and the other must still be mid-study when it does.
LONGER = [o for o in TINY if not o.startswith(("trainer.max_steps=", "trainer.val_check_interval="))] + [
    "trainer.max_steps=120",
    "trainer.val_check_interval=40",
]


def test_a_worker_killed_mid_trial_loses_its_trial_to_the_other_after_the_grace_period(pg, tmp_path: Path) -> None:
    """Issue 12: two workers on a 6-point grid, on PostgreSQL and a real `mlflow server`; one is
    SIGKILLed mid-trial. The other fails its trial as stale once the heartbeat is GRACE s old,
    runs the retry, and every point ends FINISHED exactly once in Optuna and in MLflow."""
    server, url = start_mlflow_server(pg["mlflow"], tmp_path / "artifacts", tmp_path)
    t0 = time.monotonic()
    args = ["-m", "hydra/sweeper=optuna", "model/pos_enc=choice(rope,alibi,learned)",
            "model/norm=choice(layernorm,rmsnorm)", f"hydra.sweeper.storage={pg['optuna']}", "study=hb",
            f"tracking.uri={url}", *LONGER, "eval.enabled=false", f"hydra.sweeper.heartbeat_interval={INTERVAL}",
            f"hydra.sweeper.grace_period={GRACE}", "hydra.sweeper.max_retry=1"]  # fmt: skip
    procs: list[subprocess.Popen] = []
    try:
        # Started together, as on two machines: the store lock (a PostgreSQL advisory lock) lets
        # one of them enqueue the grid.
        victim = _worker(args, tmp_path, tmp_path / "victim.log")
        survivor = _worker(args, tmp_path, tmp_path / "survivor.log")
        procs += [victim, survivor]
        # Kill the victim in a trial of its own (its child run started) while the survivor runs one too.
        deadline = time.monotonic() + 600
        while True:
            running = _running(pg["optuna"], "hb")
            mine = [t for t in running if _pid(t) == victim.pid and "mlflow_run_id" in t.user_attrs]
            if mine and any(_pid(t) == survivor.pid for t in running):
                break
            for p, log in ((victim, "victim.log"), (survivor, "survivor.log")):
                assert p.poll() is None and time.monotonic() < deadline, (tmp_path / log).read_text()[-3000:]
            time.sleep(0.2)
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = datetime.now()
        victim.wait()
        (lost,) = mine
        assert survivor.wait(timeout=900) == 0, (tmp_path / "survivor.log").read_text()[-3000:]
        wall = time.monotonic() - t0

        study = optuna.load_study(study_name="hb", storage=pg["optuna"])
        trials = study.trials
        lost = next(t for t in trials if t.number == lost.number)
        (retry,) = [t for t in trials if t.system_attrs.get("retry_of") == lost.number]
        failed_after = (lost.datetime_complete - killed_at).total_seconds()
        retried_after = (retry.datetime_start - killed_at).total_seconds()
        print(
            f"PostgreSQL + mlflow server, 2 workers, 6 points, one SIGKILLed: {wall:.1f} s; the lost trial failed "
            f"as stale {failed_after:.1f} s after the kill, its retry started {retried_after:.1f} s after"
        )
        # Failed by the survivor only after the grace period (a beat every INTERVAL s before the kill).
        assert failed_after >= GRACE - INTERVAL
        assert lost.state == TrialState.FAIL and "sent no heartbeat" in lost.user_attrs["fail_reason"]
        assert retry.state == TrialState.COMPLETE and retry.params == lost.params and _pid(retry) == survivor.pid
        # Exactly once: six points, each COMPLETE once; nothing RUNNING or WAITING.
        latest = study_lib.latest_attempts(study)
        assert len(latest) == 6 and all(t.state == TrialState.COMPLETE for t in latest)
        assert len({tuple(sorted(t.params.items())) for t in latest}) == 6
        assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
        assert len(trials) == 7  # the grid enqueued once, plus the one retry

        client = MlflowClient(url)
        exp = client.get_experiment_by_name("hb")
        runs = client.search_runs([exp.experiment_id], max_results=100)
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        finished = [r for r in children if r.info.status == "FINISHED"]
        assert sorted((r.data.tags["pos_enc"], r.data.tags["norm"]) for r in finished) == sorted(
            (p, n) for p in ("rope", "alibi", "learned") for n in ("layernorm", "rmsnorm")
        )
        killed = client.get_run(lost.user_attrs["mlflow_run_id"])
        assert killed.info.status == "KILLED" and "sent no heartbeat" in killed.data.tags["failure_reason"]
        assert len(children) == 7  # six FINISHED, the lost attempt KILLED
        assert not [r for r in runs if r.info.status == "RUNNING"]  # parent closed by the survivor
        assert {r.data.tags["mlflow.parentRunId"] for r in children} == {
            r.info.run_id for r in runs if r not in children
        }
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        server.terminate()
        server.wait(timeout=30)


def test_the_store_lock_on_postgresql_is_one_lock_across_connections(pg) -> None:
    """Two first starts on one PostgreSQL study take turns (an advisory lock), as two processes
    on one SQLite file take turns on its lock file."""
    from sqlalchemy import create_engine, text

    from hydra_plugins.pipeline_optuna_sweeper.storage import _PG_LOCK_KEY, store_lock

    other = create_engine(pg["optuna"])  # as another machine would connect
    try_lock = text("SELECT pg_try_advisory_lock(:k)")
    with store_lock(pg["optuna"]), other.connect() as con:
        assert con.execute(try_lock, {"k": _PG_LOCK_KEY}).scalar() is False
    with other.connect() as con:
        assert con.execute(try_lock, {"k": _PG_LOCK_KEY}).scalar() is True  # released
    other.dispose()


def test_make_server_binds_loopback_by_default() -> None:
    """`make server` passes --host 127.0.0.1 unless HOST= is given (dry run)."""
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(["make", "-n", "server"], cwd=repo, capture_output=True, text=True,
                         env={**os.environ, "MAKEFLAGS": ""}).stdout  # fmt: skip
    assert "--host 127.0.0.1" in out and "--backend-store-uri" in out
    out = subprocess.run(["make", "-n", "server", "HOST=0.0.0.0"], cwd=repo, capture_output=True, text=True).stdout
    assert "--host 0.0.0.0" in out

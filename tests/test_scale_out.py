"""Shared stores: an Optuna study on PostgreSQL and runs logged to a real `mlflow server`.

Slow: a throwaway PostgreSQL cluster, a tracking server process and a 2-point sweep.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

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


def test_make_server_binds_loopback_by_default() -> None:
    """`make server` passes --host 127.0.0.1 unless HOST= is given (dry run)."""
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(["make", "-n", "server"], cwd=repo, capture_output=True, text=True,
                         env={**os.environ, "MAKEFLAGS": ""}).stdout  # fmt: skip
    assert "--host 127.0.0.1" in out and "--backend-store-uri" in out
    out = subprocess.run(["make", "-n", "server", "HOST=0.0.0.0"], cwd=repo, capture_output=True, text=True).stdout
    assert "--host 0.0.0.0" in out

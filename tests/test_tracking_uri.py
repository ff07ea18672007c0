"""One tracking-URI rule for every consumer: explicit > MLFLOW_TRACKING_URI > ./mlflow.db.

Before, `tracking.tracking_uri` let the environment win over `tracking.uri` while the report let
its flag win; each consumer here is checked with all three sources set to different stores.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient
from omegaconf import OmegaConf

from pipeline.tracking import resolve_tracking_uri
from pipeline.tracking.schema import Tag
from tests.helpers.cli import TINY, cli
from tests.helpers.mlflow_study import log_grid

ENV = "MLFLOW_TRACKING_URI"
SOURCES = ("explicit", "env", "default")


@pytest.fixture
def stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Three stores in a scratch working dir: an explicit one, the environment's, ./mlflow.db."""
    monkeypatch.chdir(tmp_path)
    return {
        "explicit": f"sqlite:///{tmp_path / 'explicit.db'}",
        "env": f"sqlite:///{tmp_path / 'env.db'}",
        "default": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }


def given(source: str, stores: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str | None:
    """Set up the sources down to `source` (explicit: all three); returns the explicit URI or None."""
    if source == "default":
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, stores["env"])
    return stores["explicit"] if source == "explicit" else None


@pytest.mark.parametrize("source", SOURCES)
def test_resolver(stores, monkeypatch, source: str) -> None:
    assert resolve_tracking_uri(given(source, stores, monkeypatch)) == stores[source]


@pytest.mark.parametrize("source", SOURCES)
def test_sweep_callback_opens_its_parent_run_in_the_resolved_store(stores, monkeypatch, source: str) -> None:
    from pipeline.tracking.sweep import MLflowSweepCallback

    config = OmegaConf.create(
        {
            "study": "uri",
            "tracking": {"uri": given(source, stores, monkeypatch)},
            "hydra": {
                "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"},
                "job": {"num": 0},
            },
        }
    )
    callback = MLflowSweepCallback()
    callback.on_multirun_start(config)
    assert callback.parent_id is None  # no run until a job starts (a sweep may launch nothing)
    callback.on_job_start(config)
    parent_id = callback.parent_id
    callback._close("FINISHED")
    parent = MlflowClient(stores[source]).get_run(parent_id)
    assert parent.data.tags[Tag.SWEEP] == "true"
    for other in set(SOURCES) - {source}:
        assert not Path(stores[other][len("sqlite:///") :]).exists(), f"{other} store was created"


@pytest.fixture(scope="module")
def three_studies(tmp_path_factory) -> tuple[Path, dict[str, str], dict[str, str]]:
    """The same study name in three stores of one folder (an explicit one, the environment's,
    ./mlflow.db), with a different positional encoding in each; logged once for the three cases
    below, as creating a store runs MLflow's migrations (seconds)."""
    folder = tmp_path_factory.mktemp("three")
    stores = {name: f"sqlite:///{folder / db}" for name, db in zip(SOURCES, ("explicit.db", "env.db", "mlflow.db"))}
    pos_enc = {"explicit": "rope", "env": "alibi", "default": "nope"}
    for name, uri in stores.items():
        log_grid(uri, str(folder / name), "s", pos_enc=("learned", pos_enc[name]), seeds=(0,), failures=False)
    return folder, stores, pos_enc


@pytest.mark.parametrize("source", SOURCES)
def test_report_reads_the_resolved_store(three_studies, monkeypatch, tmp_path, source: str) -> None:
    from pipeline.analysis.report import build_report

    folder, stores, pos_enc = three_studies
    monkeypatch.chdir(folder)  # where ./mlflow.db, the default store, is
    rep = build_report("s", given(source, stores, monkeypatch), tmp_path / "reports", log_artifacts=False)
    assert {c.levels["pos_enc"] for c in rep.configurations} == {"learned", pos_enc[source]}


# -- a real run and its rerun: the explicit store wins over the environment's ---------------------


@pytest.fixture(scope="module")
def explicit_run(tmp_path_factory) -> tuple[Path, dict[str, str], str]:
    cwd = tmp_path_factory.mktemp("uri")
    uris = {s: f"sqlite:///{cwd / f'{s}.db'}" for s in ("explicit", "env")}
    fast = ["trainer.max_steps=2", "trainer.val_check_interval=2", "eval.enabled=false"]
    proc = cli("pipeline.train", [*TINY, *fast, f"tracking.uri={uris['explicit']}"], cwd, env={ENV: uris["env"]})
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(uris["explicit"])
    (run,) = client.search_runs([client.get_experiment_by_name("default").experiment_id])
    return cwd, uris, run.info.run_id


def test_run_lands_in_the_explicit_store(explicit_run) -> None:
    cwd, uris, run_id = explicit_run
    run = MlflowClient(uris["explicit"]).get_run(run_id)
    assert run.info.status == "FINISHED"
    names = {a.path for a in MlflowClient(uris["explicit"]).list_artifacts(run_id, "plots")}
    assert "plots/loss_curve.png" in names  # the plot read its curves from the same store
    assert not (cwd / "env.db").exists() and not (cwd / "mlflow.db").exists()


def test_rerun_reads_and_logs_in_the_explicit_store(explicit_run) -> None:
    cwd, uris, run_id = explicit_run
    proc = cli("pipeline.rerun", [run_id, f"tracking.uri={uris['explicit']}"], cwd, env={ENV: uris["env"]})
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(uris["explicit"])
    exp = client.get_run(run_id).info.experiment_id
    assert len(client.search_runs([exp], f"tags.{Tag.RERUN_OF} = '{run_id}'")) == 1
    assert not (cwd / "env.db").exists() and not (cwd / "mlflow.db").exists()

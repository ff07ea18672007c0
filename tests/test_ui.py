"""How a study opens in the MLflow UI, without a browser: the experiment kind and saved views
in a real store, the addresses `python -m pipeline.ui` prints, the report run's description,
and the UI-state names we write checked against the installed MLflow UI bundle."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from pipeline import ui
from pipeline.analysis.report import build_report
from pipeline.model.families import FAMILIES
from pipeline.tracking import views
from pipeline.tracking.runs import start_run
from tests.helpers.mlflow_study import log_grid

BUNDLE = Path(mlflow.__file__).parent / "server/js/build/static/js"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, Path]:
    """One SQLite store for the module (creating one runs MLflow's migrations: seconds)."""
    root = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri, root


@pytest.fixture(scope="module")
def grid(store):
    """A logged study with its report (log_grid creates its experiment by hand, as the
    pipeline did before the views existed)."""
    uri, root = store
    logged = log_grid(uri, str(root / "artifacts"), "grid")
    rep = build_report("grid", uri, root / "reports", optuna_storage=f"sqlite:///{root / 'none.db'}")
    return logged, rep


def _view(client: MlflowClient, experiment_id: str, key: str) -> dict:
    envelope = json.loads(client.get_experiment(experiment_id).tags[views.VIEW_TAG_PREFIX + key])
    # what the UI checks before it lists a saved view (string name, number createdAt, string state)
    assert isinstance(envelope["name"], str) and isinstance(envelope["createdAt"], int)
    return {**envelope, "state": json.loads(envelope["state"])}


def test_a_new_study_opens_in_the_training_view_with_its_saved_views(store):
    client = MlflowClient(store[0])
    exp_id = views.ensure_experiment(client, "new")
    tags = client.get_experiment(exp_id).tags
    assert tags[views.EXPERIMENT_KIND] == views.TRAINING_KIND
    assert {k[len(views.VIEW_TAG_PREFIX) :] for k in tags if k.startswith(views.VIEW_TAG_PREFIX)} == {
        "ablation",
        *(f"by-{f}" for f in FAMILIES),
    }
    table = _view(client, exp_id, "ablation")["state"]
    assert table["selectedColumns"] == [
        "tags.`pos_enc`",
        "tags.`norm`",
        "tags.`attention`",
        "tags.`ffn`",
        "tags.`seed`",
        "metrics.`val/loss`",
        "metrics.`extrap/ppl_x1`",
        "metrics.`extrap/ppl_x4`",
        "metrics.`cost/kv_bytes_per_token`",
        "metrics.`cost/decode_tokens_per_s`",
        "metrics.`cost/params_active`",
    ]
    assert set(table["columnWidths"]) == set(table["columnOrder"]) >= set(table["selectedColumns"])
    # a metric order (not creation time) is what lays the child runs flat in MLflow's table
    assert (table["orderByKey"], table["orderByAsc"], table["searchFilter"]) == ("metrics.`val/loss`", True, "")
    assert table["groupBy"] is None
    (chart,) = table["compareRunCharts"]
    assert chart["type"] == "PARALLEL" and chart["selectedMetrics"] == ["val/loss"]
    assert chart["selectedParams"] == [f"model.{f}.name" for f in FAMILIES]
    assert chart["metricSectionId"] in {s["uuid"] for s in table["compareRunSections"]}
    grouped = _view(client, exp_id, "by-norm")["state"]
    assert grouped["groupBy"] == {
        "aggregateFunction": "average",
        "groupByKeys": [{"mode": "tag", "groupByData": "norm"}],
    }
    assert "attributes.status = 'FINISHED'" in grouped["searchFilter"]


def test_setting_up_again_keeps_the_views_and_an_old_experiment_gains_them(store):
    client = MlflowClient(store[0])
    old = client.create_experiment("old")  # as the pipeline created experiments before
    assert views.ensure_experiment(client, "old") == old
    before = client.get_experiment(old).tags
    assert before[views.EXPERIMENT_KIND] == views.TRAINING_KIND
    assert views.ensure_experiment(client, "old") == old
    assert client.get_experiment(old).tags == before  # unchanged views are not rewritten
    # an outdated view is replaced; it keeps its creation date
    stale = json.loads(before[views.VIEW_TAG_PREFIX + "ablation"])
    client.set_experiment_tag(old, views.VIEW_TAG_PREFIX + "ablation", json.dumps({**stale, "state": "{}"}))
    views.set_up_experiment(client, old)
    fresh = _view(client, old, "ablation")
    assert fresh["state"]["selectedColumns"] and fresh["createdAt"] == stale["createdAt"]


def test_a_training_run_creates_its_study_set_up(store):
    uri = store[0]
    with start_run(uri, "fresh", "r", {"study": "fresh"}, system_metrics=False) as run:
        exp_id = run.info.experiment_id
    client = MlflowClient(uri)
    assert client.get_experiment(exp_id).name == "fresh"
    assert client.get_experiment(exp_id).tags[views.EXPERIMENT_KIND] == views.TRAINING_KIND
    assert views.VIEW_TAG_PREFIX + "ablation" in client.get_experiment(exp_id).tags


def test_ui_prints_each_study_address(store, grid, capsys):
    uri, _ = store
    logged, _ = grid
    MlflowClient(uri).create_experiment("not_a_study")  # no pipeline run: not listed
    assert ui.main(["--no-serve", "--port", "5123", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    base = f"http://127.0.0.1:5123/#/experiments/{logged.experiment_id}/runs?viewStateShareKey=ablation"
    runs = re.search(r"^  grid +runs +(\S+)$", out, re.M)
    charts = re.search(r"^ +charts +(\S+)$", out[runs.end() :], re.M)
    assert runs.group(1) == f"{base}&workflowType=machine_learning"
    assert charts.group(1) == f"{base}&compareRunsMode=CHART&workflowType=machine_learning"
    assert "not_a_study" not in out
    # the study's experiment was made by hand, as an older pipeline did: `make ui` set it up
    tags = MlflowClient(uri).get_experiment(logged.experiment_id).tags
    assert tags[views.EXPERIMENT_KIND] == views.TRAINING_KIND


def test_ui_on_a_missing_store_says_so_and_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert ui.main(["--no-serve"]) == 0
    assert "no MLflow store at sqlite:///" in capsys.readouterr().out
    assert not (tmp_path / "mlflow.db").exists()


def test_the_report_run_description_links_the_report_and_summarises_the_study(store, grid):
    logged, rep = grid
    text = MlflowClient(store[0]).get_run(logged.parent_id).data.tags[views.DESCRIPTION]
    link = f"#/experiments/{logged.experiment_id}/runs/{logged.parent_id}/artifacts/report/report.html"
    assert f"]({link}?workflowType=machine_learning)" in text
    paragraphs = text.split("\n\n")
    assert paragraphs[1:] == list(rep.summary) and len(rep.summary) == 2
    # log_grid's effects: rope -0.24 vs learned, moe -0.14 vs gelu (seed noise +-0.01)
    best, effects = rep.summary
    assert "pos_enc=rope" in best and "ffn=moe" in best and "val loss 1.6" in best
    assert re.search(r"pos_enc rope vs learned -0\.2\d", effects), effects
    assert re.search(r"ffn moe vs gelu -0\.1\d", effects), effects
    assert effects.index("pos_enc") < effects.index("ffn")  # largest improvement first


@pytest.mark.skipif(not BUNDLE.exists(), reason="the installed mlflow has no UI bundle")
def test_the_installed_mlflow_ui_reads_the_names_we_write():
    """The saved-view contract is MLflow's UI code, not a documented API: pin it to the
    installed version, so an MLflow upgrade that renames a field fails here, not silently."""
    js = "\n".join(p.read_text(errors="ignore") for p in BUNDLE.glob("*.js"))
    # the UI-state fields a shared view may carry, and those it drops
    ui_keys = json.loads(re.search(r'=(\["selectedColumns","columnOrder"[^\]]*\])', js).group(1))
    dropped = json.loads(re.search(r'=(\["runsExpanded","runsPinned"[^\]]*\])', js).group(1))
    facets = json.loads(re.search(r'=(\["searchFilter","orderByKey"[^\]]*\])', js).group(1))
    state = views.views()[0].state
    assert set(state) <= set(ui_keys) - set(dropped) | set(facets)
    assert "runsExpanded" in dropped  # why the views sort by a metric instead
    for literal in (
        views.VIEW_TAG_PREFIX,
        "viewStateShareKey",
        "compareRunsMode",
        '"machine_learning"',
        f'"{views.TRAINING_KIND}"',
        f'"{views.EXPERIMENT_KIND}"',
        f'"{views.DESCRIPTION.removeprefix("mlflow.")}"',
        '"PARALLEL"',
    ):
        assert literal in js, literal

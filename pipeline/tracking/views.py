"""How a study opens in the MLflow UI: the experiment's kind, saved runs-table views, addresses.

What MLflow 3's UI (3.17) keeps where, read from its server bundle (mlflow/server/js/build):
- The page address holds the search facets only (`searchFilter`, `orderByKey`, `orderByAsc`,
  `lifecycleFilter`, ...), `compareRunsMode=CHART` (the chart view), `workflowType` (GenAI or
  machine-learning pages) and `viewStateShareKey`.
- Columns, charts and Group by live in the browser's local storage, or in a *saved view*: an
  experiment tag `mlflow.sharedViewState.<key>` holding {name, createdAt, updatedAt, state}. The
  address `?viewStateShareKey=<key>` applies it, and the runs page lists it under **Views**. So
  the pipeline writes its views as experiment tags, and the printed addresses name them.
- A saved view never carries which parent runs are unfolded (MLflow drops `runsExpanded` from
  shared state). But the table nests child runs under their parent only when it is sorted by
  creation time with no filter; sorted by `val/loss` it lists every trial as a row, so the
  children are visible without a click.
- The experiment kind tag (`mlflow.experimentKind`) picks the GenAI or the model-training pages
  in UIs that read it; 3.17 takes the view from its global switch (top left) or the address's
  `workflowType=machine_learning` instead, so the addresses carry that too.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from pipeline.model.families import FAMILIES
from pipeline.tracking.schema import Metric, Param, Tag, extrap_ppl

EXPERIMENT_KIND = Tag.EXPERIMENT_KIND
TRAINING_KIND = "custom_model_development"  # shown as "Machine learning"; the other is genai_development
VIEW_TAG_PREFIX = Tag.SAVED_VIEW_PREFIX
DESCRIPTION = Tag.DESCRIPTION
WORKFLOW = "workflowType=machine_learning"

OBJECTIVE = Metric.VAL_LOSS
TABLE_VIEW = "ablation"  # the key of the main view; one "by-<family>" view per family
# The runs table's columns and their widths (px): the four families and the seed (tags), then
# the metrics. MLflow's default of 100 px cuts the cost headers and pushes the tags out of
# sight; these fit the row in a 1920-pixel-wide window.
TAG_COLUMNS = {"pos_enc": 80, "norm": 90, "attention": 85, "ffn": 70, Tag.SEED: 60}
METRIC_COLUMNS = {
    OBJECTIVE: 95,
    extrap_ppl(1): 110,
    extrap_ppl(4): 110,
    Metric.COST_KV_BYTES_PER_TOKEN: 170,
    Metric.COST_DECODE_TOKENS_PER_S: 180,
    Metric.COST_PARAMS_ACTIVE: 135,
}
FIXED_COLUMNS = {"attributes.`Run Name`": 170, "runDateAndNestInfo": 125, "duration": 75}  # MLflow's own


def column(kind: str, key: str) -> str:
    """A runs-table column id as the UI writes it: tags.`pos_enc`, metrics.`val/loss`."""
    return f"{kind}.`{key}`"


@dataclass(frozen=True)
class View:
    key: str  # the tag suffix and the address's viewStateShareKey
    name: str  # as listed under Views
    state: dict[str, Any]  # search facets and UI state, the UI's own field names


def _state(group_by: str | None = None) -> dict[str, Any]:
    section = "ablation-section"
    parallel = {
        "uuid": "ablation-parallel",
        "type": "PARALLEL",
        "metricSectionId": section,
        "displayName": "factors vs val/loss",
        "isGenerated": False,
        "deleted": False,
        "runsCountToCompare": 10,
        # params, not tags: the chart reads params and metrics only
        "selectedParams": [Param.component(f) for f in FAMILIES],
        "selectedMetrics": [OBJECTIVE],
        "showAllRuns": False,
    }
    widths = {column("tags", k): w for k, w in TAG_COLUMNS.items()}
    widths.update({column("metrics", k): w for k, w in METRIC_COLUMNS.items()})
    columns = list(widths)
    return {
        # search facets
        # grouped: the finished trials only, as the report averages them (not the sweep's parent)
        "searchFilter": f"attributes.status = 'FINISHED' and tags.{Tag.SWEEP} IS NULL" if group_by else "",
        "orderByKey": column("metrics", OBJECTIVE),  # a metric order also lays child runs flat
        "orderByAsc": True,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        # UI state
        "selectedColumns": columns,
        # the factors before the metrics (MLflow puts its metrics group first), at widths that fit
        "columnOrder": [*FIXED_COLUMNS, *columns],
        "columnWidths": {**FIXED_COLUMNS, **widths},
        "runsHiddenMode": "SHOW_ALL",  # charts draw every run, not the UI's default first ten
        "compareRunCharts": [parallel],
        # "Ablation" sorts before the sections the UI adds per metric prefix (cost, extrap, val...)
        "compareRunSections": [
            {"uuid": section, "name": "Ablation", "display": True, "isReordered": False, "deleted": False}
        ],
        "groupBy": (
            {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": group_by}]}
            if group_by
            else None
        ),
        "groupsExpanded": {},
        "useGroupedValuesInCharts": True,
        "hideEmptyCharts": True,
    }


def views() -> list[View]:
    """The runs table of the ablation, and the same grouped by each component family (mean of
    each metric per level over the finished trials, groups in order of mean val loss)."""
    table = View(TABLE_VIEW, "ablation: factors and metrics, best val/loss first", _state())
    grouped = [View(f"by-{f}", f"grouped by {f}: mean per level", _state(f)) for f in FAMILIES]
    return [table, *grouped]


def set_up_experiment(client, experiment_id: str) -> None:
    """Give a study's experiment the training kind and the saved views; a view already stored
    with the same state is left as it is (so `createdAt` keeps its first date)."""
    tags = client.get_experiment(experiment_id).tags
    if tags.get(EXPERIMENT_KIND) != TRAINING_KIND:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND, TRAINING_KIND)
    now = int(time.time() * 1000)
    for view in views():
        state = json.dumps(view.state, separators=(",", ":"))
        old = _envelope(tags.get(VIEW_TAG_PREFIX + view.key))
        if old and old.get("state") == state and old.get("name") == view.name:
            continue
        created = old.get("createdAt", now) if old else now
        value = json.dumps({"name": view.name, "createdAt": created, "updatedAt": now, "state": state})
        client.set_experiment_tag(experiment_id, VIEW_TAG_PREFIX + view.key, value)


def _envelope(value: str | None) -> dict | None:
    try:
        out = json.loads(value) if value else None
    except ValueError:
        return None
    return out if isinstance(out, dict) else None


def ensure_experiment(client, name: str) -> str:
    """The study's experiment id, created when missing; set up for the UI either way (older
    stores gain the views on their next run)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            experiment_id = client.create_experiment(name, tags={EXPERIMENT_KIND: TRAINING_KIND})
        except MlflowException as e:  # another worker of the same sweep created it first
            if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            experiment_id = client.get_experiment_by_name(name).experiment_id
    else:
        experiment_id = exp.experiment_id
    set_up_experiment(client, experiment_id)
    return experiment_id


# -- addresses ----------------------------------------------------------------------------------


def runs_table_url(base: str, experiment_id: str, view: str = TABLE_VIEW, charts: bool = False) -> str:
    """The study's runs table (or chart view) with a saved view applied."""
    mode = "&compareRunsMode=CHART" if charts else ""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={view}{mode}&{WORKFLOW}"


def artifact_link(experiment_id: str, run_id: str, path: str) -> str:
    """A link, relative to the UI's address, to a run's artifact in its artifact viewer."""
    return f"#/experiments/{experiment_id}/runs/{run_id}/artifacts/{path}?{WORKFLOW}"

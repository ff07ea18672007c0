"""MLflow runs: experiment per study, parent/child runs, tags, flattened params, run status.

Every tag and metric name is in `pipeline.tracking.schema`.
"""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from pipeline.tracking.schema import FAILURE_REASON_MAX, TRIAL_RUN_ATTR, TRUE, Tag
from pipeline.tracking.views import ensure_experiment

PARENT_ENV = "PIPELINE_PARENT_RUN_ID"  # set by the sweep callback for its child runs
TRIAL_ENV = "PIPELINE_TRIAL_NUMBER"
REPO = Path(__file__).resolve().parents[2]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


@functools.cache  # one lookup per process: a sweep worker runs the code it imported at start
def git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_run(uri: str, study: str, run_name: str, tags: dict[str, str], system_metrics: bool) -> mlflow.ActiveRun:
    """Start a run in the study's experiment; a child of the sweep's parent run when inside one."""
    from hydra_plugins.pipeline_optuna_sweeper import current_trial
    from hydra_plugins.pipeline_optuna_sweeper.study import worker
    from pipeline.tracking.stores import prepared

    mlflow.set_tracking_uri(uri)
    with prepared(uri):  # a fresh store is migrated once, the experiment created once
        mlflow.set_experiment(experiment_id=ensure_experiment(mlflow.MlflowClient(uri), study))
    tags = dict(tags)
    if os.environ.get(TRIAL_ENV):
        tags[Tag.TRIAL] = os.environ[TRIAL_ENV]
        tags[Tag.WORKER] = worker()  # host:pid; a resumed sweep ends a dead worker's run KILLED
    active = mlflow.start_run(
        run_name=run_name,
        tags=tags,
        parent_run_id=os.environ.get(PARENT_ENV) or None,
        log_system_metrics=system_metrics,
    )
    trial = current_trial()
    if trial is not None:  # a worker that finds this trial stale ends this run (tracking/sweep.py)
        trial.set_user_attr(TRIAL_RUN_ATTR, active.info.run_id)
    return active


def log_params(params: dict[str, Any]) -> None:
    """Log params in batches, values cut to MLflow's length limit (the full config is an artifact)."""
    items = [(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in params.items()]
    for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        mlflow.log_params(dict(items[i : i + MAX_PARAMS_TAGS_PER_BATCH]))


def end_run(status: str, reason: str | None = None, tags: dict[str, str] | None = None) -> None:
    """End the active run as FINISHED, FAILED or KILLED, with the reason as a tag."""
    if reason:
        mlflow.set_tag(Tag.FAILURE_REASON, reason[:FAILURE_REASON_MAX])
    for key, value in (tags or {}).items():
        mlflow.set_tag(key, value)
    mlflow.end_run(status=status)


@contextmanager
def tracked_run(
    uri: str, study: str, run_name: str, tags: dict[str, str], system_metrics: bool
) -> Iterator[mlflow.ActiveRun]:
    """A run whose end status follows the block: FINISHED when it returns, KILLED when pruned
    or interrupted (SIGINT, SIGTERM), FAILED with the reason on any error."""
    import optuna

    from hydra_plugins.pipeline_optuna_sweeper._interrupt import Interrupted

    with start_run(uri, study, run_name, tags, system_metrics) as active:
        try:
            yield active
        except optuna.TrialPruned as e:
            end_run("KILLED", None, {Tag.PRUNED: TRUE, Tag.PRUNED_REASON: str(e) or "pruned"})
            raise
        except Interrupted as e:  # SIGINT or SIGTERM
            end_run("KILLED", f"interrupted: {e}")
            raise
        except (KeyboardInterrupt, SystemExit) as e:
            end_run("KILLED", f"interrupted: {type(e).__name__}")
            raise
        except BaseException as e:
            end_run("FAILED", f"{type(e).__name__}: {e}")
            raise
        end_run("FINISHED")


def lightning_logger(uri: str, run_id: str):
    """Lightning's MLFlowLogger bound to our run, which it must not end: the run ends after
    evaluation, with its real status (FINISHED, FAILED or KILLED), in `end_run`."""
    from lightning.pytorch.loggers import MLFlowLogger

    class RunLogger(MLFlowLogger):
        def finalize(self, status: str = "success") -> None:
            mlflow.flush_async_logging()  # the queued metric batches are in the store when fit() returns

    # synchronous=False: metric batches are written by MLflow's background thread, so a logging
    # step does not wait on the SQLite store.
    return RunLogger(tracking_uri=uri, run_id=run_id, log_model=False, synchronous=False)

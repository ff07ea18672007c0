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
# The study's experiment id per (store, study), looked up (created, set up for the UI) once per
# process: a sweep worker starts one run per trial in the same experiment.
_EXPERIMENTS: dict[tuple[str, str], str] = {}
# MLflow's async logging thread waits for data with queue.get(timeout=1); ending the queue (at
# the end of fit, and again when the run ends) joins that thread, so each end waited up to 1 s
# (measured: 0.98 s and 0.5 s per trial). With a buffer time set, the thread waits on its stop
# event instead, which ending sets: it returns at once, and writes what was queued in one batch.
ASYNC_BUFFER_ENV = "MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS"


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


def experiment(uri: str, study: str) -> str:
    """The study's experiment id in the store at `uri`; the first call in a process prepares the
    store (created and migrated once, under its lock) and creates or sets up the experiment."""
    from pipeline.tracking.stores import prepared

    experiment_id = _EXPERIMENTS.get((uri, study))
    if experiment_id is None:
        with prepared(uri):  # a fresh store is migrated once, the experiment created once
            experiment_id = ensure_experiment(mlflow.MlflowClient(uri), study)
        _EXPERIMENTS[(uri, study)] = experiment_id
    return experiment_id


def start_run(uri: str, study: str, run_name: str, tags: dict[str, str], system_metrics: bool) -> mlflow.ActiveRun:
    """Start a run in the study's experiment; a child of the sweep's parent run when inside one."""
    from hydra_plugins.pipeline_optuna_sweeper import current_trial
    from hydra_plugins.pipeline_optuna_sweeper.study import worker

    mlflow.set_tracking_uri(uri)
    experiment_id = experiment(uri, study)
    tags = dict(tags)
    if os.environ.get(TRIAL_ENV):
        tags[Tag.TRIAL] = os.environ[TRIAL_ENV]
        tags[Tag.WORKER] = worker()  # host:pid; a resumed sweep ends a dead worker's run KILLED
    active = mlflow.start_run(
        experiment_id=experiment_id,
        run_name=run_name,
        tags=tags,
        parent_run_id=os.environ.get(PARENT_ENV) or None,
        log_system_metrics=system_metrics,
    )
    trial = current_trial()
    if trial is not None:  # a worker that finds this trial stale ends this run (tracking/sweep.py)
        trial.set_user_attr(TRIAL_RUN_ATTR, active.info.run_id)
    return active


def log_batch(
    params: dict[str, Any] | None = None, tags: dict[str, str] | None = None, metrics: dict[str, float] | None = None
) -> None:
    """Params (values cut to MLflow's length limit: the full config is an artifact), tags and
    metrics of the active run, in as few store writes as MLflow's batch limits allow: one for a
    run's config (75 params), where a call per kind was a transaction each."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.utils.time import get_current_time_millis

    run_id = mlflow.active_run().info.run_id
    now = get_current_time_millis()
    p = [Param(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in (params or {}).items()]
    t = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    m = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()]
    client = mlflow.MlflowClient()
    n = MAX_PARAMS_TAGS_PER_BATCH  # per batch: at most this many params, and as many tags
    for i in range(0, max(len(p), len(t), 1), n):
        first = i == 0
        client.log_batch(run_id, metrics=m if first else [], params=p[i : i + n], tags=t[i : i + n])


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
    # step does not wait on the SQLite store; at most once a second (ASYNC_BUFFER_ENV, above).
    os.environ.setdefault(ASYNC_BUFFER_ENV, "1")
    return RunLogger(tracking_uri=uri, run_id=run_id, log_model=False, synchronous=False)

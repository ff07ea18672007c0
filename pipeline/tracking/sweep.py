"""Sweep glue between Hydra multirun, the Optuna sweeper plugin, Lightning and MLflow.

- `MLflowSweepCallback` (a Hydra callback, registered in pipeline/conf/train.yaml): the sweep is a
  parent run in the study's experiment, every job a child run (through PIPELINE_PARENT_RUN_ID,
  read by pipeline.tracking). Works with the basic sweeper and with `hydra/sweeper=optuna`; an
  Optuna sweep that is rerun (resumed) reuses its parent run, and its worker processes join
  the parent run their coordinator made. When the workers were submitted as jobs
  (hydra/launcher=submitit_*), the submitting command leaves the parent run open and the last
  worker to finish (the sweeper hands it the summary) closes it.
- `trial_callbacks(cfg)`: the Lightning callbacks a training run needs inside an Optuna trial
  (pruning on val/loss); [] outside a sweep.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import optuna
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.pipeline_optuna_sweeper import current_trial, is_worker, last_summary
from hydra_plugins.pipeline_optuna_sweeper._hooks import before_workers, jobs_submitted, on_trial_lost
from hydra_plugins.pipeline_optuna_sweeper._interrupt import received
from hydra_plugins.pipeline_optuna_sweeper.storage import resolve_storage
from hydra_plugins.pipeline_optuna_sweeper.study import worker, worker_dead
from hydra_plugins.pipeline_optuna_sweeper.sweeper import format_summary
from pipeline.tracking.runs import PARENT_ENV, TRIAL_ENV
from pipeline.tracking.schema import TRIAL_RUN_ATTR, TRUE, Artifact, Metric, Tag, sweep_outcome, sweep_runs
from pipeline.tracking.stores import busy_timeout, prepared
from pipeline.tracking.uri import check_store, redact, resolve_tracking_uri, sqlite_path
from pipeline.tracking.views import ensure_experiment

log = logging.getLogger(__name__)

OBJECTIVE = Metric.VAL_LOSS


# -- inside a trial: pruning -------------------------------------------------------------------


class OptunaPruning(L.Callback):
    """Report `val/loss` to the trial after each validation; raise TrialPruned when the pruner
    says so (Optuna's median / Hyperband pruners compare it with other trials at that step)."""

    def __init__(self, trial: optuna.Trial, monitor: str = OBJECTIVE) -> None:
        self.trial, self.monitor = trial, monitor

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value, step = float(trainer.callback_metrics[self.monitor]), trainer.global_step
        self.trial.report(value, step=step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"{self.monitor}={value:.4f} at step {step}")


def trial_callbacks(cfg: DictConfig) -> list[L.Callback]:
    trial = current_trial()
    return [OptunaPruning(trial)] if trial is not None else []


def trial_trainer_kwargs() -> dict[str, Any]:
    """Trainer settings a sweep worker overrides: its output goes to a log file, and the
    coordinator draws the study's progress, so no per-trial progress bar."""
    return {"enable_progress_bar": False} if is_worker() else {}


def warm_up(uri: str, study: str) -> None:
    """What a worker pays once, before it claims its first trial rather than inside it: the
    store's connection (and its schema check) and experiment, the imports of a run (the runner,
    evaluation, matplotlib for the plots, Lightning's MLflow logger), the git commit and MLflow's
    run context. The sweeper then freezes the heap
    (hydra_plugins.pipeline_optuna_sweeper.workers.freeze_heap), these modules included."""
    import lightning.pytorch.loggers  # noqa: F401
    from mlflow.tracking.context.registry import resolve_tags

    import pipeline.evaluate  # noqa: F401
    import pipeline.run.runner  # noqa: F401
    import pipeline.tracking.plots  # noqa: F401
    from pipeline.tracking.runs import experiment, git_commit

    experiment(uri, study)  # prepared(): the busy timeout, the store migrated, the experiment
    git_commit()  # cached: the code a worker runs is the code it imported
    resolve_tags()  # MLflow's run context (source, git), found on a process's first run


# -- around the sweep: the MLflow parent run ----------------------------------------------------


class MLflowSweepCallback(HydraCallback):
    """Parent MLflow run of a Hydra multirun; its children are the jobs' training runs.

    The parent is created (or resumed) when the first job starts, so a sweep that launches
    nothing (every point invalid) leaves no run behind."""

    def __init__(self) -> None:
        self.uri: str | None = None
        self._client: Any = None
        self.config: DictConfig | None = None
        self.parent_id: str | None = None
        self.joined = False  # a worker process, in its coordinator's parent run

    @property
    def client(self) -> Any:
        from mlflow import MlflowClient

        if self._client is None:  # opening the store creates it: only once a job starts
            busy_timeout()  # before the client opens its first connection
            self._client = MlflowClient(self.uri)
        return self._client

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.uri = resolve_tracking_uri(OmegaConf.select(config, "tracking.uri"))
        check_store(self.uri, "MLflow store")  # before any point is checked or launched
        self.config = config
        on_trial_lost(self._end_lost_run)  # any process that claims trials may find a lost one
        if is_worker() and os.environ.get(PARENT_ENV):  # a worker process: its coordinator's run
            self.parent_id, self.joined = os.environ[PARENT_ENV], True
            warm_up(self.uri, str(config.study))
            return
        before_workers(self._ensure_parent)  # a coordinator's workers join the parent run

    def _ensure_parent(self) -> None:
        if self.uri is not None and self.parent_id is None:
            self._start_parent()

    def _start_parent(self) -> None:
        """Create the sweep's parent run, or resume the one of the same Optuna study."""
        config = self.config
        assert config is not None and self.uri is not None
        study = str(config.study)
        with prepared(self.uri):  # migrated once; two sweeps starting together find one parent
            exp_id = ensure_experiment(self.client, study)
            key = _optuna_study_key(config)
            tags = {
                Tag.SWEEP: TRUE,
                Tag.STUDY: study,
                Tag.SWEEPER: "optuna" if key else "basic",
                Tag.WORKER: worker(),
                Tag.RUN_NAME: f"sweep-{study}",
            }
            parent = self._find_parent(exp_id, key) if key else None
            if parent is None:
                self.parent_id = self.client.create_run(
                    exp_id, run_name=f"sweep-{study}", tags={**tags, **({Tag.OPTUNA_STUDY: key} if key else {})}
                ).info.run_id
            else:  # the same Optuna study again: resume its parent run
                self.parent_id = parent.info.run_id
                self._kill_orphans(exp_id, parent_dead=worker_dead(parent.data.tags.get(Tag.WORKER, "")))
                self.client.update_run(self.parent_id, status="RUNNING")
                self.client.set_tag(self.parent_id, Tag.WORKER, worker())
                log.info("resuming sweep parent run %s", self.parent_id)
        os.environ[PARENT_ENV] = self.parent_id
        atexit.register(self._close_at_exit)  # a sweep that raises never reaches on_multirun_end

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.uri is None:  # a single run (no multirun): nothing to number
            return
        if self.parent_id is None:
            self._start_parent()
        trial = current_trial()
        os.environ[TRIAL_ENV] = str(trial.number if trial is not None else config.hydra.job.num)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.uri is None:
            return
        if self.joined and last_summary() is None:  # a worker; the coordinator reports the sweep
            return
        if jobs_submitted():  # the submitted jobs' last worker reports it (a joined worker, above)
            log.info("sweep run %s stays open until the submitted workers finish", self.parent_id)
            self.parent_id = None
            return
        if self.parent_id is None:  # nothing launched this time: update a resumed sweep's parent only
            key = _optuna_study_key(config)
            if not (key and (sqlite_path(self.uri) is None or sqlite_path(self.uri).exists())):
                return
            exp = self.client.get_experiment_by_name(str(config.study))
            if not (key and exp and self._find_parent(exp.experiment_id, key)):
                return
            self._start_parent()
        summary = self._summary()
        c = self.client
        for name, value in summary["metrics"].items():
            c.log_metric(self.parent_id, name, value)
        for name, value in summary["tags"].items():
            c.set_tag(self.parent_id, name, value)
        c.log_text(self.parent_id, json.dumps(summary, indent=2, default=str), Artifact.SWEEP_SUMMARY_JSON)
        c.log_text(self.parent_id, summary["table"], Artifact.SWEEP_SUMMARY_TXT)
        out = Path("reports") / str(config.study)
        out.mkdir(parents=True, exist_ok=True)
        (out / Artifact.SWEEP_SUMMARY_TXT).write_text(summary["table"] + "\n")
        if last_summary() is None:  # the Optuna sweeper has logged its own table already
            print(summary["table"])
        still = (summary["optuna"] or {}).get("running", 0)
        if still:  # another command's workers are on the study: the last one to end closes it
            log.info("%d trials are still running in other workers; the sweep run stays open", still)
            self.parent_id = None
            return
        self._close("FINISHED")

    # -- helpers --------------------------------------------------------------------------------

    def _find_parent(self, exp_id: str, key: str) -> Any:
        runs = self.client.search_runs(
            [exp_id],
            filter_string=f"tags.{Tag.OPTUNA_STUDY} = '{key}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0] if runs else None

    def _children(self, exp_id: str | None = None) -> list[Any]:
        exp_id = exp_id or self.client.get_run(self.parent_id).info.experiment_id
        return self.client.search_runs(
            [exp_id], filter_string=f"tags.{Tag.PARENT_RUN_ID} = '{self.parent_id}'", max_results=10000
        )

    def _kill_orphans(self, exp_id: str, parent_dead: bool) -> None:
        """Child runs left RUNNING by a process that died (SIGKILL, power loss) end KILLED: those
        whose worker (tag host:pid) is gone, and those without the tag when the sweep's was."""
        for run in self._children(exp_id):
            owner = run.data.tags.get(Tag.WORKER)
            if run.info.status == "RUNNING" and (worker_dead(owner) if owner else parent_dead):
                self.client.set_tag(run.info.run_id, Tag.FAILURE_REASON, "interrupted: the sweep process died")
                self.client.set_terminated(run.info.run_id, status="KILLED")
                log.warning("child run %s was left RUNNING by a dead sweep: marked KILLED", run.info.run_id)

    def _end_lost_run(self, trial: optuna.trial.FrozenTrial) -> None:
        """The child run of a trial failed as stale (its worker sent no heartbeat: killed, or its
        machine gone) ends KILLED, like the run of an interrupted trial; its retry is a new run."""
        run_id = trial.user_attrs.get(TRIAL_RUN_ATTR)
        if not run_id or self.uri is None:
            return
        run = self.client.get_run(run_id)
        if run.info.status != "RUNNING":
            return
        reason = f"interrupted: {trial.user_attrs.get('fail_reason', 'worker lost')} (trial {trial.number})"
        self.client.set_tag(run_id, Tag.FAILURE_REASON, reason)
        self.client.set_terminated(run_id, status="KILLED")
        log.warning("child run %s of trial %d ended KILLED: its worker was lost", run_id, trial.number)

    def _summary(self) -> dict[str, Any]:
        runs = self._children()
        by_status: dict[str, int] = {}
        for r in runs:
            by_status[r.info.status] = by_status.get(r.info.status, 0) + 1
        metrics = {sweep_runs(s): float(n) for s, n in by_status.items()}
        tags: dict[str, str] = {}
        done = [r for r in runs if r.info.status == "FINISHED" and OBJECTIVE in r.data.metrics]
        if done:
            best = min(done, key=lambda r: r.data.metrics[OBJECTIVE])
            metrics[Metric.SWEEP_BEST_VAL_LOSS] = best.data.metrics[OBJECTIVE]
            tags.update({Tag.BEST_RUN_ID: best.info.run_id, Tag.BEST_RUN_NAME: best.info.run_name or ""})
        optuna_summary = last_summary()
        if optuna_summary is not None:
            for k, n in optuna_summary["counts"].items():
                metrics[sweep_outcome(k)] = float(n)
            if optuna_summary["best"]:
                b = optuna_summary["best"]
                tags.update({Tag.BEST_TRIAL: str(b["number"]), Tag.BEST_PARAMS: json.dumps(b["params"])})
            table = format_summary(optuna_summary)
        else:
            rows = sorted(runs, key=lambda r: r.data.metrics.get(OBJECTIVE, float("inf")))
            table = "\n".join(
                [f"{'run':<40} {'status':<9} {OBJECTIVE}"]
                + [
                    f"{(r.info.run_name or r.info.run_id):<40} {r.info.status:<9} "
                    f"{r.data.metrics.get(OBJECTIVE, float('nan')):.4f}"
                    for r in rows
                ]
                + [", ".join(f"{n} {s.lower()}" for s, n in sorted(by_status.items()))]
            )
        return {
            "metrics": metrics,
            "tags": tags,
            "table": table,
            "optuna": optuna_summary,
            "runs": {r.info.run_id: r.info.status for r in runs},
        }

    def _close_at_exit(self) -> None:
        # Stopped by SIGINT/SIGTERM: KILLED, like its interrupted child; else the sweep raised.
        self._close("KILLED" if received() is not None else "FAILED")

    def _close(self, status: str) -> None:
        if self.parent_id is None:
            return
        self.client.set_terminated(self.parent_id, status=status)
        os.environ.pop(PARENT_ENV, None)
        os.environ.pop(TRIAL_ENV, None)
        self.parent_id = None


def _optuna_study_key(config: DictConfig) -> str | None:
    """`<storage>#<study name>` for an Optuna sweep (what identifies a resumable sweep)."""
    sweeper = config.hydra.sweeper
    if str(sweeper.get("_target_", "")) != "hydra_plugins.pipeline_optuna_sweeper.sweeper.OptunaSweeper":
        return None
    name = sweeper.get("study_name") or config.hydra.job.name
    return f"{redact(resolve_storage(sweeper.get('storage')))}#{name}"

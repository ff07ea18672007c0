"""A Hydra sweeper on current Optuna: claim a trial, launch it as a Hydra job, tell the result.

The study is persistent, so rerunning the same command resumes it: finished trials are kept,
interrupted ones are retried (see study.py), and numbering continues. With `workers=N` this
process coordinates N worker processes that claim trials from the same study (workers.py).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
import math
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf, open_dict
from optuna.trial import Trial, TrialState

from . import _hooks, search_space
from . import heartbeat as heartbeat_lib
from . import study as study_lib
from . import workers as workers_lib
from ._errors import InvalidSweepError, SearchSpaceError, SweepFailedError
from ._interrupt import Interrupted, interruptible
from .search_space import SearchSpace
from .storage import open_storage, resolve_storage, retrying, store_lock

log = logging.getLogger(__name__)

# Trials of the jobs in flight, by Hydra job number: lets code inside an in-process job (the
# basic launcher) find its trial, e.g. to report intermediate values for pruning.
_ACTIVE: dict[int, Trial] = {}
_LAST_SUMMARY: dict[str, Any] | None = None


def current_trial() -> Trial | None:
    """The Optuna trial of the Hydra job running in this process, or None outside a sweep."""
    if not _ACTIVE:
        return None
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    num = OmegaConf.select(HydraConfig.get(), "job.num")
    return _ACTIVE.get(num) if num is not None else None


def last_summary() -> dict[str, Any] | None:
    """The summary of the last sweep in this process (see OptunaSweeper.summary)."""
    return _LAST_SUMMARY


@dataclass
class _Study:
    study: optuna.Study
    space: SearchSpace
    target: int  # trials the study should hold
    is_grid: bool


class OptunaSweeper(Sweeper):
    def __init__(
        self,
        params: dict[str, Any] | None = None,
        sampler: str = "auto",
        seed: int | None = None,
        sampler_kwargs: dict[str, Any] | None = None,
        pruner: str = "none",
        pruner_kwargs: dict[str, Any] | None = None,
        direction: str = "minimize",
        n_trials: int | None = None,
        n_jobs: int = 1,
        storage: str | None = None,
        study_name: str | None = None,
        validate: str | None = None,
        retry_failed: bool = False,
        per: list[str] | None = None,
        workers: int | str = 0,
        threads_per_worker: int | str = "auto",
        slots_per_gpu: int = 1,
        calibrate: str | None = None,
        heartbeat_interval: int | None = 10,
        grace_period: int | None = 30,
        max_retry: int = 2,
    ) -> None:
        super().__init__()
        self.params = {k: _as_override_value(v) for k, v in (params or {}).items()}
        self.sampler_name, self.seed = sampler, seed
        self.sampler_kwargs = dict(sampler_kwargs or {})
        self.pruner_name, self.pruner_kwargs = pruner, dict(pruner_kwargs or {})
        if direction not in ("minimize", "maximize"):
            raise SearchSpaceError(f"hydra.sweeper.direction={direction!r}; valid: minimize, maximize")
        self.direction = direction
        if n_trials is not None and n_trials < 1:
            raise SearchSpaceError(f"hydra.sweeper.n_trials={n_trials}; must be >= 1 (or null)")
        if n_jobs < 1:
            raise SearchSpaceError(f"hydra.sweeper.n_jobs={n_jobs}; must be >= 1")
        self.n_trials, self.n_jobs = n_trials, n_jobs
        self.storage, self.study_name = storage, study_name
        self.validate: Callable[[DictConfig], None] | None = get_method(validate) if validate else None
        self.retry_failed = retry_failed
        self.per = list(per or [])
        self.workers = workers_lib.check_setting("workers", workers)
        self.threads_per_worker = workers_lib.check_setting("threads_per_worker", threads_per_worker)
        if slots_per_gpu < 1:
            raise SearchSpaceError(f"hydra.sweeper.slots_per_gpu={slots_per_gpu}; must be >= 1")
        self.slots_per_gpu = slots_per_gpu
        self.calibrate: Callable[[DictConfig, int], tuple[int, int]] | None = (
            get_method(calibrate) if calibrate else None
        )
        try:
            self.heartbeat = heartbeat_lib.Settings(heartbeat_interval, grace_period, max_retry)
        except ValueError as e:
            raise SearchSpaceError(str(e)) from None
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher = None
        self._checked: dict[tuple[str, ...], str | None] = {}  # overrides -> why invalid (None: valid)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        _compose_once(hydra_context.config_loader)

    # -- the sweep -----------------------------------------------------------------------------

    def sweep(self, arguments: list[str]) -> dict[str, Any]:
        assert self.config is not None and self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        space = search_space.parse([f"{k}={v}" for k, v in self.params.items()] + arguments, parser)
        sweep_dir = Path(self.config.hydra.sweep.dir).absolute()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        worker = workers_lib.is_worker()
        _hooks.clear_submitted()
        if not worker:
            saved = copy.deepcopy(self.config)
            if saved.hydra.sweeper.get("storage"):  # the sweep's record never shows a password
                saved.hydra.sweeper.storage = _shown(saved.hydra.sweeper.storage)
            for kind in ("hydra", "task"):  # ... nor do the overrides it records
                saved.hydra.overrides[kind] = [_shown_override(o) for o in saved.hydra.overrides[kind]]
            OmegaConf.save(saved, sweep_dir / "multirun.yaml")

        studies = self._studies(space)
        if not worker:
            self._refuse_if_all_invalid(studies)
        try:
            with interruptible():
                opened = [self._open(name, sub) for name, sub in studies]
                submit = getattr(self.launcher, "submit_workers", None)  # hydra/launcher=submitit_*
                if worker:
                    workers_lib.freeze_heap()  # a worker process runs trials until the study is done
                    for s in opened:
                        self._work(s, progress=None)
                    if not (workers_lib.is_submitted() and _settled(opened)):
                        return {}  # the coordinator, or the last submitted worker, reports the study
                elif submit is not None:
                    if _trials_left(opened):
                        self._submit(submit, opened, sweep_dir)
                        return {}  # the jobs run the study; this command only submitted them
                elif self.workers:
                    self._coordinate(opened, sweep_dir)
                else:
                    for s in opened:
                        self._work(s, _Progress(s.target))
        except Interrupted as e:
            if not worker:
                self._say_how_to_resume(e)
            raise
        summary = merge_summaries(self.resolve_study_name(), [self.summary(s.study, s.target) for s in opened])
        global _LAST_SUMMARY
        _LAST_SUMMARY = summary
        (sweep_dir / "optuna_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        log.info("\n%s", format_summary(summary))
        if worker:  # the last submitted worker: the summary goes to the MLflow parent run
            return summary
        counts = summary["counts"]
        launched = counts["complete"] + counts["pruned"] + counts["failed"]
        if counts["skipped"] and not launched:
            # Every point skipped is a broken sweep (a typo in an override), not a result.
            first = next(t for t in summary["trials"] if t["outcome"] == "skipped")
            raise InvalidSweepError(
                f"all {counts['skipped']} points were skipped as invalid, nothing was launched; "
                f"trial {first['number']}: {first['reason']}"
            )
        if counts["failed"]:
            # Hydra calls on_multirun_end only when the sweep returns; the callbacks (e.g. the
            # MLflow parent run) must still see the end of a sweep that ends in an error.
            self.hydra_context.callbacks.on_multirun_end(config=self.config)
            raise SweepFailedError(
                f"{counts['failed']} of {summary['n_trials']} trials failed "
                f"(reasons in the log above and in the trials' user attribute fail_reason)"
            )
        return summary

    def _refuse_if_all_invalid(self, studies: list[tuple[str, SearchSpace]]) -> None:
        """A grid whose every point is invalid is a broken command (a typo in an override):
        refuse it before any study, trial or run exists. A space with intervals cannot be
        listed; its points are checked one by one as they are asked (`_ask`)."""
        n, first = 0, None
        for _, space in studies:
            if not space.is_discrete:
                return
            grid = space.grid()
            for values in itertools.product(*grid.values()):
                overrides = space.overrides(dict(zip(grid, values)))
                reason = self._invalid(overrides)
                if reason is None:
                    return
                n, first = n + 1, first or (overrides, reason)
        assert first is not None
        raise InvalidSweepError(
            f"all {n} points were skipped as invalid, nothing was launched; {' '.join(first[0])}: {first[1]}"
        )

    def _say_how_to_resume(self, e: Interrupted) -> None:
        """One line: what stopped the sweep, what is kept, and the command that resumes it."""
        from pipeline.tracking.uri import redact

        command = shlex.join(getattr(sys, "orig_argv", sys.argv))
        print(
            f"sweep {self.resolve_study_name()!r} stopped by {e}: finished trials are kept in "
            f"{redact(resolve_storage(self.storage))} and the interrupted ones run again when you "
            f"resume with: {command}",
            file=sys.stderr,
            flush=True,
        )

    def _studies(self, space: SearchSpace) -> list[tuple[str, SearchSpace]]:
        """One (study name, search space) per combination of the `per` dimensions."""
        name = self.resolve_study_name()
        per = [d for d in space.dimensions if d.name in self.per]
        missing = sorted(set(self.per) - {d.name for d in per})
        if missing:
            raise SearchSpaceError(
                f"hydra.sweeper.per names {missing}, which are not swept; swept: {[d.name for d in space.dimensions]}"
            )
        if any(d.grid is None for d in per):
            raise SearchSpaceError("hydra.sweeper.per needs discrete dimensions (choice, range, a,b)")
        inner = [d for d in space.dimensions if d.name not in self.per]
        out = []
        for values in itertools.product(*(d.grid for d in per)):
            fixed = [f"{d.name}={Override._get_value_element_as_str(v)}" for d, v in zip(per, values)]
            label = ",".join(o for o in fixed)
            out.append((f"{name}/{label}" if per else name, SearchSpace(inner, fixed + space.fixed)))
        return out

    def _open(self, study_name: str, space: SearchSpace) -> _Study:
        """Create or load one study; the first process in (not a worker) also fails the trials
        of dead workers, queues retries and enqueues the grid, all under the store lock."""
        sampler = study_lib.make_sampler(self.sampler_name, self.seed, self.sampler_kwargs, space)
        is_grid = isinstance(sampler, optuna.samplers.GridSampler)
        target = self.n_trials or (space.grid_size() if is_grid else 20)
        storage = open_storage(self.storage, self.heartbeat.storage_kwargs())
        with store_lock(resolve_storage(self.storage)):
            study = optuna.create_study(
                storage=storage,
                study_name=study_name,
                sampler=sampler,
                pruner=study_lib.make_pruner(self.pruner_name, self.pruner_kwargs),
                direction=self.direction,
                load_if_exists=True,
            )
            if self.seed is not None and not is_grid and study.trials:
                # Resumed: a sampler seeded as before would propose the first trials' points again.
                study.sampler = study_lib.make_sampler(
                    self.sampler_name, self.seed + len(study.trials), self.sampler_kwargs, space
                )
            if not workers_lib.is_worker():
                study_lib.recover(study, self.retry_failed)
                if is_grid:
                    study_lib.enqueue_grid(study, sampler, space, self.n_trials)
        log.info(
            "Optuna study %r (%s): %s, %d trials, dimensions: %s",
            study.study_name,
            _shown(self.storage),
            type(sampler).__name__,
            target,
            ", ".join(d.name for d in space.dimensions) or "-",
        )
        return _Study(study, space, target, is_grid)

    def _work(self, s: _Study, progress: _Progress | None) -> None:
        """Claim and run trials of one study until none is left to claim (or, in a worker,
        until its coordinator is gone: an orphan finishes its trial and claims no other).
        With the heartbeat on, a worker with nothing to claim stays while other workers' trials
        run: if one of them dies, its trial goes stale and this worker runs the retry."""
        while workers_lib.coordinator_alive():
            batch = self._claim(s, progress)
            if batch:
                self._run(s.study, batch, progress)
            elif heartbeat_lib.awaited(s.study):
                time.sleep(1.0)  # not the interval: this worker is done as soon as the others are
            else:
                break

    def _coordinate(self, opened: list[_Study], sweep_dir: Path) -> None:
        """Start the workers, draw the progress line until they exit, stop them on an error."""
        assert self.config is not None
        cpus = workers_lib.usable_cpus()
        measure = None
        if self.calibrate is not None:
            measure = calibration(self.config, self.calibrate, cpus)
        slots = workers_lib.plan(
            self.workers, self.threads_per_worker, workers_lib.visible_gpus(), self.slots_per_gpu, cpus, measure
        )
        cmd = workers_lib.command(self.config, sweep_dir)
        log_dir = sweep_dir / "workers"
        log.info("%d workers (logs in %s): %s", len(slots), log_dir, "; ".join(s.label() for s in slots))
        total = sum(s.target for s in opened)
        progress = workers_lib.Progress(self.resolve_study_name(), total, len(slots))
        studies = [s.study for s in opened]
        _hooks.starting_workers()  # e.g. the MLflow parent run, which the workers join
        running = [workers_lib.start(cmd, slot, log_dir) for slot in slots]
        crashed: list[str] = []
        try:
            while running:
                time.sleep(1.0)
                progress.update(studies)
                for w in [w for w in running if w.proc.poll() is not None]:
                    running.remove(w)
                    if w.proc.returncode == 0:
                        continue
                    crashed.append(f"worker {w.slot.index} exited with {w.proc.returncode} ({w.log_path})")
                    log.error("%s; last lines:\n%s", crashed[-1], workers_lib.tail(w.log_path))
                    with store_lock(resolve_storage(self.storage)):
                        for s in studies:  # its trial goes back to the queue
                            study_lib.recover(s, retry_failed=False)
                    if _n_waiting(studies) and len(crashed) <= len(slots):  # a replacement, not a crash loop
                        running.append(workers_lib.start(cmd, w.slot, log_dir))
        except BaseException:
            workers_lib.stop(running)
            raise
        finally:
            progress.update(studies)
            progress.close()
        left = _n_waiting(studies)
        if crashed and left:
            raise SweepFailedError(
                f"{'; '.join(crashed)}; {left} trials are still queued: run the command again to finish them"
            )

    def _submit(self, submit: Callable[..., list[str]], opened: list[_Study], sweep_dir: Path) -> None:
        """Submit worker jobs (no more than there are trials to run) and return at once; each
        job runs `workers` workers (0: auto, one per GPU or CPU core of the job)."""
        assert self.config is not None
        _hooks.starting_workers()  # the MLflow parent run, which the jobs' workers join
        submit(
            command=workers_lib.command(self.config, sweep_dir),
            sweep_dir=sweep_dir,
            trials_left=_trials_left(opened),
            workers=self.workers or "auto",
            threads=self.threads_per_worker,
            slots_per_gpu=self.slots_per_gpu,
            name=self.resolve_study_name(),
        )
        _hooks.submitted()

    def resolve_study_name(self) -> str:
        assert self.config is not None
        return self.study_name or str(self.config.hydra.job.name)

    def _claim(self, s: _Study, progress: _Progress | None) -> list[tuple[Trial, list[str]]]:
        """Claim up to n_jobs trials; skip (tell FAIL, `skipped`) those whose config is invalid."""
        batch = []
        # Trials of lost workers first: failed and queued again, they are claimed like the rest.
        retrying(lambda: heartbeat_lib.fail_stale(s.study, self.heartbeat), "failing stale trials")
        while len(batch) < self.n_jobs:
            trial = retrying(lambda: study_lib.claim(s.study), "claiming a trial")
            if trial is None and not s.is_grid:
                trial = self._ask_new(s)
            if trial is None:
                break
            heartbeat_lib.begin(s.study._storage, trial._trial_id)
            overrides = s.space.overrides(s.space.suggest(trial))
            trial.set_user_attr("overrides", " ".join(overrides))
            reason = self._invalid(overrides)
            if reason is not None:
                log.warning("trial %d skipped: %s (%s)", trial.number, reason, " ".join(overrides))
                trial.set_user_attr("skipped", reason)
                study_lib.tell(s.study, trial, state=TrialState.FAIL)
                if progress is not None:
                    progress.update(s.study, trial.number, "skipped", None, launched=False)
            else:
                batch.append((trial, overrides))
        return batch

    def _ask_new(self, s: _Study) -> Trial | None:
        """A new trial from the sampler while the study holds fewer than its target (finished,
        running and queued trials all count, so workers together never overshoot)."""
        with store_lock(resolve_storage(self.storage)):
            c = study_lib.counts(s.study)
            held = sum(c[k] for k in study_lib.OUTCOMES) + c["running"] + c["waiting"]
            if held >= s.target:
                return None
            with heartbeat_lib.quiet():
                trial = s.study.ask()
            s.study._storage.set_trial_system_attr(trial._trial_id, "worker", study_lib.worker())
            return trial

    def _invalid(self, overrides: list[str]) -> str | None:
        """Why this trial's config cannot run, found without launching it; None if it can."""
        key = tuple(overrides)
        if key not in self._checked:
            self._checked[key] = self._check(overrides)
        return self._checked[key]

    def _check(self, overrides: list[str]) -> str | None:
        assert self.config is not None and self.hydra_context is not None
        return check_point(self.hydra_context.config_loader, self.config, overrides, self.validate)

    def _run(self, study: optuna.Study, batch: list[tuple[Trial, list[str]]], progress: _Progress | None) -> None:
        assert self.launcher is not None
        numbers = [trial.number for trial, _ in batch]
        if numbers != list(range(numbers[0], numbers[0] + len(batch))):
            for one in batch:  # the job number is the trial number: run them one by one
                self._run(study, [one], progress)
            return
        # Hydra's job number is the trial number, unique across workers sharing a sweep folder.
        first = numbers[0]
        _ACTIVE.update({trial.number: trial for trial, _ in batch})
        told: set[int] = set()
        try:
            for trial, overrides in batch:
                log.info("trial %d: %s", trial.number, " ".join(overrides))
            tic = time.perf_counter()
            with heartbeat_lib.Beating(study._storage, [trial._trial_id for trial, _ in batch]):
                results = self.launcher.launch([o for _, o in batch], initial_job_idx=first)
            elapsed = (time.perf_counter() - tic) / len(batch)
            for (trial, _), ret in zip(batch, results):
                state, value = self._tell(study, trial, ret)
                told.add(trial.number)
                if progress is not None:
                    progress.update(study, trial.number, state, value, launched=True, seconds=elapsed)
        except BaseException as e:
            # Ctrl-C, or a launcher error: these trials did not fail on their own, so the
            # next run retries them.
            for trial, _ in batch:
                if trial.number not in told:
                    why = str(e) if isinstance(e, Interrupted) else f"{type(e).__name__}: {e}"
                    reason = f"interrupted: {why}"
                    study_lib.tell(study, trial, state=TrialState.FAIL, interrupted=True, fail_reason=reason[:1000])
            raise
        finally:
            for number in numbers:
                _ACTIVE.pop(number, None)

    def _tell(self, study: optuna.Study, trial: Trial, ret: JobReturn) -> tuple[str, float | None]:
        if ret.status == JobStatus.COMPLETED:
            value = ret.return_value
            try:
                value = float(value)
            except (TypeError, ValueError):
                return self._fail(study, trial, f"the task returned {value!r}, not a number (the objective)")
            if not math.isfinite(value):
                return self._fail(study, trial, f"the objective is {value}")
            if not study_lib.tell(study, trial, value):
                return "lost", None
            return "complete", value
        error = ret._return_value
        if isinstance(error, optuna.TrialPruned):
            study_lib.tell(study, trial, state=TrialState.PRUNED)
            log.info("trial %d pruned: %s", trial.number, error)
            return "pruned", None
        log.error("trial %d failed", trial.number, exc_info=error)
        return self._fail(study, trial, f"{type(error).__name__}: {error}")

    @staticmethod
    def _fail(study: optuna.Study, trial: Trial, reason: str) -> tuple[str, None]:
        if not study_lib.tell(study, trial, state=TrialState.FAIL, fail_reason=reason[:1000]):
            return "lost", None
        log.warning("trial %d FAILED: %s", trial.number, reason)
        return "failed", None

    # -- the end ------------------------------------------------------------------------------

    def summary(self, study: optuna.Study, target: int) -> dict[str, Any]:
        trials = study_lib.latest_attempts(study)
        counts = {k: 0 for k in study_lib.OUTCOMES}
        counts.update(study_lib.counts(study))
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        best = None
        if complete:
            b = (
                min(complete, key=lambda t: t.value)
                if self.direction == "minimize"
                else max(complete, key=lambda t: t.value)
            )
            best = {"number": b.number, "value": b.value, "params": b.params}
        return {
            "study": study.study_name,
            "storage": _shown(self.storage),
            "direction": self.direction,
            "n_trials": target,
            "counts": counts,
            "running": len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))),
            "best": best,
            "trials": [
                {
                    "number": t.number,
                    "outcome": study_lib.outcome(t),
                    "value": t.value,
                    "params": t.params,
                    "reason": t.user_attrs.get("skipped") or t.user_attrs.get("fail_reason"),
                }
                for t in trials
            ],
        }


def _compose_once(loader: Any) -> None:
    """Let the launcher reuse the config `_invalid` composed for the same trial. Composing is
    the largest cost of a trial outside training and evaluation (about a third of it, profiled
    on the CPU budget: benchmarks/trial_overhead.py), and Hydra's launcher composes again what
    the sweeper just composed to validate. One entry: the config of the last composition, handed out once."""
    if getattr(loader, "_pipeline_compose_once", False):
        return
    compose = loader.load_sweep_config
    last: dict[tuple[int, tuple[str, ...]], DictConfig] = {}

    def load_sweep_config(master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        key = (id(master_config), tuple(sweep_overrides))
        if key in last:
            return last.pop(key)
        cfg = compose(master_config, sweep_overrides)
        last.clear()
        last[key] = copy.deepcopy(cfg)
        return cfg

    loader.load_sweep_config = load_sweep_config
    loader._pipeline_compose_once = True


def _trials_left(opened: list[_Study]) -> int:
    """Trials still to run: queued ones, and for a sampler that asks, those below the target."""
    left = 0
    for s in opened:
        c = study_lib.counts(s.study)
        held = sum(c[k] for k in study_lib.OUTCOMES) + c["running"] + c["waiting"]
        left += c["waiting"] + (0 if s.is_grid else max(s.target - held, 0))
    return left


def _settled(opened: list[_Study]) -> bool:
    """Nothing left to run and nothing running: the study's last worker may report it."""
    if _trials_left(opened):
        return False
    return not any(s.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) for s in opened)


def _n_waiting(studies: list[optuna.Study]) -> int:
    return sum(len(s.get_trials(deepcopy=False, states=(TrialState.WAITING,))) for s in studies)


def check_point(
    config_loader: Any, config: DictConfig, overrides: Sequence[str], validate: Callable[[DictConfig], None] | None
) -> str | None:
    """Why the job `overrides` would run cannot run, found without launching it; None if it can:
    its config must compose, and `validate` (when given) must accept it."""
    try:
        cfg = config_loader.load_sweep_config(config, list(overrides))
    except Exception as e:  # e.g. a config-group option that does not exist
        return f"config does not compose: {_one_line(e)}"
    if validate is None:
        return None
    try:
        with _as_job(cfg) as task_cfg:
            validate(task_cfg)
    except Exception as e:
        return f"{type(e).__name__}: {_one_line(e)}"
    return None


def calibration(
    config: DictConfig, calibrate: Callable[[DictConfig, int], tuple[int, int]], cpus: int
) -> Callable[[], tuple[int, int]]:
    """The `measure` of workers_lib.plan: the study's `calibrate` hook on its task config, with
    ${hydra:...} resolvable as in a trial (a study may take its steps from its levels that way)."""

    def measure() -> tuple[int, int]:
        # A copy: HydraConfig.set_config marks the hydra node of what it is given read-only.
        with _as_job(copy.deepcopy(config)) as task_cfg:
            return calibrate(task_cfg, cpus)

    return measure


@contextlib.contextmanager
def _as_job(cfg: DictConfig) -> Iterator[DictConfig]:
    """The task config of `cfg` (its `hydra` node removed), with HydraConfig set to `cfg` as in
    a job (hydra.core.utils.run_job), so that ${hydra:...} resolves against this point."""
    from hydra.core.hydra_config import HydraConfig

    saved = HydraConfig.instance().cfg
    try:
        HydraConfig.instance().set_config(cfg)
        task_cfg = copy.deepcopy(cfg)
        with open_dict(task_cfg):
            del task_cfg["hydra"]
        yield task_cfg
    finally:
        HydraConfig.instance().cfg = saved


def _shown(storage: str | None) -> str:
    """The storage URL as logs and summaries show it: its password hidden."""
    from pipeline.tracking.uri import redact

    return redact(resolve_storage(storage))


def _shown_override(override: str) -> str:
    from pipeline.tracking.uri import redact

    key, sep, value = override.partition("=")
    return f"{key}{sep}{redact(value)}" if sep else override


def _one_line(e: BaseException) -> str:
    """Hydra's multi-line messages (option lists, search paths) as one line, for a trial's reason."""
    from pipeline.errors import one_line

    return one_line(e)


def _n_counted(study: optuna.Study) -> int:
    c = study_lib.counts(study)
    return sum(c[k] for k in study_lib.OUTCOMES)


def _as_override_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    return "null" if v is None else str(v)


class _Progress:
    """One line per trial: `trial 7/90 complete 3.214 | complete 6 failed 1 ... | ETA 12m`."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.durations: list[float] = []

    def update(
        self, study: optuna.Study, number: int, state: str, value: float | None, launched: bool, seconds: float = 0.0
    ) -> None:
        if launched:
            self.durations.append(seconds)
        c = study_lib.counts(study)
        done = sum(c[k] for k in study_lib.OUTCOMES)
        left = max(self.total - done, 0)
        eta = workers_lib.hms(left * sum(self.durations) / len(self.durations)) if self.durations else "?"
        shown = f"{value:.4f}" if value is not None else ""
        counts = " ".join(f"{k} {c[k]}" for k in study_lib.OUTCOMES)
        log.info(
            "[sweep %s] trial %d (%d of %d) %s %s | %s | %s left, ETA %s",
            study.study_name,
            number,
            done,
            self.total,
            state,
            shown,
            counts,
            left,
            eta,
        )


def merge_summaries(name: str, studies: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary over the studies of a sweep (one study unless `per` is set)."""
    if len(studies) == 1:
        return {**studies[0], "studies": studies}
    counts = {k: sum(s["counts"][k] for s in studies) for k in study_lib.OUTCOMES}
    bests = [s["best"] | {"study": s["study"]} for s in studies if s["best"]]
    best = None
    if bests:
        pick = min if studies[0]["direction"] == "minimize" else max
        best = pick(bests, key=lambda b: b["value"])
    return {
        "study": name,
        "storage": studies[0]["storage"],
        "direction": studies[0]["direction"],
        "n_trials": sum(s["n_trials"] for s in studies),
        "counts": counts,
        "running": sum(s["running"] for s in studies),
        "best": best,
        "trials": [t | {"study": s["study"]} for s in studies for t in s["trials"]],
        "studies": studies,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """Per study: a plain-text table of its trials, its counts and its best trial."""
    return "\n\n".join(_format_study(s) for s in summary.get("studies", [summary]))


def _format_study(summary: dict[str, Any]) -> str:
    names = sorted({k for t in summary["trials"] for k in t["params"]})
    header = ["trial", "outcome", "value", *names, "reason"]
    rows = [
        [
            str(t["number"]),
            t["outcome"],
            "" if t["value"] is None else f"{t['value']:.4f}",
            *[str(t["params"].get(n, "")) for n in names],
            (t["reason"] or "")[:60],
        ]
        for t in summary["trials"]
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    c = summary["counts"]
    lines.append(f"study {summary['study']}: " + ", ".join(f"{c[k]} {k}" for k in study_lib.OUTCOMES))
    if summary["best"]:
        b = summary["best"]
        lines.append(f"best: trial {b['number']} value {b['value']:.4f} {b['params']}")
    return "\n".join(lines)

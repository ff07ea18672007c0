"""`hydra/launcher=submitit_slurm` (and `submitit_local`): the study's workers as submitit jobs.

The sweeping command prepares the stores as always (the Optuna study with its queued grid,
the MLflow parent run), submits `jobs` worker jobs through submitit (on SLURM one job array),
prints their ids and how to follow them, and exits: nothing waits for the cluster. Each job
runs sweep workers (_submitit_job.py) that claim trials from the shared Optuna storage until
none is left; the last worker to finish writes the summary and closes the MLflow parent run.
Inside a worker this launcher runs its claimed trial in-process, as Hydra's basic launcher does.

Why not hydra-submitit-launcher 1.2.0: it works with hydra-core 1.3, but submits one job per
trial (an array per batch the sweeper hands it) and waits for their results, so the sweeping
command blocks for the whole study and every trial waits in the cluster's queue; here the
queue is Optuna's storage and one job runs many trials.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.utils import JobReturn
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from . import workers as workers_lib
from ._errors import LauncherSettingError

log = logging.getLogger(__name__)

CLUSTERS = ("slurm", "local")
SWEEPER = "hydra_plugins.pipeline_optuna_sweeper.sweeper.OptunaSweeper"


class SubmititWorkersLauncher(BasicLauncher):
    def __init__(self, **settings: Any) -> None:
        super().__init__()
        self.settings = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in settings.items()}
        check_settings(self.settings)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        if workers_lib.is_worker():
            return
        name = f"hydra/launcher=submitit_{self.settings['cluster']}"
        if str(config.hydra.sweeper.get("_target_")) != SWEEPER:
            raise LauncherSettingError(
                f"{name} submits workers of an Optuna study; add hydra/sweeper=optuna (or use an ablation=... study)"
            )
        if self.settings["cluster"] == "slurm" and shutil.which("sbatch") is None:
            raise LauncherSettingError(
                f"{name}: there is no `sbatch` on PATH; submit from a SLURM login node, "
                "or try the same jobs on this machine with hydra/launcher=submitit_local"
            )

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """A worker's trial, in this process. Outside a worker the sweeper submits jobs instead."""
        if not workers_lib.is_worker():
            raise LauncherSettingError("hydra/launcher=submitit_* runs trials only inside its submitted workers")
        return super().launch(job_overrides, initial_job_idx)

    def submit_workers(
        self,
        command: list[str],
        sweep_dir: Path,
        trials_left: int,
        workers: int | str,
        threads: int | str,
        slots_per_gpu: int,
        name: str,
    ) -> list[str]:
        """Submit `jobs` worker jobs, no more than `trials_left` (one array on SLURM); print
        and return their ids."""
        from ._submitit_job import WorkerJob

        s = self.settings
        n_jobs = min(s["jobs"], trials_left)
        env = {k: v for k, v in os.environ.items() if k.startswith("PIPELINE_")}
        job = WorkerJob(
            command=command,
            cwd=os.getcwd(),
            env=env,
            log_dir=str(sweep_dir / "workers"),
            workers=workers,
            threads=threads,
            slots_per_gpu=slots_per_gpu,
            gpus=s["gpus_per_job"],
            stop_grace_s=0.75 * s["signal_delay_s"],
        )
        executor = self._executor(name)
        if s["cluster"] == "local":
            # submitit's local controllers inherit this process's stdout and stderr: a pipe
            # (`| tee`, a test capturing output) would stay open until the jobs end.
            with _stdio_to(Path(executor.folder).parent / "controllers.log"):
                jobs = executor.submit_array([job] * n_jobs)
        else:
            jobs = executor.submit_array([job] * n_jobs)
        ids = [j.job_id for j in jobs]
        print(self._follow(ids, sweep_dir, name), flush=True)
        return ids

    def _executor(self, name: str) -> Any:
        import submitit

        s = self.settings
        folder = s["folder"]
        if s["cluster"] == "local":
            ex = submitit.LocalExecutor(folder=folder, max_num_timeout=s["max_num_timeout"])
            local = {"timeout_min": s["timeout_min"], "gpus_per_node": s["gpus_per_job"]}
            ex.update_parameters(**local, signal_delay_s=s["signal_delay_s"], setup=s["setup"])
            return ex
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=s["max_num_timeout"])
        params = {
            "job_name": s["name"] or name,
            "time": s["timeout_min"],
            "cpus_per_task": s["cpus_per_job"],
            "gpus_per_node": s["gpus_per_job"] or None,
            "mem": None if s["mem_gb"] is None else f"{int(s['mem_gb'] * 1024)}MB",
            "partition": s["partition"],
            "account": s["account"],
            "qos": s["qos"],
            "constraint": s["constraint"],
            "array_parallelism": s["array_parallelism"],
            "signal_delay_s": s["signal_delay_s"],
            "setup": s["setup"] or None,
            "additional_parameters": s["additional_parameters"] or None,
        }
        ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
        return ex

    def _follow(self, ids: list[str], sweep_dir: Path, name: str) -> str:
        """What was submitted, and the commands that follow, cancel and resume it."""
        workers_dir = sweep_dir / "workers"
        submitit_dir = Path(self.settings["folder"]).parent
        resume = shlex.join(getattr(sys, "orig_argv", sys.argv))
        if self.settings["cluster"] == "slurm":
            array = sorted({i.split("_")[0] for i in ids})
            follow = [
                f"  follow:  squeue -j {','.join(array)}   (after: sacct -j {','.join(array)})",
                f"  cancel:  scancel {' '.join(array)}",
            ]
        else:
            follow = [f"  follow:  ps -o pid,etime,args -p {','.join(ids)}", f"  cancel:  kill {' '.join(ids)}"]
        return "\n".join(
            [
                f"[sweep {name}] submitted {len(ids)} worker jobs ({self.settings['cluster']}): {' '.join(ids)}",
                *follow,
                f"  logs:    tail -f {workers_dir}/<job id>/worker-*.log   (submitit's: {submitit_dir})",
                "  results: the MLflow parent run (make ui); the last worker to finish writes the summary",
                f"  resume:  {resume}   (retries interrupted trials, submits workers for what is left)",
            ]
        )


@contextmanager
def _stdio_to(path: Path) -> Iterator[None]:
    """File descriptors 1 and 2 point at `path` within the block (child processes inherit it)."""
    sys.stdout.flush()
    sys.stderr.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(path, "ab") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
        yield
    finally:
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)


def check_settings(s: dict[str, Any]) -> None:
    """Every hydra.launcher setting, before anything is submitted: one line for the first bad one."""

    def bad(key: str, what: str) -> LauncherSettingError:
        return LauncherSettingError(f"hydra.launcher.{key}={s[key]!r} is not valid; {what}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if s["cluster"] not in CLUSTERS:
        raise bad("cluster", f"use one of {', '.join(CLUSTERS)}")
    for key, low in (("jobs", 1), ("timeout_min", 1), ("cpus_per_job", 1), ("gpus_per_job", 0)):
        if not is_int(s[key]) or s[key] < low:
            raise bad(key, f"use an integer >= {low}")
    for key, low in (("signal_delay_s", 0), ("max_num_timeout", 0)):
        if not is_int(s[key]) or s[key] < low:
            raise bad(key, f"use an integer >= {low}")
    if s["signal_delay_s"] >= 60 * s["timeout_min"]:
        raise bad("signal_delay_s", f"it must be shorter than timeout_min={s['timeout_min']} minutes")
    if s["array_parallelism"] is not None and (not is_int(s["array_parallelism"]) or s["array_parallelism"] < 1):
        raise bad("array_parallelism", "use an integer >= 1 or null")
    if s["mem_gb"] is not None and not (isinstance(s["mem_gb"], (int, float)) and s["mem_gb"] > 0):
        raise bad("mem_gb", "use a positive number of GB or null")
    if not isinstance(s["setup"], list) or not all(isinstance(line, str) for line in s["setup"]):
        raise bad("setup", "use a list of shell lines")
    if not isinstance(s["additional_parameters"], dict):
        raise bad("additional_parameters", "use a mapping of sbatch options, e.g. {mail-type: END}")

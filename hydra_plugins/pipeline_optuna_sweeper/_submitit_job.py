"""What one submitted worker job runs (hydra/launcher=submitit_*): sweep workers on the study.

submitit pickles a `WorkerJob` and calls it on the node. It starts the job's workers, copies
of the sweeping command with PIPELINE_SWEEP_WORKER set (workers.py), and waits for them; each
claims trials from the Optuna storage until none is left. The process is a supervisor only:
trials run in the workers, so a worker crash never takes the job's other workers with it.

Signals. SLURM signals every process of a job itself (scancel, the time limit), so on SLURM the
workers get SIGTERM directly; submitit's local controller signals only this process, so there
it is passed on. Before the time limit, or on preemption, submitit sends its preemption signal
(USR2 by default; https://github.com/facebookincubator/submitit/blob/main/docs/checkpointing.md)
and calls `checkpoint`: the workers, which ignore that signal, get SIGINT and end their trials
as interrupted (Optuna FAIL `interrupted`, MLflow KILLED; the next submit retries them), and
the job is requeued to go on with the queue.

The module name starts with "_" so that Hydra's plugin scan does not execute it a second time:
a class defined twice would be pickled by value instead of by reference.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import workers as workers_lib

# Lightning treats a process with SLURM_NTASKS as one rank of an srun launch
# (lightning.fabric.plugins.environments.SLURMEnvironment.detect); a worker is not one: it is
# a single-process trial, or launches its own DDP ranks.
HIDDEN_FROM_WORKERS = ("SLURM_NTASKS", "SLURM_NTASKS_PER_NODE")


@dataclass
class WorkerJob:
    command: list[str]  # the sweeping command, as a worker runs it (workers.command)
    cwd: str  # where it ran: relative stores and outputs resolve against it
    env: dict[str, str]  # the sweep's PIPELINE_* variables (the MLflow parent run id)
    log_dir: str  # <sweep dir>/workers; the job's workers log to <log_dir>/<job id>/worker-<i>.log
    workers: int | str  # per job: a number, or auto (one per GPU, else one per CPU core)
    threads: int | str
    slots_per_gpu: int
    gpus: int  # GPUs the job asked for; 0 spares the supervisor importing torch to count them
    stop_grace_s: float  # how long interrupted workers get to record their trials
    _running: list[workers_lib.Worker] = field(default_factory=list, repr=False, compare=False)

    def __call__(self) -> str:
        import submitit

        job = submitit.JobEnvironment()
        os.chdir(self.cwd)
        os.environ.update(self.env)
        os.environ[workers_lib.SUBMITTED_ENV] = job.job_id
        for name in (workers_lib.ROLE_ENV, workers_lib.COORDINATOR_ENV, *HIDDEN_FROM_WORKERS):
            os.environ.pop(name, None)
        gpus = workers_lib.visible_gpus() if self.gpus else []
        slots = workers_lib.plan(self.workers, self.threads, gpus, self.slots_per_gpu, workers_lib.usable_cpus())
        log_dir = Path(self.log_dir) / job.job_id
        print(f"job {job.job_id}: {len(slots)} workers, logs in {log_dir}", flush=True)
        for slot in slots:
            print(f"  {slot.label()}", flush=True)
        preempt = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
        self._running = [workers_lib.start(self.command, slot, log_dir, ignore=(preempt,)) for slot in slots]
        if job.cluster != "slurm":
            signal.signal(signal.SIGTERM, self._pass_on)
        signal.signal(signal.SIGINT, self._pass_on)
        codes = [w.proc.wait() for w in self._running]
        summary = f"job {job.job_id}: workers exited with {codes} (logs in {log_dir})"
        print(summary, flush=True)
        if any(codes):
            raise RuntimeError(summary)
        return summary

    def _pass_on(self, signum: int, frame: Any) -> None:
        for w in self._running:
            if w.proc.poll() is None:
                w.proc.send_signal(signum)

    def checkpoint(self) -> Any:
        """Called by submitit on its preemption signal: stop the workers, requeue the job."""
        import submitit

        print(f"preempted or near the time limit: stopping {len(self._running)} workers", flush=True)
        stop_in_handler([w.proc for w in self._running], self.stop_grace_s)
        return submitit.helpers.DelayedSubmission(dataclasses.replace(self, _running=[]))


def stop_in_handler(procs: list[subprocess.Popen], grace_s: float) -> None:
    """SIGINT to `procs`, wait until they exit (SIGKILL after `grace_s`), from a signal handler.

    The handler runs inside `__call__`'s `Popen.wait()`, which holds that Popen's waitpid lock:
    a second `wait()` here would deadlock. So exits are watched with waitid(WNOWAIT), which
    leaves the child to be reaped by the interrupted `wait()` (Linux; elsewhere, poll())."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace_s
    pending = [p for p in procs if not _exited(p)]
    while pending and time.monotonic() < deadline:
        time.sleep(0.2)
        pending = [p for p in pending if not _exited(p)]
    for p in pending:
        os.kill(p.pid, signal.SIGKILL)


def _exited(p: subprocess.Popen) -> bool:
    if p.returncode is not None:
        return True
    if not hasattr(os, "waitid"):
        return p.poll() is not None
    try:
        return os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped
        return True

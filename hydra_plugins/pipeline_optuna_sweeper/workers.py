"""Worker processes on one study: how many, pinned where, started how, followed how.

`hydra.sweeper.workers=N` makes the sweeping process a coordinator: it prepares the stores,
starts N copies of its own command with PIPELINE_SWEEP_WORKER set, and prints one progress
line for the study. Each worker claims WAITING trials from the Optuna storage until none is
left (no batches, no scheduler of ours: the storage hands out the work), writing its output
to `<sweep dir>/workers/worker-<i>.log`. The same command started again, here or in another
terminal, joins the study the same way.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import optuna
from omegaconf import DictConfig
from optuna.trial import TrialState

from . import study as study_lib

log = logging.getLogger(__name__)

ROLE_ENV = "PIPELINE_SWEEP_WORKER"  # set in a worker process: its index
COORDINATOR_ENV = "PIPELINE_SWEEP_COORDINATOR"  # the coordinator's pid
SUBMITTED_ENV = "PIPELINE_SWEEP_JOB"  # set in a worker of a submitted job (submitit): the job id
THREAD_ENVS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def freeze_heap() -> None:
    """Leave the objects a worker holds before its first trial (modules, stores, the sweep's
    config: ~600k objects) out of every later garbage collection; they live as long as the
    process. A trial's full collection (after its fit, to free the training state) then walks
    that trial's objects only, where it walked them all: 0.4-1.2 s per trial on 2 busy cores.
    https://docs.python.org/3/library/gc.html#gc.freeze"""
    gc.collect()  # garbage first: a frozen object is never collected
    gc.freeze()
    log.info("heap frozen before the first trial: %d objects left out of later collections", gc.get_freeze_count())


def is_worker() -> bool:
    return ROLE_ENV in os.environ


def is_submitted() -> bool:
    """True in a worker started by a submitted job (hydra/launcher=submitit_*), whose sweeping
    command has exited: the last such worker to finish closes the sweep."""
    return is_worker() and SUBMITTED_ENV in os.environ


def coordinator_alive() -> bool:
    """False in a worker whose coordinator is gone (killed): it then claims no further trial.
    True outside workers."""
    pid = os.environ.get(COORDINATOR_ENV)
    return pid is None or os.getppid() == int(pid)


@dataclass(frozen=True)
class Slot:
    """One worker: its index, its environment (threads, device), and a label for the log."""

    index: int
    threads: int
    device: str | None = None  # a CUDA_VISIBLE_DEVICES entry; None on CPU

    def env(self) -> dict[str, str]:
        env = {ROLE_ENV: str(self.index), **{k: str(self.threads) for k in THREAD_ENVS}}
        if self.device is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.device
        return env

    def label(self) -> str:
        where = f"GPU {self.device}" if self.device is not None else "CPU"
        return f"worker {self.index}: {where}, {self.threads} thread{'s' * (self.threads > 1)}"


def visible_gpus(env: Mapping[str, str] | None = None, count: Callable[[], int] | None = None) -> list[str]:
    """The GPUs a worker may be pinned to, as CUDA_VISIBLE_DEVICES entries: this process's
    CUDA_VISIBLE_DEVICES (indices, UUIDs or MIG names) when set, else 0..count-1. CUDA stops
    at the first invalid entry (e.g. -1), and so does this."""
    env = os.environ if env is None else env
    n = cuda_count() if count is None else count()
    if n == 0:
        return []
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(n)]
    out = []
    for entry in (e.strip() for e in listed.split(",")):
        if not entry or entry.lstrip("-").isdigit() and int(entry) < 0:
            break
        out.append(entry)
    return out[:n]


def cuda_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def plan(
    workers: int | str,
    threads: int | str,
    gpus: list[str],
    slots_per_gpu: int,
    cpus: int,
    measure: Callable[[], tuple[int, int]] | None = None,
) -> list[Slot]:
    """The worker slots. With GPUs, `auto` is one worker per GPU x slots_per_gpu, dealt round
    robin so each GPU gets its share, with the CPU cores split among them. On CPU, `auto` is
    what `measure()` finds fastest (workers, threads each), else one single-thread worker per
    core (small models scale across processes better than across threads; see README)."""
    if slots_per_gpu < 1:
        raise ValueError(f"hydra.sweeper.slots_per_gpu={slots_per_gpu}; must be >= 1")
    if gpus:
        n = len(gpus) * slots_per_gpu if workers == "auto" else int(workers)
        t = max(1, cpus // n) if threads == "auto" else int(threads)
        return [Slot(i, t, gpus[i % len(gpus)]) for i in range(n)]
    if workers == "auto":
        n, t = measure() if measure is not None else (cpus, 1)
        if threads != "auto":
            t = int(threads)
    else:
        n = int(workers)
        t = max(1, cpus // n) if threads == "auto" else int(threads)
    return [Slot(i, t) for i in range(n)]


def check_setting(name: str, value: Any) -> int | str:
    """`auto` or a positive integer (workers also 0: trials run in the sweeping process)."""
    low = 0 if name == "workers" else 1
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= low):
        return value
    if isinstance(value, str) and value.isdigit() and int(value) >= low:
        return int(value)
    raise ValueError(f"hydra.sweeper.{name}={value!r} is not valid; use auto or an integer >= {low}")


def command(config: DictConfig, sweep_dir: Path) -> list[str]:
    """The command a worker runs: this process's own entry point (`python -m pipeline.train`,
    a script, a console script) with the overrides Hydra recorded, in the same sweep folder."""
    argv_tail = len(sys.argv) - 1
    entry = [sys.executable, *sys.orig_argv[1 : len(sys.orig_argv) - argv_tail]]
    hc = config.hydra
    dropped = ("hydra.mode", "hydra.sweep.dir")
    hydra_overrides = [o for o in hc.overrides.hydra if o.split("=", 1)[0].lstrip("+~") not in dropped]
    flags = [f"--config-name={hc.job.config_name}"]
    for source in hc.runtime.config_sources:
        if source.provider == "command-line" and source.schema == "file":
            flags.append(f"--config-dir={source.path}")
    return [*entry, "-m", *flags, *hc.overrides.task, *hydra_overrides, f"hydra.sweep.dir={sweep_dir}"]


@dataclass
class Worker:
    slot: Slot
    proc: subprocess.Popen
    log_path: Path


def start(cmd: list[str], slot: Slot, log_dir: Path, ignore: tuple[int, ...] = ()) -> Worker:
    """Start one worker; `ignore`: signals it ignores (a submitted job's preemption signal,
    which its supervisor handles for it)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"worker-{slot.index}.log"
    env = {**os.environ, **slot.env(), COORDINATOR_ENV: str(os.getpid())}
    with open(path, "ab") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=functools.partial(default_sigint, ignore),
            close_fds=True,
        )
    return Worker(slot, proc, path)


def default_sigint(ignore: tuple[int, ...] = ()) -> None:
    """In a child before exec: SIGINT back to its default, so Python turns it into
    KeyboardInterrupt even when this command runs in the background of a shell script
    (which starts it with SIGINT ignored, and an ignored signal stays ignored across exec);
    the signals in `ignore` ignored, for the same reason."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    for s in ignore:
        signal.signal(s, signal.SIG_IGN)


def stop(workers: list[Worker], grace_s: float = 30.0) -> None:
    """Ask running workers to stop (SIGINT: each fails its trial as interrupted), then kill."""
    for w in workers:
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace_s
    for w in workers:
        try:
            w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()


def tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# -- the progress line -------------------------------------------------------------------------


@dataclass
class Progress:
    """One line for the whole study, redrawn in place on a terminal:
    `[sweep full_grid] 37/90 done | 2 running | complete 35 failed 1 skipped 1 | 4m10s, ETA 5m40s`.
    Failed trials get a line of their own above it, with their reason."""

    name: str
    total: int
    workers: int
    out: TextIO = field(default_factory=lambda: sys.stdout)
    started: float = field(default_factory=time.monotonic)
    _done_at_start: int | None = None
    _reported: set[str] = field(default_factory=set)
    _last: str = ""

    def update(self, studies: list[optuna.Study]) -> str:
        counts = {k: 0 for k in study_lib.OUTCOMES}
        running = 0
        for study in studies:
            for t in study_lib.latest_attempts(study):
                o = study_lib.outcome(t)
                if o in counts:
                    counts[o] += 1
                running += t.state == TrialState.RUNNING
                key = f"{study.study_name}#{t.number}"
                if o == "failed" and key not in self._reported:
                    self._reported.add(key)
                    reason = str(t.user_attrs.get("fail_reason", ""))[:200]
                    self._print(f"[sweep {study.study_name}] trial {t.number} FAILED: {reason}", final=True)
        done = sum(counts.values())
        if self._done_at_start is None:
            self._done_at_start = done
        line = (
            f"[sweep {self.name}] {done}/{self.total} done | {running} running | "
            + " ".join(f"{k} {v}" for k, v in counts.items())
            + f" | {hms(time.monotonic() - self.started)}, ETA {self._eta(done)}"
        )
        self._print(line, final=False)
        return line

    def _eta(self, done: int) -> str:
        finished_here = done - (self._done_at_start or 0)
        left = max(self.total - done, 0)
        if left == 0:
            return "0m00s"
        if finished_here <= 0:
            return "?"
        return hms(left * (time.monotonic() - self.started) / finished_here)

    def _print(self, line: str, final: bool) -> None:
        if self.out.isatty():
            self.out.write("\r\033[K" + line + ("\n" if final else ""))
        elif final or line.split(" | ", 1)[0] != self._last.split(" | ", 1)[0]:
            self.out.write(line + "\n")  # a log file: a line when the done count moves
        if not final:
            self._last = line
        self.out.flush()

    def close(self) -> None:
        if self.out.isatty():
            self.out.write("\n")
            self.out.flush()


def hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"

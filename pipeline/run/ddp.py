"""One trial on several devices (trainer=ddp): Lightning DDP with rank 0 in this process.

Lightning's own launcher starts ranks 1..N-1 by re-executing the command line. Under Hydra's
`-m` that command is the whole sweep, and under our CLI every rank would open an MLflow run.
Here the process that holds the MLflow run is rank 0; ranks 1..N-1 are started as
`python -m pipeline.run.ddp CONFIG RANK WORLD PORT`: they read the run's resolved config (no
Hydra, no MLflow, no sweep), build the same module and their slice of each global batch
(pipeline.data.datamodule.shard_rows), and train in lockstep with rank 0, DistributedDataParallel
averaging the gradients. Lightning learns that the processes exist already through a
ClusterEnvironment whose `creates_processes_externally` is true, its documented way to run
ranks launched by someone else (https://lightning.ai/docs/pytorch/stable/clouds/cluster_expert.html).

Rank 0 logs the metrics (all-reduced over the ranks), evaluates after training, and ends the
run. The backend is NCCL on GPUs and gloo on CPUs. A rank that fails before training is
reported with the tail of its log (`<run output dir>/ddp/rank<r>.log`); one that fails during
training breaks rank 0's next collective, and the run ends FAILED naming that rank.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.environments.cluster_environment import ClusterEnvironment
from omegaconf import DictConfig, OmegaConf

ADDRESS = "127.0.0.1"  # one node: the ranks meet on the loopback interface
STARTUP_TIMEOUT_S = 600.0  # ranks 1..N-1 importing, loading the token cache, building the model
EXIT_TIMEOUT_S = 120.0  # ranks 1..N-1 leaving after the last step
# A collective waits this long for a rank (torch's default is 30 minutes); a validation or a
# logging step of rank 0 never comes near it.
COLLECTIVE_TIMEOUT = timedelta(minutes=15)
THREAD_ENVS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
DIST_ENVS = ("MASTER_ADDR", "MASTER_PORT")  # set by Lightning when it opens the process group


class LocalGroup(ClusterEnvironment):
    """N processes on this machine that we started ourselves; rank `rank` is this one."""

    def __init__(self, rank: int, world_size: int, port: int) -> None:
        self.rank, self._world_size, self.port = rank, world_size, port
        self._global_rank = rank

    @property
    def creates_processes_externally(self) -> bool:
        return True  # Lightning must not start (or re-execute) anything

    @property
    def main_address(self) -> str:
        return ADDRESS

    @property
    def main_port(self) -> int:
        return self.port

    @staticmethod
    def detect() -> bool:
        return False  # never chosen on its own: passed explicitly in the strategy

    def world_size(self) -> int:
        return self._world_size

    def set_world_size(self, size: int) -> None:
        self._world_size = size

    def global_rank(self) -> int:
        return self._global_rank

    def set_global_rank(self, rank: int) -> None:
        self._global_rank = rank

    def local_rank(self) -> int:
        return self.rank

    def node_rank(self) -> int:
        return 0


def strategy(rank: int, world_size: int, port: int, accelerator: str) -> Any:
    """Lightning's DDPStrategy over our processes: NCCL between GPUs, gloo between CPU processes."""
    from lightning.pytorch.strategies import DDPStrategy

    backend = "nccl" if accelerator in ("gpu", "cuda") or (accelerator == "auto" and _cuda()) else "gloo"
    return DDPStrategy(
        cluster_environment=LocalGroup(rank, world_size, port),
        process_group_backend=backend,
        timeout=COLLECTIVE_TIMEOUT,
    )


def trainer_kwargs(rank: int, world_size: int, port: int, accelerator: str) -> dict[str, Any]:
    """What a rank's lightning.Trainer gets beside the config: our strategy, and no distributed
    sampler (the datamodule splits every global batch itself, the same way for train and val)."""
    return {"strategy": strategy(rank, world_size, port, accelerator), "use_distributed_sampler": False}


class Ranks:
    """Ranks 1..N-1 of one trial, as child processes of rank 0 (this process)."""

    def __init__(self, config: Path, world_size: int, port: int, folder: Path, threads: int) -> None:
        self.config, self.world_size, self.port, self.folder = config, world_size, port, folder
        self.threads = threads  # CPU threads of each rank (rank 0 included, while it trains)
        self.procs: dict[int, subprocess.Popen] = {}

    def log(self, rank: int) -> Path:
        return self.folder / f"rank{rank}.log"

    def ready_file(self, rank: int) -> Path:
        return self.folder / f"rank{rank}.ready"

    def start(self) -> None:
        env = {**os.environ, **{k: str(self.threads) for k in THREAD_ENVS}}
        for rank in range(1, self.world_size):
            self.ready_file(rank).unlink(missing_ok=True)
            with self.log(rank).open("w") as out:
                cmd = [sys.executable, "-m", "pipeline.run.ddp", str(self.config), str(rank)]
                cmd += [str(self.world_size), str(self.port)]
                self.procs[rank] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)

    def failed(self) -> tuple[int, int] | None:
        """(rank, exit code) of a rank that has exited with an error, if any."""
        for rank, proc in self.procs.items():
            code = proc.poll()
            if code not in (None, 0):
                return rank, code
        return None

    def describe(self, rank: int, code: int) -> str:
        lines = [x for x in self.log(rank).read_text(errors="replace").splitlines() if x.strip()]
        last = lines[-1].strip() if lines else "(no output)"
        return f"DDP rank {rank} of {self.world_size} exited with code {code} ({self.log(rank)}): {last}"

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Return once every rank has built its data, model and trainer; raise if one failed.
        Polled here, in Python, so a rank that dies at start is reported at once, not after
        rank 0 waited the rendezvous timeout inside the process-group setup."""
        deadline = time.monotonic() + timeout
        while not all(self.ready_file(r).exists() for r in self.procs):
            failed = self.failed()
            if failed:
                raise RuntimeError(f"{self.describe(*failed)}; it failed before training")
            if time.monotonic() > deadline:
                raise RuntimeError(f"DDP ranks 1..{self.world_size - 1} were not ready after {timeout:.0f} s")
            time.sleep(0.05)

    def join(self, timeout: float = EXIT_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        for rank, proc in self.procs.items():
            try:
                code = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"DDP rank {rank} did not exit {timeout:.0f} s after training") from None
            if code:
                raise RuntimeError(self.describe(rank, code))

    def kill(self) -> None:
        # SIGKILL: a rank blocked in a collective does not run Python signal handlers.
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for rank, proc in self.procs.items():
            proc.wait()
            self.ready_file(rank).unlink(missing_ok=True)


@contextmanager
def ranks(cfg: DictConfig, world_size: int, folder: Path) -> Iterator[Ranks]:
    """Start ranks 1..N-1 of this trial; on leaving, wait for them (training ended) or kill them
    (it failed, was pruned or interrupted). Rank 0, this process, trains with
    `trainer_kwargs(0, ...)` inside the block and calls `wait_ready()` just before fit().

    Process state that DDP changes in rank 0 is put back on leaving, so that the next trial of a
    sweep worker starts clean: the process group is destroyed, the thread count and the
    MASTER_ADDR / MASTER_PORT / OMP variables restored."""
    import torch
    import torch.distributed as dist

    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "config.yaml"
    OmegaConf.save(rank_config(cfg), config)
    threads_before = torch.get_num_threads()
    env_before = {k: os.environ.get(k) for k in (*THREAD_ENVS, *DIST_ENVS)}
    # The machine's threads shared out among the ranks; without OMP_NUM_THREADS set Lightning
    # would pick its own share, and keep it set in this process after the trial.
    threads = max(1, threads_before // world_size)
    group = Ranks(config, world_size, free_port(), folder, threads)
    torch.set_num_threads(threads)
    os.environ.update({k: str(threads) for k in THREAD_ENVS})
    try:
        group.start()
        try:
            yield group
        except RuntimeError as e:  # e.g. gloo's "connection closed by peer": name the rank that died
            time.sleep(1.0)
            failed = group.failed()
            if failed:
                raise RuntimeError(group.describe(*failed)) from e
            raise
        group.join()
    finally:
        group.kill()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(threads_before)
        for key, value in env_before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def rank_config(cfg: DictConfig) -> DictConfig:
    """What ranks 1..N-1 read: the run's config, resolved (tuned lr included), without the
    tracking settings (they log nothing; a tracking URI may hold a password)."""
    c = OmegaConf.to_container(cfg, resolve=True)
    c.pop("tracking", None)
    c.pop("hydra", None)
    return OmegaConf.create(c)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((ADDRESS, 0))
        return s.getsockname()[1]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# -- ranks 1..N-1 ---------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this rank when rank 0's process ends (prctl
    PR_SET_PDEATHSIG), so a killed sweep worker leaves no rank waiting on a collective."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # rank 0 was gone before the request took effect
        sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    """Rank RANK of WORLD: `python -m pipeline.run.ddp CONFIG RANK WORLD PORT` (started by rank 0)."""
    import lightning as L

    from pipeline.run import runner
    from pipeline.run.spec import validate_config

    config, rank, world_size, port = argv if argv is not None else sys.argv[1:]
    rank, world_size, port = int(rank), int(world_size), int(port)
    # Ctrl-C reaches every process of the terminal; rank 0 alone handles it (the run ends
    # KILLED) and then ends this rank. If rank 0 dies, so does this rank.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    cfg = OmegaConf.load(config)
    spec = validate_config(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # as rank 0: the same model and batches
    dm = runner.prepare_data(cfg, spec, rank=rank)
    model_cfg = replace(spec.model, vocab_size=dm.vocab_size)
    lit = runner.make_module(cfg, spec, model_cfg)
    trainer = runner.make_trainer(
        cfg,
        spec,
        logger=False,
        callbacks=[],
        enable_progress_bar=False,
        **trainer_kwargs(rank, world_size, port, cfg.trainer.accelerator),
    )
    (Path(config).parent / f"rank{rank}.ready").touch()
    trainer.fit(lit, datamodule=dm)
    lit.check_finite()
    return 0


if __name__ == "__main__":
    sys.exit(main())

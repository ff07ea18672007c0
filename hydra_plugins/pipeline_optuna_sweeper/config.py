"""The sweeper's config, registered as `hydra/sweeper=optuna`, and the launcher that submits its
workers as cluster jobs, `hydra/launcher=submitit_slurm` (`submitit_local` to try it on one machine)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.pipeline_optuna_sweeper.sweeper.OptunaSweeper"

    # Search space in Hydra's override grammar, e.g. {"model/pos_enc": "choice(rope,alibi)"};
    # command-line sweep overrides are added to it (and win on the same key).
    params: Optional[dict[str, Any]] = None

    # auto (grid when every dimension is discrete, else tpe) | grid | tpe | random |
    # the class name of any optuna sampler (e.g. CmaEsSampler, QMCSampler).
    sampler: str = "auto"
    seed: Optional[int] = None
    sampler_kwargs: dict[str, Any] = field(default_factory=dict)

    # none | median | hyperband | the class name of any optuna pruner (e.g. PercentilePruner).
    pruner: str = "none"
    pruner_kwargs: dict[str, Any] = field(default_factory=dict)

    direction: str = "minimize"
    # Total trials the study should hold (complete + pruned + failed + skipped); rerunning
    # the command tops the study up to this. Default: the grid size for grid, else 20.
    n_trials: Optional[int] = None
    # Trials claimed and launched per batch; >1 only runs in parallel with a parallel launcher.
    n_jobs: int = 1

    # Worker processes on the study: 0 runs the trials in this process; N starts N workers
    # that claim trials from the storage while this process draws one progress line; auto is
    # one per GPU x slots_per_gpu with CUDA, else the CPU layout `calibrate` measures fastest
    # (one single-thread worker per core without it). See docs/sweeps.md.
    workers: Any = 0
    # CPU threads per worker (OMP_NUM_THREADS); auto: the cores shared out among the workers.
    threads_per_worker: Any = "auto"
    # Workers per visible GPU when workers=auto (each pinned with CUDA_VISIBLE_DEVICES).
    slots_per_gpu: int = 1
    # Dotted path to `fn(cfg, cpus) -> (workers, threads_per_worker)` that measures the fastest
    # CPU layout for workers=auto (e.g. pipeline.run.layout.cpu_layout).
    calibrate: Optional[str] = None

    # Any SQLAlchemy URL; default sqlite:///optuna.db in the working directory.
    storage: Optional[str] = None
    # Optuna's RDB heartbeat, for every running trial (heartbeat.py, README: Scaling out): each
    # worker records one every heartbeat_interval seconds (null: off); a RUNNING trial whose
    # last one is older than grace_period (null: 3x the interval) lost its worker, and the next
    # worker to claim fails it and queues it again, at most max_retry times per point.
    heartbeat_interval: Optional[int] = 10
    grace_period: Optional[int] = 30
    max_retry: int = 2
    # Default: the app's `study` key if it has one, else the Hydra job name.
    study_name: Optional[str] = "${oc.select:study,null}"

    # Dimensions to enumerate rather than sample: one study per combination of their values,
    # named <study_name>/<key>=<value>,..., each with its own sampler and n_trials, e.g.
    # per: [model] tunes the learning rate separately for every architecture.
    per: list[str] = field(default_factory=list)

    # Dotted path to `fn(cfg: DictConfig) -> None` that raises for a config that cannot run;
    # such a trial is skipped (told FAIL with a `skipped` reason) before the job launches, and a
    # grid whose every point is invalid launches nothing. Default: the pipeline's own check, so
    # every sweep of `pipeline.train` is validated; another app sets its own (or null).
    validate: Optional[str] = "pipeline.run.spec.validate_config"
    # Also retry FAIL trials (not just interrupted ones) when the command is rerun.
    retry_failed: bool = False


@dataclass
class SubmititWorkersConf:
    """Worker jobs for the study, submitted through submitit (submitit_launcher.py). Each job
    runs `hydra.sweeper.workers` workers (0 or auto: one per GPU of the job, else one per CPU
    core), which claim trials from the shared Optuna storage until none is left."""

    _target_: str = "hydra_plugins.pipeline_optuna_sweeper.submitit_launcher.SubmititWorkersLauncher"

    # slurm: one sbatch job array; local: the same jobs as processes on this machine
    # (submitit's LocalExecutor), to try a setup before the cluster.
    cluster: str = "slurm"
    # Worker jobs to submit (capped at the trials left to run).
    jobs: int = 2
    # Per job: wall-clock limit, CPUs, GPUs, memory (null: the partition's default).
    timeout_min: int = 240
    cpus_per_job: int = 8
    gpus_per_job: int = 0
    mem_gb: Optional[float] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    # At most this many of the jobs at once (null: all of them).
    array_parallelism: Optional[int] = None
    # Shell lines run before the job's Python starts, e.g. ["module load cuda", "source .venv/bin/activate"].
    setup: list[str] = field(default_factory=list)
    # Any other sbatch option, e.g. {mail-type: END, exclude: node07}.
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    # Seconds before the time limit (or on preemption) when the job's workers are told to stop:
    # their trials end interrupted (retried on the next submit) and the job is requeued,
    # at most max_num_timeout times.
    signal_delay_s: int = 120
    max_num_timeout: int = 3
    # submitit's job files and logs (%j: the job id); on SLURM a folder every node can read.
    folder: str = "${hydra.sweep.dir}/submitit/%j"
    # The job name squeue shows; null: the study name.
    name: Optional[str] = None


ConfigStore.instance().store(
    group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="pipeline_optuna_sweeper"
)
for _cluster in ("slurm", "local"):
    ConfigStore.instance().store(
        group="hydra/launcher",
        name=f"submitit_{_cluster}",
        node=SubmititWorkersConf(cluster=_cluster),
        provider="pipeline_optuna_sweeper",
    )

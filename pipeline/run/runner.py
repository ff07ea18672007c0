"""One run end to end: data, model, Lightning training, evaluation, MLflow record.

`run` reads as the list of its steps; each step is a function below. The MLflow run's status
(FINISHED, FAILED with the reason, KILLED when pruned or interrupted) is set in one place,
`pipeline.tracking.runs.tracked_run`. Names of what is logged: pipeline.tracking.schema.
"""

from __future__ import annotations

import gc
import logging
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from pipeline.data import LMDataModule
from pipeline.evaluate.extrapolation import block_length
from pipeline.run.spec import RunConfigError, RunSpec
from pipeline.tracking.schema import Artifact, Metric, Param, Tag, floor_ngram
from pipeline.tracking.uri import redact

if TYPE_CHECKING:
    import torch

    from pipeline.model import DecoderLM, ModelConfig


def run(
    cfg: DictConfig,
    spec: RunSpec,
    overrides: list[str],
    out_dir: Path,
    extra_tags: dict[str, str] | None = None,
    tracking_uri: str | None = None,
) -> float:
    """Train, evaluate and record one run; returns the final val/loss (the sweep objective).

    The store: `tracking_uri` (the caller's explicit choice), else `tracking.uri`, else
    MLFLOW_TRACKING_URI, else ./mlflow.db."""
    import lightning as L

    from pipeline.tracking import resolve_tracking_uri, runs
    from pipeline.tracking.uri import check_store

    uri = resolve_tracking_uri(tracking_uri or cfg.tracking.uri)
    check_store(uri, "MLflow store")  # before the data is read

    # Lightning's per-run banners (accelerator, tips) repeat 90 times in a sweep; keep warnings.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    uri = resolve_tracking_uri(tracking_uri or cfg.tracking.uri)
    tuned_tags: dict[str, str] = {}
    if spec.optim.lr_from:  # this arm's tuned lr and warmup (optimizer.lr_from), before any data
        from pipeline.tracking.tuned import apply_tuned

        cfg, spec, tuned_tags = apply_tuned(cfg, spec, uri)
    dm = prepare_data(cfg, spec)
    model_cfg = replace(spec.model, vocab_size=dm.vocab_size)  # the tokenizer decides the vocabulary

    tags = {**run_tags(cfg, spec, model_cfg), **tuned_tags, **(extra_tags or {})}
    with runs.tracked_run(uri, cfg.study, run_name(cfg, model_cfg), tags, cfg.tracking.system_metrics) as active:
        record_config(cfg, spec, model_cfg, overrides, dm)
        logger = runs.lightning_logger(uri, active.info.run_id)
        model, val_loss, device = train(cfg, spec, model_cfg, dm, logger, out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if spec.eval.enabled:
            evaluate(cfg, spec, model, device, dm, out_dir)
        record_loss_curves(uri, active.info.run_id, out_dir)
    return val_loss


# -- the steps ------------------------------------------------------------------------------------


def prepare_data(cfg: DictConfig, spec: RunSpec, rank: int = 0) -> LMDataModule:
    """Load (or tokenize and cache) the splits; refuse, before any MLflow run exists, a run that
    reads train more than data.max_epochs times (validation checks it only when the corpus was
    already cached) and a test split too short for one evaluation window. Under DDP, `rank`'s
    share of every global batch."""
    dm = LMDataModule(
        spec.data,
        spec.model.context_length,
        spec.batch_size,
        seed=cfg.seed,
        val_batches=spec.val_batches,
        pin_memory=_on_cuda(cfg.trainer.accelerator),  # page-locked batches copy to the GPU asynchronously
        rank=rank,
        world_size=spec.devices,
    )
    dm.setup("fit")
    spec.check_epochs(len(dm.splits.train))
    n_test = len(dm.splits.test)
    if spec.eval.enabled:
        block = block_length(spec.model, spec.eval.factors, spec.eval.block_tokens)
        if n_test <= block:
            e, L = spec.eval, spec.model.context_length
            source = f"eval.block_tokens={block}" if e.block_tokens else f"max(eval.factors)={max(e.factors)} x {L}"
            raise RunConfigError(
                f"the test split holds {n_test} tokens, fewer than one evaluation block of {source} + 1; "
                f"use more text, a larger data.test_fraction, or smaller eval.factors / eval.block_tokens"
            )
    return dm


def run_tags(cfg: DictConfig, spec: RunSpec, model_cfg: ModelConfig) -> dict[str, str]:
    """The tags every training run carries (pipeline.tracking.schema.Tag)."""
    from pipeline.tracking.runs import git_commit

    return {
        **{family: getattr(model_cfg, family).name for family in Tag.FAMILIES},
        Tag.PLACEMENT: model_cfg.placement,
        Tag.STUDY: cfg.study,
        Tag.SEED: str(cfg.seed),
        Tag.GIT_COMMIT: git_commit(),
        **({Tag.PRESET: spec.preset} if spec.preset else {}),
    }


def run_name(cfg: DictConfig, model_cfg: ModelConfig) -> str:
    """`tracking.run_name`, else the components and the seed: `rope-rmsnorm-gqa-swiglu-s0`."""
    components = "-".join(getattr(model_cfg, family).name for family in Tag.FAMILIES)
    return cfg.tracking.run_name or f"{components}-s{cfg.seed}"


def eval_config(cfg: DictConfig, spec: RunSpec) -> dict[str, Any]:
    """The eval settings as used: timing pins the CPU thread count, so eval.decode.threads is
    the number used (logged as a param), not null."""
    import torch

    e = OmegaConf.to_container(cfg.eval, resolve=True) if "eval" in cfg else {}
    e.setdefault("decode", {})["threads"] = spec.eval.decode.threads or torch.get_num_threads()
    return e


def resolved_config(cfg: DictConfig, spec: RunSpec, model_cfg: ModelConfig) -> dict[str, Any]:
    """The config as run: Hydra's, with the model as built (vocabulary, table length, preset)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["model"] = {**model_cfg.to_dict(), "preset": spec.preset}
    resolved["trainer"]["val_check_interval"] = spec.val_check_interval  # the value used
    resolved["eval"] = eval_config(cfg, spec)
    if (resolved.get("tracking") or {}).get("uri"):  # params and config.yaml never show a password
        resolved["tracking"]["uri"] = redact(resolved["tracking"]["uri"])
    return resolved


def record_config(
    cfg: DictConfig, spec: RunSpec, model_cfg: ModelConfig, overrides: list[str], dm: LMDataModule
) -> None:
    """Params (the resolved config, flattened), config.yaml (what rerun starts from), the overrides."""
    import mlflow

    from pipeline.tracking import runs

    resolved = resolved_config(cfg, spec, model_cfg)
    params = runs.flatten(resolved)
    # Per corpus, measured once and cached with the tokens: leakage and the n-gram floors.
    overlap = dm.splits.overlap
    if overlap:
        params[Param.DATA_OVERLAP_VAL_TRAIN] = round(overlap["val_train"], 6)
        params[Param.DATA_OVERLAP_TEST_TRAIN] = round(overlap["test_train"], 6)
    floors = dm.splits.floors  # {"ngram1": loss, ...}
    runs.log_batch(
        params=params,
        tags={Tag.CACHE_HIT: str(dm.splits.cache_hit).lower()},
        metrics={floor_ngram(int(k.removeprefix("ngram"))): v for k, v in floors.items()},
    )
    mlflow.log_text(OmegaConf.to_yaml(OmegaConf.create(resolved)), Artifact.CONFIG)
    mlflow.log_text("\n".join(_redact_override(o) for o in overrides) + "\n", Artifact.OVERRIDES)


def make_module(cfg: DictConfig, spec: RunSpec, model_cfg: ModelConfig) -> Any:
    """The LightningModule of a run (every DDP rank builds the same one)."""
    from pipeline.run.module import LitDecoderLM

    # On a GPU the finite-loss check and the throughput clock sync with the host only every few
    # steps, not every step (a sync stalls the kernel queue): the loss check once per logging
    # interval, when the logged metrics are read back anyway.
    on_cuda = _on_cuda(cfg.trainer.accelerator)
    check_every = max(1, int(cfg.trainer.get("log_every_n_steps") or 10)) if on_cuda else 1
    return LitDecoderLM(model_cfg, spec.optim, spec.max_steps, check_finite_every=check_every, compile=spec.compile)


# Keys of the trainer config that are ours (RunSpec), not lightning.Trainer's.
OWN_TRAINER_KEYS = ("compile", "peak_flops", "strategy")


def make_trainer(cfg: DictConfig, spec: RunSpec, **kwargs: Any) -> Any:
    """lightning.Trainer from `cfg.trainer` (its `_target_`), with the validation interval as
    used; `kwargs` add the logger, callbacks and, under DDP, the strategy (pipeline.run.ddp)."""
    from hydra.utils import instantiate

    # Resolved in place, against the root: a study may set trainer keys from its own levels
    # (${levels...}), which a detached copy of the node could not find.
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg = {k: v for k, v in trainer.items() if k not in OWN_TRAINER_KEYS}
    return instantiate(trainer_cfg, val_check_interval=spec.val_check_interval, **kwargs)


def train(
    cfg: DictConfig, spec: RunSpec, model_cfg: ModelConfig, dm: LMDataModule, logger: Any, out_dir: Path
) -> tuple[DecoderLM, float, torch.device]:
    """Fit the model; returns it, the final val/loss and the device it trained on. Training
    throughput is logged as a cost metric; an interrupted fit raises KeyboardInterrupt (the run
    ends KILLED). The training state (optimizer moments, gradients, the trainer) is freed before
    returning, so the inference memory measured next is the model's alone.

    With trainer.devices=N (trainer=ddp) this process is rank 0 of N (pipeline.run.ddp): the
    other ranks start here and end with the fit; logging and what follows stay in this process."""
    import mlflow
    import torch

    from pipeline.evaluate.cost import analytic_cost
    from pipeline.run import ddp
    from pipeline.run.callbacks import Throughput, peak_flops
    from pipeline.tracking.sweep import trial_callbacks, trial_trainer_kwargs

    lit = make_module(cfg, spec, model_cfg)
    throughput = Throughput(sync=_on_cuda(cfg.trainer.accelerator))
    callbacks = [throughput, *trial_callbacks(cfg)]
    with ddp.ranks(cfg, spec.devices, out_dir / "ddp") if spec.devices > 1 else nullcontext() as others:
        distributed = ddp.trainer_kwargs(0, spec.devices, others.port, cfg.trainer.accelerator) if others else {}
        trainer = make_trainer(cfg, spec, logger=logger, callbacks=callbacks, **trial_trainer_kwargs(), **distributed)
        if others:
            others.wait_ready()
        tic = time.perf_counter()
        trainer.fit(lit, datamodule=dm)
        if trainer.interrupted:
            raise KeyboardInterrupt("training interrupted")
        lit.check_finite()  # the steps since the last check
    # Training's share of the trial: with eval/seconds, the rest of a trial is overhead.
    metrics = {Metric.TRAIN_SECONDS: time.perf_counter() - tic}
    if throughput.tokens_per_s:
        metrics[Metric.COST_TRAIN_TOKENS_PER_S] = throughput.tokens_per_s
    peak = peak_flops(trainer.strategy.root_device, cfg.trainer.precision, spec.peak_flops)
    if peak is not None:
        peak *= spec.devices  # the tokens/s are every device's together
    mfu = throughput.mfu(analytic_cost(model_cfg)["flops_per_token"], peak)
    if mfu is not None:
        metrics.update({Metric.COST_MFU: mfu, Metric.COST_PEAK_FLOPS: peak})
    mlflow.log_metrics(metrics)  # one store write
    val_loss = float(trainer.callback_metrics[Metric.VAL_LOSS])
    # fit() ends by moving the model to the CPU; evaluation runs on the device it trained on.
    device = trainer.strategy.root_device
    model = lit.model.eval()
    model.zero_grad(set_to_none=True)
    del trainer, lit
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model, val_loss, device


def evaluate(
    cfg: DictConfig, spec: RunSpec, model: DecoderLM, device: torch.device, dm: LMDataModule, out_dir: Path
) -> None:
    """Extrapolation and inference cost on the test split, on `device`; metrics and plots to the run."""
    import mlflow

    from pipeline.evaluate import evaluate_run

    metrics, artifacts = evaluate_run(model.eval(), dm.test_tokens(), eval_config(cfg, spec), device, out_dir)
    if metrics:  # eval.enabled
        mlflow.set_tag(Tag.EVAL_DEVICE, str(device))
    mlflow.log_metrics(metrics)
    for path in artifacts:
        mlflow.log_artifact(str(path), Artifact.PLOTS)


def record_loss_curves(uri: str, run_id: str, out_dir: Path) -> None:
    """The loss-curve plot, drawn from what MLflow recorded."""
    import mlflow

    from pipeline.tracking.plots import plot_loss_curves

    mlflow.log_artifact(str(plot_loss_curves(uri, run_id, out_dir / "loss_curve.png")), Artifact.PLOTS)


def _redact_override(override: str) -> str:
    key, sep, value = override.partition("=")
    return f"{key}{sep}{redact(value)}" if sep else override


def _on_cuda(accelerator: str) -> bool:
    import torch

    return accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()

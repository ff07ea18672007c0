"""One run end to end: data, model, Lightning training, evaluation, MLflow record."""

from __future__ import annotations

import gc
import logging
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.data import LMDataModule
from pipeline.evaluate.extrapolation import block_length
from pipeline.run.spec import RunConfigError, RunSpec

log = logging.getLogger(__name__)


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
    import mlflow
    from hydra.utils import instantiate

    from pipeline.run.callbacks import Throughput
    from pipeline.run.module import LitDecoderLM
    from pipeline.tracking import resolve_tracking_uri, runs
    from pipeline.tracking.plots import plot_loss_curves
    from pipeline.tracking.sweep import trial_callbacks

    # Lightning's per-run banners (accelerator, tips) repeat 90 times in a sweep; keep warnings.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = LMDataModule(
        spec.data, spec.model.context_length, spec.batch_size, seed=cfg.seed, val_batches=spec.val_batches
    )
    dm.setup("fit")
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
    model_cfg = replace(spec.model, vocab_size=dm.vocab_size)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["model"] = {**model_cfg.to_dict(), "preset": spec.preset}
    # Timing pins the CPU thread count; the logged param is the number used, not null.
    resolved.setdefault("eval", {}).setdefault("decode", {})["threads"] = (
        spec.eval.decode.threads or torch.get_num_threads()
    )

    uri = resolve_tracking_uri(tracking_uri or cfg.tracking.uri)
    tags = {
        "pos_enc": model_cfg.pos_enc.name,
        "norm": model_cfg.norm.name,
        "attention": model_cfg.attention.name,
        "ffn": model_cfg.ffn.name,
        "placement": model_cfg.placement,
        "study": cfg.study,
        "seed": str(cfg.seed),
        "git_commit": runs.git_commit(),
        **({"preset": spec.preset} if spec.preset else {}),
        **(extra_tags or {}),
    }
    name = cfg.tracking.run_name or (
        f"{model_cfg.pos_enc.name}-{model_cfg.norm.name}-{model_cfg.attention.name}-{model_cfg.ffn.name}-s{cfg.seed}"
    )
    with runs.tracked_run(uri, cfg.study, name, tags, cfg.tracking.system_metrics) as active:
        run_id = active.info.run_id
        runs.log_params(runs.flatten(resolved))
        mlflow.log_text(OmegaConf.to_yaml(OmegaConf.create(resolved)), "config.yaml")
        mlflow.log_text("\n".join(overrides) + "\n", "overrides.txt")
        mlflow.set_tag("cache_hit", str(dm.splits.cache_hit).lower())

        lit = LitDecoderLM(model_cfg, spec.optim, spec.max_steps)
        throughput = Throughput()
        trainer = instantiate(
            cfg.trainer, logger=runs.lightning_logger(uri, run_id), callbacks=[throughput, *trial_callbacks(cfg)]
        )
        trainer.fit(lit, datamodule=dm)
        if trainer.interrupted:
            raise KeyboardInterrupt("training interrupted")
        val_loss = float(trainer.callback_metrics["val/loss"])

        if throughput.tokens_per_s:
            mlflow.log_metric("cost/train_tokens_per_s", throughput.tokens_per_s)
        out_dir.mkdir(parents=True, exist_ok=True)
        if spec.eval.enabled:
            from pipeline.evaluate import evaluate_run

            # fit() ends by moving the model to the CPU; evaluate on the device it trained on.
            # Free the training state first (optimizer moments, gradients, the trainer's
            # references) so the inference memory measured next is the model's alone.
            device = trainer.strategy.root_device
            model = lit.model.eval()
            model.zero_grad(set_to_none=True)
            del trainer, lit
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            metrics, artifacts = evaluate_run(model, dm.test_tokens(), resolved["eval"], device, out_dir)
            mlflow.log_metrics(metrics)
            for path in artifacts:
                mlflow.log_artifact(str(path), "plots")
        mlflow.log_artifact(str(plot_loss_curves(uri, run_id, out_dir / "loss_curve.png")), "plots")
    return val_loss

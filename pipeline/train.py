"""One training run: Hydra config -> Lightning -> MLflow.

    python -m pipeline.train                                  # default model, CPU budget
    python -m pipeline.train model=llama model/pos_enc=alibi model.attention.n_kv_heads=1
    python -m pipeline.train -m model/pos_enc=rope,alibi      # Hydra multirun

The config is validated into typed objects (`validate_config`) before any data is read or
any MLflow run exists; a bad override exits non-zero with one line naming the problem.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline.config import model_from_config, resolve_budget
from pipeline.data import DataConfig, DataConfigError, LMDataModule
from pipeline.evaluate import EvalConfig
from pipeline.evaluate.extrapolation import check_factors
from pipeline.lit_module import OptimConfig
from pipeline.model import ConfigError, ModelConfig

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
log = logging.getLogger(__name__)


class RunConfigError(ValueError):
    """An invalid training, optimizer or evaluation setting."""


INVALID_CONFIG = (ConfigError, DataConfigError, RunConfigError)


@dataclass
class RunSpec:
    """Everything a run needs, typed and validated."""

    model: ModelConfig
    preset: str | None
    data: DataConfig
    batch_size: int
    val_batches: int
    optim: OptimConfig
    max_steps: int


def _require(key: str, value: Any, ok: bool, valid: str) -> None:
    if not ok:
        raise RunConfigError(f"{key}={value!r} is not valid; {valid}")


def validate_config(cfg: DictConfig) -> RunSpec:
    """Turn the composed config into typed objects, raising a clear error; builds nothing."""
    c = OmegaConf.to_container(cfg, resolve=True)
    model_cfg, preset = model_from_config(c)
    try:  # evaluation runs after training: its settings are checked now, not then
        eval_cfg = EvalConfig.from_dict(c.get("eval", {}))
        if eval_cfg.enabled:
            check_factors(model_cfg, eval_cfg.factors)
    except ValueError as e:
        raise RunConfigError(str(e)) from None

    data = dict(c["data"])
    batch_size, val_batches = data.pop("batch_size", 16), data.pop("val_batches", 4)
    _require("data.batch_size", batch_size, isinstance(batch_size, int) and batch_size > 0, "use a positive integer")
    _require("data.val_batches", val_batches, isinstance(val_batches, int) and val_batches > 0, "use a positive integer")
    data_cfg = DataConfig.from_dict(data)

    t = c["trainer"]
    steps = t.get("max_steps")
    _require("trainer.max_steps", steps, isinstance(steps, int) and steps > 0, "use a positive number of optimizer steps")
    every = t.get("val_check_interval")
    _require("trainer.val_check_interval", every, isinstance(every, int) and 0 < every <= steps,
             f"use an integer number of steps between 1 and trainer.max_steps={steps}")
    known = {f.name for f in dataclasses.fields(OptimConfig)}
    unknown = sorted(set(c["optimizer"]) - known)
    if unknown:
        raise RunConfigError(f"optimizer.{unknown[0]} is not an optimizer setting; settings: {', '.join(sorted(known))}")
    o = OptimConfig(**c["optimizer"])
    _require("optimizer.lr", o.lr, o.lr > 0, "use a positive learning rate")
    _require("optimizer.warmup_steps", o.warmup_steps, isinstance(o.warmup_steps, int) and o.warmup_steps >= 0,
             "use a non-negative integer")
    _require("optimizer.weight_decay", o.weight_decay, o.weight_decay >= 0, "use a non-negative value")
    return RunSpec(model_cfg, preset, data_cfg, batch_size, val_batches, o, steps)


def run(cfg: DictConfig, spec: RunSpec, overrides: list[str], out_dir: Path,
        extra_tags: dict[str, str] | None = None) -> float:
    """Train, evaluate and record one run; returns the final val/loss (the sweep objective)."""
    import lightning as L
    import mlflow
    import optuna
    from hydra.utils import instantiate

    from pipeline import tracking
    from pipeline.lit_module import LitDecoderLM, Throughput
    from pipeline.plots import plot_loss_curves
    from pipeline.sweep import trial_callbacks

    # Lightning's per-run banners (accelerator, tips) repeat 90 times in a sweep; keep warnings.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = LMDataModule(spec.data, spec.model.context_length, spec.batch_size, seed=cfg.seed,
                      val_batches=spec.val_batches)
    dm.setup("fit")
    factors = cfg.eval.get("factors", [1])
    n_test = len(dm.splits.test)
    if cfg.eval.get("enabled", True) and n_test <= max(factors) * spec.model.context_length:
        raise RunConfigError(
            f"the test split holds {n_test} tokens, fewer than one evaluation window of "
            f"max(eval.factors)={max(factors)} x model.context_length={spec.model.context_length}; "
            f"use more text, a larger data.test_fraction, or smaller eval.factors"
        )
    model_cfg = replace(spec.model, vocab_size=dm.vocab_size)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["model"] = {**model_cfg.to_dict(), "preset": spec.preset}

    uri = tracking.tracking_uri(cfg.tracking.uri)
    tags = {
        "pos_enc": model_cfg.pos_enc.name, "norm": model_cfg.norm.name,
        "attention": model_cfg.attention.name, "ffn": model_cfg.ffn.name,
        "placement": model_cfg.norm.placement, "study": cfg.study, "seed": str(cfg.seed),
        "git_commit": tracking.git_commit(), **({"preset": spec.preset} if spec.preset else {}),
        **(extra_tags or {}),
    }
    name = cfg.tracking.run_name or (
        f"{model_cfg.pos_enc.name}-{model_cfg.norm.name}-{model_cfg.attention.name}-{model_cfg.ffn.name}-s{cfg.seed}"
    )
    with tracking.start_run(uri, cfg.study, name, tags, cfg.tracking.system_metrics) as active:
        run_id = active.info.run_id
        try:
            tracking.log_params(tracking.flatten(resolved))
            mlflow.log_text(OmegaConf.to_yaml(OmegaConf.create(resolved)), "config.yaml")
            mlflow.log_text("\n".join(overrides) + "\n", "overrides.txt")
            mlflow.set_tag("cache_hit", str(dm.splits.cache_hit).lower())

            lit = LitDecoderLM(model_cfg, spec.optim, spec.max_steps)
            throughput = Throughput()
            trainer = instantiate(cfg.trainer, logger=tracking.lightning_logger(uri, run_id),
                                  callbacks=[throughput, *trial_callbacks(cfg)])
            trainer.fit(lit, datamodule=dm)
            if trainer.interrupted:
                raise KeyboardInterrupt("training interrupted")
            val_loss = float(trainer.callback_metrics["val/loss"])

            if throughput.tokens_per_s:
                mlflow.log_metric("cost/train_tokens_per_s", throughput.tokens_per_s)
            out_dir.mkdir(parents=True, exist_ok=True)
            if cfg.eval.get("enabled", True):
                from pipeline.evaluate import evaluate_run

                device = next(lit.model.parameters()).device
                metrics, artifacts = evaluate_run(lit.model.eval(), dm.test_tokens(),
                                                  OmegaConf.to_container(cfg.eval, resolve=True),
                                                  device, out_dir)
                mlflow.log_metrics(metrics)
                for path in artifacts:
                    mlflow.log_artifact(str(path), "plots")
            mlflow.log_artifact(str(plot_loss_curves(run_id, out_dir / "loss_curve.png")), "plots")
            tracking.end_run("FINISHED")
            return val_loss
        except optuna.TrialPruned as e:
            tracking.end_run("KILLED", None, pruned="true", pruned_reason=str(e) or "pruned")
            raise
        except (KeyboardInterrupt, SystemExit) as e:
            tracking.end_run("KILLED", f"interrupted: {type(e).__name__}")
            raise
        except BaseException as e:
            tracking.end_run("FAILED", f"{type(e).__name__}: {e}")
            raise


def _fail_fast(message: str) -> None:
    """A single-run config error: one line on stderr, exit code 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    try:
        spec = validate_config(cfg)
        return run(cfg, spec, list(hc.overrides.task), Path(hc.runtime.output_dir))
    except INVALID_CONFIG as e:  # found before training: no MLflow run was created
        if hc.mode == RunMode.RUN:
            _fail_fast(str(e))
        raise  # in a sweep: the sweeper records the trial as failed and goes on


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *resolve_budget(sys.argv[1:])]
    main()

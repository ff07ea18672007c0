"""The typed run spec: the composed Hydra config turned into validated objects, once.

Kept free of Lightning and MLflow so that `pipeline.cost` and error paths start fast; nothing
here reads data or creates a run.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.checks import check_keys, check_types
from pipeline.data.cache import cached_meta
from pipeline.data.config import DataConfig, DataConfigError
from pipeline.evaluate import EvalConfig
from pipeline.evaluate.extrapolation import check_factors
from pipeline.model import ConfigError, ModelConfig
from pipeline.model.components.ffn import MoEConfig
from pipeline.names import BadName, check_name
from pipeline.run.optim import OptimConfig

log = logging.getLogger(__name__)


class RunConfigError(ValueError):
    """An invalid training, optimizer or evaluation setting."""


INVALID_CONFIG = (ConfigError, DataConfigError, RunConfigError, BadName)


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
    val_check_interval: int  # at most max_steps: a shortened run still validates at its end
    eval: EvalConfig
    max_epochs: float = 2.0
    compile: bool = False  # trainer.compile: torch.compile the training forward pass
    peak_flops: float | None = None  # trainer.peak_flops: the FLOP/s cost/mfu divides by
    devices: int = 1  # trainer.devices: DDP processes (trainer=ddp), each on batch_size / devices rows

    @property
    def planned_tokens(self) -> int:
        """Train tokens the run reads: max_steps x batch_size x context_length."""
        return self.max_steps * self.batch_size * self.model.context_length

    def check_epochs(self, train_tokens: int) -> None:
        """Refuse a run that would read its train split more than data.max_epochs times.

        Past a couple of epochs a small model starts to memorise, and an ablation then compares
        memorisation instead of architectures (issue 10: the GPU budget read 91 epochs of the
        embedded corpus)."""
        if train_tokens <= 0 or self.planned_tokens <= self.max_epochs * train_tokens:
            return
        raise RunConfigError(
            f"the run reads {self.planned_tokens:,} train tokens (trainer.max_steps={self.max_steps} x "
            f"data.batch_size={self.batch_size} x model.context_length={self.model.context_length}), "
            f"{self.planned_tokens / train_tokens:.3g} epochs of the {train_tokens:,}-token train split, "
            f"more than data.max_epochs={self.max_epochs:g}; use a bigger corpus (e.g. data=wikitext103), "
            f"fewer trainer.max_steps, or raise data.max_epochs"
        )


def _require(key: str, value: Any, ok: bool, valid: str) -> None:
    if not ok:
        raise RunConfigError(f"{key}={value!r} is not valid; {valid}")


def validate_config(cfg: DictConfig) -> RunSpec:
    """Turn the composed config into typed objects, raising a clear error; builds nothing."""
    c = OmegaConf.to_container(cfg, resolve=True)
    check_name("study", c.get("study", "default"))
    check_types("eval", c.get("eval") or {}, EvalConfig, RunConfigError)
    check_types("optimizer", c.get("optimizer") or {}, OptimConfig, RunConfigError)
    model_cfg, preset = model_from_config(c)
    try:  # evaluation runs after training: its settings are checked now, not then
        eval_cfg = EvalConfig.from_dict(c.get("eval", {}))
        if eval_cfg.enabled:
            check_factors(model_cfg, eval_cfg.factors, eval_cfg.block_tokens)
    except ValueError as e:
        raise RunConfigError(str(e)) from None

    data = dict(c["data"])
    batch_size, val_batches = data.pop("batch_size", 16), data.pop("val_batches", 4)
    max_epochs = data.pop("max_epochs", 2.0)
    _require("data.batch_size", batch_size, isinstance(batch_size, int) and batch_size > 0, "use a positive integer")
    _require(
        "data.val_batches", val_batches, isinstance(val_batches, int) and val_batches > 0, "use a positive integer"
    )
    _require(
        "data.max_epochs",
        max_epochs,
        isinstance(max_epochs, (int, float)) and not isinstance(max_epochs, bool) and max_epochs > 0,
        "use a positive number of passes over the train split",
    )
    data_cfg = DataConfig.from_dict(data)

    t = c["trainer"]
    steps = t.get("max_steps")
    _require(
        "trainer.max_steps", steps, isinstance(steps, int) and steps > 0, "use a positive number of optimizer steps"
    )
    every = t.get("val_check_interval")
    _require(
        "trainer.val_check_interval", every, isinstance(every, int) and every > 0, "use a positive number of steps"
    )
    if every > steps:  # e.g. trainer.max_steps=40 under a budget that validates every 100
        log.info("trainer.val_check_interval=%d > trainer.max_steps=%d: validating every %d steps", every, steps, steps)
        every = steps
    compile_, peak = t.get("compile", False), t.get("peak_flops")
    _require("trainer.compile", compile_, isinstance(compile_, bool), "use true or false")
    _require(
        "trainer.peak_flops",
        peak,
        peak is None or (isinstance(peak, int | float) and not isinstance(peak, bool) and peak > 0),
        "use the accelerator's peak FLOP/s (e.g. 989e12 for an H100/H200 in bf16), or null for the built-in table",
    )
    if compile_ and isinstance(model_cfg.ffn, MoEConfig) and not str(t.get("precision")).startswith("bf16"):
        raise RunConfigError(
            f"trainer.compile=true with model.ffn=moe needs trainer.precision=bf16-mixed, not {t.get('precision')!r}: "
            "only the bf16 grouped expert matmul is free of host reads (graph breaks); or set trainer.compile=false"
        )
    devices = check_devices(t, batch_size)
    check_keys("optimizer", c["optimizer"], OptimConfig, RunConfigError)
    o = OptimConfig(**c["optimizer"])
    _require("optimizer.lr", o.lr, o.lr > 0, "use a positive learning rate")
    _require(
        "optimizer.warmup_steps",
        o.warmup_steps,
        isinstance(o.warmup_steps, int) and o.warmup_steps >= 0,
        "use a non-negative integer",
    )
    _require("optimizer.weight_decay", o.weight_decay, o.weight_decay >= 0, "use a non-negative value")
    _require(
        "optimizer.lr_from",
        o.lr_from,
        o.lr_from is None or (isinstance(o.lr_from, str) and o.lr_from.strip() != ""),
        "name a tune study (e.g. tune_lr) or use null",
    )
    spec = RunSpec(
        model_cfg,
        preset,
        data_cfg,
        batch_size,
        val_batches,
        o,
        steps,
        every,
        eval_cfg,
        float(max_epochs),
        compile_,
        peak,
        devices,
    )
    # The epochs check needs the train split's size: known here when the corpus is already in the
    # token cache (read from its metadata, not its tokens); otherwise the runner checks it right
    # after loading the data, still before training.
    meta = cached_meta(data_cfg)
    if meta and meta.get("tokens"):
        spec.check_epochs(meta["tokens"]["train"])
    return spec


DDP_ACCELERATORS = ("cpu", "gpu", "cuda", "auto")


def check_devices(t: dict[str, Any], batch_size: int) -> int:
    """trainer.devices and trainer.strategy: one device, or trainer=ddp over N devices that
    exist here (CUDA devices visible to this process, or CPU cores for gloo processes), with
    the global data.batch_size split evenly over them. Returns the number of devices."""
    devices, strategy, accelerator = t.get("devices", 1), t.get("strategy", "auto"), t.get("accelerator")
    _require(
        "trainer.strategy",
        strategy,
        strategy in ("auto", "ddp"),
        "use trainer=ddp for one trial on several devices (its strategy is ddp), or auto",
    )
    _require(
        "trainer.devices",
        devices,
        isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1,
        "use a positive number of devices (trainer=ddp trainer.devices=N for several)",
    )
    if devices == 1:
        return 1
    # The sweep workers' rules for what this machine has (imported late: it loads Optuna).
    from hydra_plugins.pipeline_optuna_sweeper.workers import cuda_count, is_worker, usable_cpus

    if strategy != "ddp":
        raise RunConfigError(
            f"trainer.devices={devices} needs trainer=ddp (one process per device, one MLflow run); "
            f"use trainer=ddp trainer.devices={devices}, or trainer.devices=1"
        )
    _require(
        "trainer.accelerator",
        accelerator,
        accelerator in DDP_ACCELERATORS,
        "trainer=ddp runs on gpu (NCCL) or cpu (gloo)",
    )
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and cuda_count()):
        visible = cuda_count()
        if devices > visible:
            where = os.environ.get("CUDA_VISIBLE_DEVICES")
            shown = f" (CUDA_VISIBLE_DEVICES={where})" if where is not None else ""
            hint = "; a sweep worker sees one GPU: run DDP trials with hydra.sweeper.workers=0" if is_worker() else ""
            valid = f"use trainer.devices from 1 to {visible}" if visible else "use trainer.accelerator=cpu"
            raise RunConfigError(
                f"trainer.devices={devices} is more than the {visible} CUDA device(s) visible{shown}; {valid}{hint}"
            )
    else:
        cores = usable_cpus()
        if devices > cores:
            raise RunConfigError(
                f"trainer.devices={devices} is more than the {cores} usable CPU core(s) (one gloo process per "
                f"device); use trainer.devices from 1 to {cores}"
            )
    if batch_size % devices:
        up = -(-batch_size // devices) * devices
        raise RunConfigError(
            f"data.batch_size={batch_size} is not divisible by trainer.devices={devices}: it is the global batch, "
            f"split evenly over the devices; use a multiple of {devices} (e.g. data.batch_size={up})"
        )
    return devices


def on_cuda(gpu_value: Any, cpu_value: Any) -> Any:
    """`${pipeline.on_cuda:A,B}` in a config: A when CUDA is available here, else B (trainer=ddp
    picks the GPU trainer's accelerator and precision, or the CPU's, as budget=auto does)."""
    from hydra_plugins.pipeline_optuna_sweeper.workers import cuda_count

    return gpu_value if cuda_count() else cpu_value


OmegaConf.register_new_resolver("pipeline.on_cuda", on_cuda, replace=True)


def model_from_config(c: dict[str, Any]) -> tuple[ModelConfig, str | None]:
    """The ModelConfig a run builds from the resolved root config, and its preset name (a tag).

    The model's reach is max(eval.factors), so that extrapolation can score every factor (a
    learned position table gets that many x context_length rows; see ModelConfig.reach).
    """
    model = dict(c["model"])
    preset = model.pop("preset", None)
    factors = list((c.get("eval") or {}).get("factors") or [1])
    valid = all(isinstance(f, int) and not isinstance(f, bool) and f >= 1 for f in factors)
    return ModelConfig.from_dict(model, reach=max(factors) if valid else 1), preset


def resolve_budget(argv: list[str]) -> list[str]:
    """`budget=auto` (also the default on the command line): gpu when CUDA is present, else cpu."""
    import torch

    choice = "gpu" if torch.cuda.is_available() else "cpu"
    rest = [a for a in argv if a != "budget=auto"]
    if any(a.startswith("budget=") for a in rest):
        return argv
    return rest + [f"budget={choice}"]


def check_overrides(overrides: list[str]) -> None:
    """Refuse an override without a key (`=x`, `+=x`): Hydra's parser accepts it and its
    composer then fails an internal assertion, a traceback instead of a line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(overrides):
        if not override.key_or_group:
            raise RunConfigError(f"override '{override.input_line}' has no key; write KEY=VALUE, e.g. model=llama")

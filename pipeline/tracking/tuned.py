"""A grid arm's tuned learning rate, read from a tune study in MLflow: optimizer.lr_from=tune_lr.

Why: a grid that trains every arm at one learning rate judges each architecture at a rate
tuned (if at all) for another. `tune_lr` tunes lr and warmup per architecture (selected on
val); with `optimizer.lr_from=<tune study>` a grid run takes them from the best finished run of
that study whose architecture equals its own (every `model.*` param but the vocabulary size,
which the tokenizer sets, and the preset's name, which is a label). The value is written into
the run's recorded config, so `pipeline.rerun` reproduces it without reading the study again;
tags `lr_from` and `lr_from_run` say where it came from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.run.spec import RunConfigError, RunSpec
from pipeline.tracking.runs import flatten
from pipeline.tracking.schema import Metric, Tag

NOT_ARCHITECTURE = {"model.vocab_size", "model.preset"}


@dataclass(frozen=True)
class Tuned:
    lr: float
    warmup_steps: int
    run_id: str
    val_loss: float
    n_matching: int  # finished runs of this architecture in the tune study


def architecture(params: dict[str, Any]) -> dict[str, str]:
    """The params that make an architecture, as MLflow holds them (strings)."""
    return {k: str(v) for k, v in params.items() if k.startswith("model.") and k not in NOT_ARCHITECTURE}


def describe(arch: dict[str, str]) -> str:
    keys = ("model.pos_enc.name", "model.norm.name", "model.attention.name", "model.ffn.name", "model.d_model")
    keys += ("model.init_std",)  # runs before the width-aware default (0.02) tuned another init
    return "/".join(arch.get(k, "?") for k in keys)


def find_tuned(uri: str, study: str, arch: dict[str, str]) -> Tuned:
    """The best (lowest final val/loss) finished run of `study` with architecture `arch`."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(study)
    if exp is None:
        raise RunConfigError(
            f"optimizer.lr_from={study}: no MLflow experiment '{study}' in {uri}; "
            f"run the tune study first (make ablate STUDY={study}) or set optimizer.lr_from=null"
        )
    runs = [
        r
        for r in client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", max_results=5000)
        if r.data.tags.get(Tag.SWEEP) != "true" and math.isfinite(r.data.metrics.get(Metric.VAL_LOSS, math.nan))
    ]
    match = [r for r in runs if architecture(r.data.params) == arch]
    if not match:
        tuned = sorted({describe(architecture(r.data.params)) for r in runs})
        raise RunConfigError(
            f"optimizer.lr_from={study}: none of its {len(runs)} finished runs has this architecture "
            f"({describe(arch)}); tuned there: {', '.join(tuned) or 'none'}; tune this arm too or set "
            "optimizer.lr_from=null"
        )
    best = min(match, key=lambda r: r.data.metrics[Metric.VAL_LOSS])
    p = best.data.params
    return Tuned(
        float(p["optimizer.lr"]),
        int(float(p["optimizer.warmup_steps"])),
        best.info.run_id,
        best.data.metrics[Metric.VAL_LOSS],
        len(match),
    )


def apply_tuned(cfg: DictConfig, spec: RunSpec, uri: str) -> tuple[DictConfig, RunSpec, dict[str, str]]:
    """cfg and spec with the tuned lr and warmup; tags naming their source. Before any data."""
    study = spec.optim.lr_from
    model = {**spec.model.to_dict(), "preset": spec.preset}
    tuned = find_tuned(uri, study, architecture(flatten({"model": model})))
    cfg = cfg.copy()
    OmegaConf.update(cfg, "optimizer.lr", tuned.lr)
    OmegaConf.update(cfg, "optimizer.warmup_steps", tuned.warmup_steps)
    OmegaConf.update(cfg, "optimizer.lr_from", None)  # the recorded config holds the values
    optim = replace(spec.optim, lr=tuned.lr, warmup_steps=tuned.warmup_steps, lr_from=None)
    return cfg, replace(spec, optim=optim), {Tag.LR_FROM: study, Tag.LR_FROM_RUN: tuned.run_id}

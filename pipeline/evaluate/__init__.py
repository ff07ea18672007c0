"""Per-run evaluation: context extrapolation and inference cost (docs/evaluation.md).

    from pipeline.evaluate import evaluate_run
    metrics, artifacts = evaluate_run(model, test_tokens, eval_cfg, device, out_dir)

metrics are the `extrap/*` and `cost/*` MLflow metrics of pipeline.tracking.schema (all floats);
artifacts the files written under out_dir (extrapolation.png, evaluation.json).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline.checks import check_keys
from pipeline.evaluate.cost import MEASURE_PROTOCOL, analytic_cost, cost_metrics, measure_inference
from pipeline.evaluate.extrapolation import ROPE_SCALINGS, extrapolation, plot_extrapolation
from pipeline.model import DecoderLM
from pipeline.model.families import FAMILIES
from pipeline.tracking import schema


@dataclass
class DecodeConfig:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    prompt_tokens: int | None = None  # None: the training context length
    new_tokens: int = 32
    repeats: int = 3
    warmup: int = 1
    threads: int | None = None  # CPU threads while timing; None: torch's current count (recorded)


@dataclass
class EvalConfig:
    """The `eval` config node (pipeline/conf/eval/default.yaml)."""

    enabled: bool = True
    factors: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    max_windows: int | None = 32  # blocks scored; None: every block that fits in the test split
    block_tokens: int | None = None  # targets per block; None: max(factors) x context_length
    bootstrap: int = 1000  # resamples for the 95% intervals; 0: none
    batch_tokens: int = 8192
    sliding: bool = False
    rope_scaling: list[str] = field(default_factory=list)
    kv_bytes_per_element: int = 2
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalConfig:
        d = dict(d)
        check_keys("eval", d, cls)
        decode = d.pop("decode", None) or {}
        check_keys("eval.decode", decode, DecodeConfig)
        cfg = cls(**d, decode=DecodeConfig(**decode))
        for key in ("max_windows", "block_tokens", "batch_tokens", "kv_bytes_per_element"):
            _check_int(f"eval.{key}", getattr(cfg, key), 1, optional=key in ("max_windows", "block_tokens"))
        _check_int("eval.bootstrap", cfg.bootstrap, 0)
        for key in ("new_tokens", "repeats", "threads"):
            _check_int(f"eval.decode.{key}", getattr(cfg.decode, key), 1, optional=key == "threads")
        if not cfg.decode.batch_sizes or any(b < 1 for b in cfg.decode.batch_sizes):
            raise ValueError(f"eval.decode.batch_sizes={cfg.decode.batch_sizes} must be positive integers")
        for method in cfg.rope_scaling:
            if method not in ROPE_SCALINGS:
                raise ValueError(f"eval.rope_scaling entry '{method}' is not valid; valid: {', '.join(ROPE_SCALINGS)}")
        return cfg


def _check_int(key: str, value: Any, low: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        valid = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(f"{key}={value!r} is not valid; use {valid}" + (" or null" if optional else ""))


def evaluate_run(
    model: DecoderLM, test_tokens: Tensor, eval_cfg: dict[str, Any], device: torch.device, out_dir: Path
) -> tuple[dict[str, float], list[Path]]:
    """Score a trained model: extrap/ppl_x{f} over held-out tokens, cost/* analytic and measured."""
    cfg = EvalConfig.from_dict(eval_cfg)
    if not cfg.enabled:
        return {}, []
    out_dir = Path(out_dir)
    model = model.to(device)
    start = time.perf_counter()
    ppl = extrapolation(
        model,
        test_tokens,
        cfg.factors,
        cfg.max_windows,
        cfg.batch_tokens,
        cfg.sliding,
        cfg.rope_scaling,
        block_tokens=cfg.block_tokens,
        resamples=cfg.bootstrap,
    )
    extrap_s = time.perf_counter() - start
    analytic = analytic_cost(model.cfg, bytes_per_element=cfg.kv_bytes_per_element)
    d = cfg.decode
    measured = measure_inference(
        model, device, d.batch_sizes, d.prompt_tokens, d.new_tokens, d.repeats, d.warmup, threads=d.threads
    )
    cost_s = time.perf_counter() - start - extrap_s

    c = model.cfg
    title = " / ".join(getattr(c, family).name for family in FAMILIES)
    png = plot_extrapolation(ppl, cfg.factors, c.context_length, out_dir / "extrapolation.png", title)

    protocol = {k: ppl.pop(k) for k in [k for k in ppl if not k.startswith("ppl")]}
    metrics = {schema.extrap(k): v for k, v in ppl.items()}
    protocol.update({k: measured.pop(k) for k in MEASURE_PROTOCOL})
    metrics.update(cost_metrics(analytic, measured))
    metrics[schema.Metric.EVAL_SECONDS] = time.perf_counter() - start  # its share of a trial stays visible
    record = out_dir / "evaluation.json"
    record.write_text(
        json.dumps(
            {
                "metrics": metrics,
                "protocol": {
                    **protocol,
                    "context_length": c.context_length,
                    "factors": cfg.factors,
                    "extrapolation_seconds": extrap_s,
                    "cost_seconds": cost_s,
                },
                "analytic_cost": analytic,
            },
            indent=2,
        )
    )
    return metrics, [png, record]


__all__ = ["EvalConfig", "evaluate_run"]

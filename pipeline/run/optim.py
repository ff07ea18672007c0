"""Optimizer settings and the learning-rate schedule (no Lightning: the run spec imports it)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class OptimConfig:
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    # A tune study (e.g. tune_lr) whose best run of this architecture sets lr and warmup_steps
    # (pipeline.tracking.tuned); None: use lr and warmup_steps as given.
    lr_from: str | None = None


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

"""Training compute of a run and its val-loss curve on a compute axis.

Training FLOPs = 3 x forward FLOPs per token x tokens seen: the backward pass costs about twice
the forward (Kaplan et al. 2020, sec. 2.1, whose C = 6ND is 3 x 2N). The forward count is the
logged `cost/flops_per_token` (pipeline.evaluate.cost): matrix products only, at the training
context, attention scores included, embedding lookups excluded. So a learned position table
(7/8 of whose rows a run never trains) and MoE experts a token skips add nothing, unlike
6 * N_active * D, which counts both.

Equal compute: arms that cost more per token reach step s with more compute, so "val loss at
step 200" favours them. `matched_compute` is the largest compute every arm reached; each
run's val loss there is read off its curve, interpolated linearly in log compute between
validation points (no run is extrapolated past its last point).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from pipeline.analysis.study import Trial

BACKWARD_FACTOR = 3.0  # forward + backward ~= 3 x forward


def tokens_seen(t: Trial) -> float:
    """Training tokens: the logged counter, else steps x batch x context from the params."""
    if "train/tokens_seen" in t.metrics:
        return t.metrics["train/tokens_seen"]
    try:
        return (
            float(t.params["trainer.max_steps"])
            * float(t.params["data.batch_size"])
            * float(t.params["model.context_length"])
        )
    except (KeyError, ValueError):
        return math.nan


def tokens_at(t: Trial, steps: np.ndarray) -> np.ndarray:
    """Training tokens seen at each optimizer step."""
    if "train/tokens_seen" in t.curves:
        return np.interp(steps, *t.curves["train/tokens_seen"])
    try:
        per_step = tokens_seen(t) / float(t.params["trainer.max_steps"])
    except (KeyError, ValueError):
        per_step = math.nan
    return np.asarray(steps, dtype=float) * per_step


def training_flops(t: Trial, tokens: float | np.ndarray | None = None) -> float | np.ndarray:
    """3 x cost/flops_per_token x tokens (all the run's tokens by default); NaN when not logged."""
    fpt = t.metrics.get("cost/flops_per_token", math.nan)
    return BACKWARD_FACTOR * fpt * (tokens_seen(t) if tokens is None else tokens)


def loss_vs_compute(t: Trial, key: str = "val/loss") -> tuple[np.ndarray, np.ndarray] | None:
    """(training FLOPs, loss) at each validation point of the run; None without curve or cost."""
    if key not in t.curves or not math.isfinite(t.metrics.get("cost/flops_per_token", math.nan)):
        return None
    steps, loss = t.curves[key]
    return np.asarray(training_flops(t, tokens_at(t, steps)), dtype=float), loss


def loss_at_compute(t: Trial, compute: float, key: str = "val/loss") -> float:
    """The run's loss at `compute` FLOPs, interpolated in log compute; NaN outside its curve."""
    curve = loss_vs_compute(t, key)
    if curve is None:
        return math.nan
    c, loss = curve
    ok = c > 0
    c, loss = c[ok], loss[ok]
    if len(c) == 0 or compute < c.min() * (1 - 1e-9) or compute > c.max() * (1 + 1e-9):
        return math.nan
    return float(np.interp(math.log(compute), np.log(c), loss))


def matched_compute(runs_by_arm: Sequence[Sequence[Trial]]) -> float:
    """The largest compute every arm reached: min over arms of the max over its runs' curves
    (each run's own last point, so every run of every arm can be read there)."""
    reach = []
    for runs in runs_by_arm:
        ends = [float(curve[0].max()) for t in runs if (curve := loss_vs_compute(t)) is not None and len(curve[0])]
        if not ends:
            return math.nan
        reach.append(min(ends))
    return min(reach) if reach else math.nan

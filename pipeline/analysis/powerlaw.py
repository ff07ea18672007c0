"""Loss-vs-compute power laws and the compute multiplier of an architecture change.

L(C) = a * (C / C0)^-b + c  (Kaplan et al. 2020; Hoffmann et al. 2022 add the offset c, the
irreducible loss). C0 is the smallest compute in the fit, so a is the excess loss there and
the optimiser sees numbers near 1.

Compute multiplier (the "compute-equivalent gain" of e.g. Hoffmann et al.'s comparisons):
architecture X at compute C_ref reaches loss L_X(C_ref); the baseline needs C_base(L_X(C_ref))
for that loss; the multiplier is C_base(L_X(C_ref)) / C_ref (> 1: X is worth more compute).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import curve_fit


@dataclass(frozen=True)
class PowerLaw:
    a: float
    b: float
    c: float
    c0: float  # compute normaliser (FLOPs)
    offset_fitted: bool  # False: too few points for c; fitted with c = 0

    def loss(self, compute: np.ndarray | float) -> np.ndarray | float:
        return self.a * (np.asarray(compute) / self.c0) ** -self.b + self.c

    def compute_for(self, loss: float) -> float:
        """Inverse of `loss`; inf when the loss is at or below the asymptote c."""
        if loss <= self.c:
            return math.inf
        return self.c0 * (self.a / (loss - self.c)) ** (1.0 / self.b)

    def formula(self) -> str:
        return f"L = {self.a:.3g} * (C / {self.c0:.3g})^-{self.b:.3g} + {self.c:.3g}"


def fit_power_law(compute: Sequence[float], loss: Sequence[float]) -> PowerLaw | None:
    """Least-squares fit; needs 4+ distinct compute values for the offset, 2+ without it."""
    C = np.asarray(compute, dtype=float)
    L = np.asarray(loss, dtype=float)
    ok = np.isfinite(C) & np.isfinite(L) & (C > 0)
    C, L = C[ok], L[ok]
    n_distinct = len(np.unique(C))
    if n_distinct < 2:
        return None
    c0 = float(C.min())
    x = C / c0
    # Without an offset, log L = log a - b log x is a straight line.
    slope, intercept = np.polyfit(np.log(x), np.log(L), 1)
    pure = PowerLaw(float(np.exp(intercept)), float(-slope), 0.0, c0, False)
    if n_distinct < 4 or pure.b <= 0:
        return pure if pure.b > 0 else None
    try:
        (a, b, c), _ = curve_fit(
            lambda x, a, b, c: a * x**-b + c,
            x,
            L,
            p0=(L.max() - 0.5 * L.min(), 0.3, 0.5 * L.min()),
            bounds=([0.0, 1e-4, 0.0], [np.inf, 5.0, L.min()]),
            maxfev=20000,
        )
    except (RuntimeError, ValueError):
        return pure
    return PowerLaw(float(a), float(b), float(c), c0, True)


def compute_multiplier(arch: PowerLaw, base: PowerLaw, c_ref: float) -> float:
    """How much more compute the baseline needs to match `arch` at compute c_ref."""
    return base.compute_for(float(arch.loss(c_ref))) / c_ref

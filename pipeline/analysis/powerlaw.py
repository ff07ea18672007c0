"""Loss-vs-compute power laws and the compute multiplier of an architecture change.

L(C) = a * (C / C0)^-b + c  (Kaplan et al. 2020; Hoffmann et al. 2022 add the offset c, the
irreducible loss). C0 is the smallest compute in the fit, so a is the excess loss there.

Fit as Hoffmann et al. (2022, sec. D.2): Huber loss (delta = 1e-3) on the residuals of log L,
with L written as exp(LSE(log a - b log(C/C0), log c)) so that a, c > 0 hold by construction,
from a few starting points, keeping the best (trust-region least squares with the Huber loss,
scipy's `least_squares(loss="huber")`, where they used L-BFGS). The offset needs
four or more distinct compute values (three parameters and one left to check them); with two or
three the fit is a straight line in log-log (c = 0) and is marked not identifiable.

Compute multiplier (a "compute-equivalent gain"): at a loss L* both fits reach inside their
own compute ranges (the lower of the two fits' losses at their largest compute), the baseline
needs C_base(L*) and the architecture C_arch(L*); the multiplier is C_base(L*) / C_arch(L*)
(> 1: the change is worth that much compute). No multiplier is reported when the two loss
ranges do not overlap (that would extrapolate a fit) or when a fit is not identifiable. Its
interval is a percentile bootstrap over runs, resampled within each compute level.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

HUBER_DELTA = 1e-3  # Hoffmann et al. 2022
MIN_POINTS_WITH_OFFSET = 4


@dataclass(frozen=True)
class PowerLaw:
    a: float
    b: float
    c: float
    c0: float  # compute normaliser (FLOPs)
    offset_fitted: bool  # False: too few compute values for c; fitted with c = 0
    c_min: float = math.nan  # the compute range of the points fitted
    c_max: float = math.nan
    identifiable: bool = True  # False: too few compute values, or a parameter at its bound

    def loss(self, compute: np.ndarray | float) -> np.ndarray | float:
        return self.a * (np.asarray(compute) / self.c0) ** -self.b + self.c

    def compute_for(self, loss: float) -> float:
        """Inverse of `loss`; inf when the loss is at or below the asymptote c."""
        if loss <= self.c:
            return math.inf
        return self.c0 * (self.a / (loss - self.c)) ** (1.0 / self.b)

    def formula(self) -> str:
        return f"L = {self.a:.3g} * (C / {self.c0:.3g})^-{self.b:.3g} + {self.c:.3g}"


def _huber_fit(x: np.ndarray, L: np.ndarray, start: PowerLaw | None = None) -> tuple[float, float, float] | None:
    logL, logx = np.log(L), np.log(x)
    e_hi = math.log(L.min())  # c below every observed loss

    def residuals(p: np.ndarray) -> np.ndarray:
        alpha, b, e = p
        return np.logaddexp(alpha - b * logx, e) - logL

    # A few starting points (Hoffmann et al. use a grid); a bootstrap refit adds the full-data
    # fit. Trust-region least squares with the Huber loss (scale delta) is the robust fit.
    starts = [(0.1, 0.3), (0.3, 0.7), (0.8, 0.95)]
    p0s = [np.array([math.log(max(L.max() - f * L.min(), 1e-6)), b0, math.log(f * L.min())]) for b0, f in starts]
    if start is not None:
        p0s.append(np.array([math.log(start.a), start.b, math.log(max(start.c, 1e-5))]))
    lo, hi = np.array([-20.0, 1e-3, -12.0]), np.array([20.0, 3.0, e_hi])
    best = None
    for p0 in p0s:
        p0 = np.clip(p0, lo + 1e-9, hi - 1e-9)
        try:
            res = least_squares(residuals, p0, bounds=(lo, hi), loss="huber", f_scale=HUBER_DELTA)
        except ValueError:
            continue
        if best is None or res.cost < best.cost:
            best = res
    if best is None or not np.all(np.isfinite(best.x)):
        return None
    alpha, b, e = best.x
    return math.exp(alpha), float(b), math.exp(e)


def fit_power_law(compute: Sequence[float], loss: Sequence[float], start: PowerLaw | None = None) -> PowerLaw | None:
    """Robust fit in log space; None with fewer than two distinct compute values. `start`: a
    previous fit of similar data to start from (bootstrap replicates)."""
    C = np.asarray(compute, dtype=float)
    L = np.asarray(loss, dtype=float)
    ok = np.isfinite(C) & np.isfinite(L) & (C > 0) & (L > 0)
    C, L = C[ok], L[ok]
    n_distinct = len(np.unique(C))
    if n_distinct < 2:
        return None
    c0 = float(C.min())
    x = C / c0
    lo, hi = float(C.min()), float(C.max())
    if n_distinct < MIN_POINTS_WITH_OFFSET:
        slope, intercept = np.polyfit(np.log(x), np.log(L), 1)
        if -slope <= 0:
            return None
        return PowerLaw(float(np.exp(intercept)), float(-slope), 0.0, c0, False, lo, hi, identifiable=False)
    fit = _huber_fit(x, L, start if start is not None and start.offset_fitted and start.c0 == c0 else None)
    if fit is None:
        return None
    a, b, c = fit
    at_bound = not (1e-3 * 1.01 < b < 3.0 * 0.99) or c >= L.min() * 0.999
    return PowerLaw(a, b, c, c0, True, lo, hi, identifiable=not at_bound)


def compute_multiplier(arch: PowerLaw, base: PowerLaw) -> tuple[float, float]:
    """(multiplier, L*): C_base(L*) / C_arch(L*) at the lowest loss both fits reach inside
    their compute ranges; (nan, nan) when the ranges do not overlap."""
    l_star = max(float(base.loss(base.c_max)), float(arch.loss(arch.c_max)))
    if l_star > min(float(base.loss(base.c_min)), float(arch.loss(arch.c_min))):
        return math.nan, math.nan
    return base.compute_for(l_star) / arch.compute_for(l_star), l_star


def _resample(rng: np.random.Generator, C: np.ndarray, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs resampled with replacement within each compute level (every level stays)."""
    idx = np.concatenate([rng.choice(np.flatnonzero(C == c), size=(C == c).sum()) for c in np.unique(C)])
    return C[idx], L[idx]


@dataclass(frozen=True)
class Multiplier:
    value: float
    low: float  # 95% percentile bootstrap interval
    high: float
    loss: float  # L*, where it is read
    defined_share: float  # bootstrap replicates where it was defined
    why_not: str = ""  # set when there is no multiplier


def multiplier_with_interval(
    arch_points: tuple[Sequence[float], Sequence[float]],
    base_points: tuple[Sequence[float], Sequence[float]],
    n_boot: int = 100,
    seed: int = 0,
) -> Multiplier:
    """The compute multiplier of arch over base, with its bootstrap interval and, when it is
    not reported, why."""
    arch_fit, base_fit = fit_power_law(*arch_points), fit_power_law(*base_points)
    nan = math.nan
    for name, fit in (("architecture", arch_fit), ("baseline", base_fit)):
        if fit is None or not fit.identifiable:
            n = len(np.unique(np.asarray((arch_points if name == "architecture" else base_points)[0])))
            why = (
                f"the {name}'s fit is not identifiable ({n} compute values; the offset needs "
                f"{MIN_POINTS_WITH_OFFSET}, and no parameter may sit at its bound)"
            )
            return Multiplier(nan, nan, nan, nan, 0.0, why)
    value, l_star = compute_multiplier(arch_fit, base_fit)
    if not math.isfinite(value):
        return Multiplier(nan, nan, nan, nan, 0.0, "the two fits' loss ranges do not overlap (no extrapolation)")
    rng = np.random.default_rng(seed)
    Ca, La = (np.asarray(v, dtype=float) for v in arch_points)
    Cb, Lb = (np.asarray(v, dtype=float) for v in base_points)
    boots = []
    for _ in range(n_boot):
        fa, fb = fit_power_law(*_resample(rng, Ca, La), arch_fit), fit_power_law(*_resample(rng, Cb, Lb), base_fit)
        m = compute_multiplier(fa, fb)[0] if fa and fb and fa.identifiable and fb.identifiable else nan
        boots.append(m)
    b = np.array(boots)
    ok = b[np.isfinite(b)]
    lo, hi = (float(np.percentile(ok, 2.5)), float(np.percentile(ok, 97.5))) if len(ok) else (nan, nan)
    return Multiplier(value, lo, hi, l_star, len(ok) / n_boot)

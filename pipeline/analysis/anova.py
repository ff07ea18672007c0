"""Each factor's share of the variance of a complete grid: eta^2, with an interval.

On a complete, balanced grid (every cell at every seed) the classical ANOVA decomposition is
exact: SS_total = sum over main effects, two-way interactions, seed (a block) and the rest.
eta^2 of a term = SS_term / SS_total, the share of the spread of the runs it explains. This is
what fANOVA (Hutter et al. 2014) estimates through a random-forest surrogate when the design is
sampled; on a grid it is computed exactly.

Interval: on partial eta^2 = SS_term / (SS_term + SS_error), by inverting the noncentral F
distribution of the term's F statistic (Steiger 2004, "Beyond the F test", Psychological
Methods 9(2)). SS_error is what is left after mains, two-way interactions and seed; with one
seed and two factors nothing is left, so the interaction is taken as the error (additivity).
The interval assumes equal noise across cells, which the effects' intervals do not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

import numpy as np
from scipy import stats
from scipy.optimize import brentq

from pipeline.analysis.effects import Factorial


@dataclass(frozen=True)
class Share:
    term: str  # "pos_enc", "pos_enc × ffn", "seed", "rest"
    ss: float
    df: int
    eta2: float  # SS_term / SS_total
    partial: float  # SS_term / (SS_term + SS_error)
    partial_low: float
    partial_high: float


def _lambda_for(f: float, df1: int, df2: int, q: float) -> float:
    """The noncentrality at which F's cdf at `f` equals q (0 when even lambda = 0 is below)."""
    g = lambda lam: stats.ncf.cdf(f, df1, df2, lam) - q  # noqa: E731  (decreasing in lam)
    if g(0.0) <= 0:
        return 0.0
    hi = max(10.0, f * df1 * 4)
    while g(hi) > 0 and hi < 1e7:
        hi *= 4
    return brentq(g, 0.0, hi)


def partial_eta2_interval(ss: float, df1: int, ss_err: float, df2: int, confidence: float) -> tuple[float, float]:
    if df2 <= 0 or ss_err <= 0:
        return math.nan, math.nan
    f = (ss / df1) / (ss_err / df2)
    n = df1 + df2 + 1
    lam_lo = _lambda_for(f, df1, df2, 0.5 + confidence / 2)
    lam_hi = _lambda_for(f, df1, df2, 0.5 - confidence / 2)
    return lam_lo / (lam_lo + n), lam_hi / (lam_hi + n)


def is_complete(fac: Factorial) -> bool:
    return fac.n_batch == 0 and bool(np.isfinite(fac.y).all())


def variance_shares(fac: Factorial, confidence: float = 0.95) -> list[Share] | None:
    """Shares of every main effect, two-way interaction, the seed and the rest; None unless
    the grid is complete and balanced."""
    if not is_complete(fac):
        return None
    y = fac.y
    nf = len(fac.factors)
    m = y.mean()
    total = float(((y - m) ** 2).sum())
    N = y.size
    terms: list[tuple[str, float, int]] = []
    means1 = {}
    for i, f in enumerate(fac.factors):
        other = tuple(j for j in range(nf + 1) if j != i)
        mi = y.mean(axis=other)
        means1[i] = mi
        terms.append((f, N / len(mi) * float(((mi - m) ** 2).sum()), len(mi) - 1))
    two_way = []
    for i, j in combinations(range(nf), 2):
        other = tuple(k for k in range(nf + 1) if k not in (i, j))
        mij = y.mean(axis=other)
        resid = mij - means1[i][:, None] - means1[j][None, :] + m
        ss = N / mij.size * float((resid**2).sum())
        two_way.append((f"{fac.factors[i]} × {fac.factors[j]}", ss, (mij.shape[0] - 1) * (mij.shape[1] - 1)))
    S = y.shape[-1]
    seed = []
    if S > 1:
        ms = y.mean(axis=tuple(range(nf)))
        seed = [("seed", N / S * float(((ms - m) ** 2).sum()), S - 1)]
    explained = terms + two_way + seed
    err_ss = total - sum(ss for _, ss, _ in explained)
    err_df = (N - 1) - sum(df for _, _, df in explained)
    error_terms = [("rest", max(err_ss, 0.0), err_df)]
    if err_df <= 0:  # one seed, two factors: the interaction is the only error there is
        error_terms = [(name, ss, df) for name, ss, df in two_way]
        explained = terms + seed
        err_ss, err_df = sum(ss for _, ss, _ in two_way), sum(df for _, _, df in two_way)
    out = []
    for name, ss, df in explained:
        lo, hi = partial_eta2_interval(ss, df, err_ss, err_df, confidence) if df > 0 else (math.nan, math.nan)
        partial = ss / (ss + err_ss) if ss + err_ss > 0 else math.nan
        out.append(Share(name, ss, df, ss / total if total > 0 else math.nan, partial, lo, hi))
    for name, ss, df in error_terms:
        if df > 0:
            out.append(Share(name, ss, df, ss / total if total > 0 else math.nan, math.nan, math.nan, math.nan))
    return out

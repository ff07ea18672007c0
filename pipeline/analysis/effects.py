"""Factor effects of a factorial study: main effects and two-way interactions, with intervals
that hold up when the seeds are few, the noise differs between cells and many contrasts are read.

A study is an array y[level of factor 1, ..., level of factor f, seed] of a response (final val
loss), NaN where a run is missing. Every contrast is a signed sum of cells, computed *per seed*
(seed is a block: every configuration with the same seed sees the same batches, so differences
paired on seed cancel the batch-order noise) and per combination k of the other factors:

  main effect of level l of F (vs F's reference r):  d[k, s] = y[l, k, s] - y[r, k, s]
  interaction (A: a vs a0) x (B: b vs b0):          d[k, s] = y[a,b,k,s] - y[a0,b,k,s]
                                                              - y[a,b0,k,s] + y[a0,b0,k,s]
  estimate = mean over matched k of  d_bar[k]  (d_bar[k]: mean over the seeds k has)

Only k (and seeds) where every term exists are used, so a partial grid gives effects over the
matched cells. The interval is chosen per contrast:

  - "seeds" (every matched k has >= 2 seeds): per-contrast, Welch-type variance
        Var = sum_k s_k^2 / n_k / K^2,  s_k^2 = the variance of d[k, .] over seeds,
    with Satterthwaite's degrees of freedom. Nothing is pooled across cells, so a noisy cell
    widens only the contrasts that use it (Welch 1947; Satterthwaite 1946). Assumes only that
    seeds are independent draws.
  - "cells" (one seed, K >= 2): the t-interval over the per-cell differences d_bar[k] (df K-1),
    as for an unreplicated factorial (Montgomery, "Design and Analysis of Experiments", 6.5):
    it assumes additivity, i.e. the effect does not change with the other factors, so the
    spread of d_bar[k] is noise.
  - "none" (one seed, one matched cell): no interval.

Multiplicity: the main effects and interactions of a study form one family; Holm's step-down
(Holm 1979) adjusts their p-values, so P(any false "stands out") <= alpha under any truth.

Every function takes arrays with optional leading batch dimensions, so the simulation tests
evaluate hundreds of synthetic studies in one call.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import combinations

import numpy as np
from scipy import stats

Cell = tuple[str, ...]  # one level per factor, in `Factorial.factors` order
METHODS = ("none", "cells", "seeds")  # codes 0, 1, 2 of Contrast.method

ASSUMPTIONS = {
    "seeds": "per-contrast variance over the seeds, paired on seed (seed as a block), Welch-type with "
    "Satterthwaite degrees of freedom; it assumes only that seeds are independent draws",
    "cells": "t over the per-cell differences (one seed: no replicate to estimate noise from); it "
    "assumes additivity, i.e. that the effect is the same in every cell of the other factors",
    "none": "no interval: one seed and one matched cell",
}


@dataclass(frozen=True)
class Contrast:
    """Arrays of shape `batch` (scalars for one study)."""

    estimate: np.ndarray
    se: np.ndarray
    df: np.ndarray
    n_cells: np.ndarray  # matched cells K of the other factors
    n_seeds: np.ndarray  # distinct seeds per matched cell, smallest
    method: np.ndarray  # index into METHODS

    def interval(self, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        with np.errstate(invalid="ignore"):
            half = stats.t.ppf(0.5 + confidence / 2, self.df) * self.se
        return self.estimate - half, self.estimate + half

    def p_value(self) -> np.ndarray:
        """Two-sided t-test of estimate = 0; NaN where there is no interval."""
        with np.errstate(invalid="ignore", divide="ignore"):
            t = np.abs(self.estimate) / self.se
            p = 2 * stats.t.sf(t, self.df)
        # A zero standard error (seeds that agree exactly): 0 unless the estimate is 0 too.
        zero = (self.se == 0) & (self.method > 0)
        return np.where(zero, np.where(self.estimate == 0, 1.0, 0.0), p)


def contrast(d: np.ndarray) -> Contrast:
    """A contrast from its per-cell, per-seed values d of shape (..., K, S); NaN = unmatched."""
    d = np.asarray(d, dtype=float)
    ok = np.isfinite(d)
    n = ok.sum(-1)  # seeds per cell k
    used = n >= 1
    K = used.sum(-1)
    z = np.where(ok, d, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        dbar = z.sum(-1) / n  # NaN where n = 0
        est = np.where(used, dbar, 0.0).sum(-1) / K
        # "seeds": every matched cell has two or more seeds
        s2 = (np.where(ok, d - dbar[..., None], 0.0) ** 2).sum(-1) / (n - 1)
        v = np.where(used, s2 / n, 0.0)
        seeds_ok = (K >= 1) & np.all(~used | (n >= 2), axis=-1)
        v_sum = v.sum(-1)
        se_seeds = np.sqrt(v_sum) / K
        # Satterthwaite's df with unbiased estimates of (sum v)^2 and v_k^2 in place of the
        # plug-in ones: E[s^4] = sigma^4 (n+1)/(n-1), so the plug-in df is biased low and, at
        # two seeds, the intervals cover 97-98% instead of 95%. Clipped to the df's own range.
        rep = used & (n >= 2)
        v2 = np.where(rep, v**2 / (n + 1), 0.0).sum(-1)
        df_seeds = (v_sum**2 - 2 * v2) / v2
        lo_df = np.where(rep, n - 1, np.inf).min(-1)
        df_seeds = np.clip(df_seeds, lo_df, np.where(rep, n - 1, 0).sum(-1))
        # "cells": the spread of the per-cell differences
        dev = np.where(used, dbar - est[..., None], 0.0)
        se_cells = np.sqrt((dev**2).sum(-1) / (K - 1) / K)
    method = np.where(seeds_ok, 2, np.where(K >= 2, 1, 0))
    se = np.where(method == 2, se_seeds, np.where(method == 1, se_cells, np.nan))
    df = np.where(method == 2, df_seeds, np.where(method == 1, K - 1.0, np.nan))
    df = np.where((method == 2) & (v_sum == 0), np.inf, df)  # exact agreement: t -> normal
    n_min = np.where(used, n, np.iinfo(np.int64).max).min(-1)
    return Contrast(np.where(K >= 1, est, np.nan), se, df, K, np.where(K >= 1, n_min, 0), method)


def holm(p: np.ndarray) -> np.ndarray:
    """Holm-adjusted p-values along the last axis; NaN entries are not in the family."""
    p = np.asarray(p, dtype=float)
    finite = np.isfinite(p)
    m = finite.sum(-1, keepdims=True)
    order = np.argsort(np.where(finite, p, np.inf), axis=-1)
    ranked = np.take_along_axis(np.where(finite, p, np.inf), order, -1)
    with np.errstate(invalid="ignore"):  # inf (not in the family) x 0
        scaled = np.minimum(1.0, ranked * (m - np.arange(p.shape[-1])))
    adjusted = np.maximum.accumulate(np.where(np.isfinite(ranked), scaled, 0.0), axis=-1)
    out = np.empty_like(p)
    np.put_along_axis(out, order, adjusted, -1)
    return np.where(finite, out, np.nan)


# ---------------------------------------------------------------------------------------------
# One study: named factors and levels


@dataclass(frozen=True)
class Estimate:
    estimate: float
    ci_low: float
    ci_high: float
    n_cells: int  # matched cells of the other factors
    method: str  # "seeds" | "cells" | "none"
    p: float = math.nan
    p_holm: float = math.nan  # Holm-adjusted over the study's family of contrasts
    df: float = math.nan
    n_seeds: int = 0  # distinct seeds per matched cell (smallest)

    @property
    def excludes_zero(self) -> bool:
        return math.isfinite(self.ci_low) and (self.ci_low > 0 or self.ci_high < 0)

    def significant(self, alpha: float = 0.05) -> bool:
        """Stands out after the Holm correction across the family."""
        return math.isfinite(self.p_holm) and self.p_holm <= alpha


@dataclass(frozen=True)
class MainEffect(Estimate):
    factor: str = ""
    level: str = ""
    reference: str = ""


@dataclass(frozen=True)
class Interaction(Estimate):
    factor_a: str = ""
    level_a: str = ""
    reference_a: str = ""
    factor_b: str = ""
    level_b: str = ""
    reference_b: str = ""


def _scalar(c: Contrast, confidence: float) -> dict:
    lo, hi = c.interval(confidence)
    return {
        "estimate": float(c.estimate),
        "ci_low": float(lo),
        "ci_high": float(hi),
        "n_cells": int(c.n_cells),
        "method": METHODS[int(c.method)],
        "p": float(c.p_value()),
        "df": float(c.df),
        "n_seeds": int(c.n_seeds),
    }


class Factorial:
    """Values per cell and seed of a (possibly partial) factorial design.

    `y` has shape (*batch, *[len(levels[f]) for f in factors], n_seeds), NaN where no run;
    `from_cells` builds it from {cell: {seed: value}}.
    """

    def __init__(
        self,
        factors: Sequence[str],
        levels: Mapping[str, Sequence[str]],
        reference: Mapping[str, str],
        y: np.ndarray,
        seeds: Sequence[str] | None = None,
    ) -> None:
        self.factors = list(factors)
        self.levels = {f: list(levels[f]) for f in self.factors}
        self.reference = {f: reference[f] for f in self.factors}
        for f in self.factors:
            if self.reference[f] not in self.levels[f]:
                raise ValueError(
                    f"reference level for '{f}' is '{self.reference[f]}'; valid: {', '.join(self.levels[f])}"
                )
        self.y = np.asarray(y, dtype=float)
        shape = tuple(len(self.levels[f]) for f in self.factors)
        nf = len(shape)
        if self.y.ndim < nf + 1 or self.y.shape[self.y.ndim - nf - 1 : -1] != shape:
            raise ValueError(f"values of shape {self.y.shape} do not end in levels {shape} + (seeds,)")
        self.n_batch = self.y.ndim - nf - 1
        self.seeds = list(seeds) if seeds is not None else [str(i) for i in range(self.y.shape[-1])]

    @classmethod
    def from_cells(
        cls,
        factors: Sequence[str],
        cells: Mapping[Cell, Mapping[str, float]],
        levels: Mapping[str, Sequence[str]],
        reference: Mapping[str, str],
    ) -> Factorial:
        """{cell: {seed: value}}: one value per distinct seed (the caller deduplicates)."""
        seeds = sorted({s for per in cells.values() for s in per}, key=lambda s: (not s.isdigit(), s.zfill(12)))
        shape = [len(levels[f]) for f in factors] + [len(seeds)]
        y = np.full(shape, np.nan)
        for cell, per in cells.items():
            if len(cell) != len(factors):
                raise ValueError(f"cell {cell} has {len(cell)} levels; factors: {list(factors)}")
            idx = tuple(list(levels[f]).index(v) for f, v in zip(factors, cell))
            for s, v in per.items():
                y[idx + (seeds.index(s),)] = v
        return cls(factors, levels, reference, y, seeds)

    # -- cells ---------------------------------------------------------------------------------

    def cell_values(self, cell: Cell) -> np.ndarray:
        idx = tuple(self.levels[f].index(v) for f, v in zip(self.factors, cell))
        v = self.y[(..., *idx, slice(None))]
        return v[np.isfinite(v)]

    @property
    def cells(self) -> dict[Cell, np.ndarray]:
        """Cells that hold at least one run (one study, no batch)."""
        out = {}
        for idx in np.ndindex(*self.y.shape[self.n_batch : -1]):
            v = self.y[(..., *idx, slice(None))]
            if np.isfinite(v).any():
                out[tuple(self.levels[f][i] for f, i in zip(self.factors, idx))] = v[np.isfinite(v)]
        return out

    @property
    def min_seeds(self) -> int:
        """Distinct seeds in the least replicated cell that has a run."""
        n = np.isfinite(self.y).sum(-1)
        return int(n[n > 0].min()) if (n > 0).any() else 0

    def _axis(self, factor: str) -> int:
        return self.n_batch + self.factors.index(factor)

    def _flat(self, d: np.ndarray) -> np.ndarray:
        """(*batch, other levels..., S) -> (*batch, K, S)."""
        return d.reshape(*d.shape[: self.n_batch], -1, d.shape[-1])

    # -- contrasts -----------------------------------------------------------------------------

    def main_contrast(self, factor: str, level: str) -> Contrast:
        ax, lv = self._axis(factor), self.levels[factor]
        hi = np.take(self.y, lv.index(level), axis=ax)
        lo = np.take(self.y, lv.index(self.reference[factor]), axis=ax)
        return contrast(self._flat(hi - lo))

    def interaction_contrast(self, fa: str, la: str, fb: str, lb: str) -> Contrast:
        ia, ib = self._axis(fa), self._axis(fb)
        ib_after = ib - 1 if ib > ia else ib  # axis of fb once fa's axis is taken out

        def at(a: str, b: str) -> np.ndarray:
            ya = np.take(self.y, self.levels[fa].index(a), axis=ia)
            return np.take(ya, self.levels[fb].index(b), axis=ib_after)

        ra, rb = self.reference[fa], self.reference[fb]
        return contrast(self._flat(at(la, lb) - at(ra, lb) - at(la, rb) + at(ra, rb)))

    def family(self) -> list[tuple]:
        """Every contrast of the study: ("main", f, l) and ("inter", fa, la, fb, lb)."""
        out: list[tuple] = [
            ("main", f, lvl) for f in self.factors for lvl in self.levels[f] if lvl != self.reference[f]
        ]
        for fa, fb in combinations(self.factors, 2):
            for la in self.levels[fa]:
                for lb in self.levels[fb]:
                    if la != self.reference[fa] and lb != self.reference[fb]:
                        out.append(("inter", fa, la, fb, lb))
        return out

    def contrasts(self) -> tuple[list[tuple], list[Contrast], np.ndarray]:
        """The family, its contrasts and their Holm-adjusted p-values (shape (*batch, m))."""
        fam = self.family()
        cs = [self.main_contrast(*k[1:]) if k[0] == "main" else self.interaction_contrast(*k[1:]) for k in fam]
        if not cs:
            return fam, cs, np.zeros((*self.y.shape[: self.n_batch], 0))
        p = np.stack([c.p_value() for c in cs], axis=-1)
        return fam, cs, holm(p)

    # -- one study: named results --------------------------------------------------------------

    def main_effect(self, factor: str, level: str, confidence: float = 0.95) -> MainEffect:
        c = self.main_contrast(factor, level)
        return MainEffect(**_scalar(c, confidence), factor=factor, level=level, reference=self.reference[factor])

    def interaction(self, fa: str, la: str, fb: str, lb: str, confidence: float = 0.95) -> Interaction:
        c = self.interaction_contrast(fa, la, fb, lb)
        ra, rb = self.reference[fa], self.reference[fb]
        return Interaction(
            **_scalar(c, confidence), factor_a=fa, level_a=la, reference_a=ra, factor_b=fb, level_b=lb, reference_b=rb
        )

    def analyse(self, confidence: float = 0.95) -> tuple[list[MainEffect], list[Interaction]]:
        """Main effects and interactions, each with its Holm-adjusted p over the whole family.
        Interactions with no matched square are left out; they are not in the family."""
        if self.n_batch:
            raise ValueError("analyse() reads one study; use contrasts() for a batch")
        fam, cs, p_holm = self.contrasts()
        mains, inters = [], []
        for key, c, ph in zip(fam, cs, p_holm):
            if key[0] == "main":
                mains.append(replace(self.main_effect(*key[1:], confidence), p_holm=float(ph)))
            elif math.isfinite(float(c.estimate)):
                inters.append(replace(self.interaction(*key[1:], confidence), p_holm=float(ph)))
        return mains, sorted(inters, key=lambda x: -abs(x.estimate))

    def main_effects(self, confidence: float = 0.95) -> list[MainEffect]:
        return self.analyse(confidence)[0]

    def interactions(self, confidence: float = 0.95) -> list[Interaction]:
        return self.analyse(confidence)[1]

    @property
    def family_size(self) -> int:
        """Contrasts with a p-value: the m of the Holm correction."""
        if self.n_batch:
            raise ValueError("family_size is per study")
        _, _, p = self.contrasts()
        return int(np.isfinite(p).sum())

"""Factor effects of a factorial study: main effects and two-way interactions, with CIs.

A study is a table of cells (one per combination of factor levels) holding replicate values
of a response (final val loss per seed). With y_bar[cell] the cell mean:

  main effect of level l of factor F (against F's reference level r)
      E = mean over the cells c of the other factors of  y_bar[l, c] - y_bar[r, c]
  interaction of (A: a vs a0) x (B: b vs b0)
      I = mean over c of  (y_bar[a,b,c] - y_bar[a0,b,c]) - (y_bar[a,b0,c] - y_bar[a0,b0,c])

Only cells c where every term exists are used, so a partial grid (an Optuna sampler that
skipped combinations) gives effects over the matched cells rather than failing.

Confidence intervals (Montgomery, "Design and Analysis of Experiments", ch. 5):
  - with replicates: pooled within-cell variance s_p^2 (df = sum(n_i - 1)); a contrast
    sum_j w_j y_bar_j has variance s_p^2 * sum_j w_j^2 / n_j; t-interval with that df.
  - without replicates (one seed): the t-interval over the per-cell differences (df = K - 1),
    which treats higher-order interactions as noise, as for an unreplicated factorial.
  - neither (one seed, one matched cell): no interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np
from scipy import stats

Cell = tuple[str, ...]  # one level per factor, in `Factorial.factors` order


@dataclass(frozen=True)
class Estimate:
    estimate: float
    ci_low: float
    ci_high: float
    n_cells: int  # matched cells of the other factors
    method: str  # "replicates" | "cells" | "none"

    @property
    def excludes_zero(self) -> bool:
        return math.isfinite(self.ci_low) and (self.ci_low > 0 or self.ci_high < 0)


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
    stands_out: bool = False


class Factorial:
    """Replicate values per cell of a (possibly partial) factorial design."""

    def __init__(
        self,
        factors: Sequence[str],
        cells: Mapping[Cell, Sequence[float]],
        levels: Mapping[str, Sequence[str]],
        reference: Mapping[str, str],
    ) -> None:
        self.factors = list(factors)
        self.cells = {tuple(k): np.asarray(v, dtype=float) for k, v in cells.items() if len(v)}
        self.levels = {f: list(levels[f]) for f in self.factors}
        self.reference = dict(reference)
        for f in self.factors:
            if self.reference[f] not in self.levels[f]:
                raise ValueError(
                    f"reference level for '{f}' is '{self.reference[f]}'; valid: {', '.join(self.levels[f])}"
                )
        for key in self.cells:
            if len(key) != len(self.factors):
                raise ValueError(f"cell {key} has {len(key)} levels; factors: {self.factors}")
        # Pooled within-cell variance over every replicated cell (assumes equal variances).
        dof = sum(len(v) - 1 for v in self.cells.values())
        ss = sum(((v - v.mean()) ** 2).sum() for v in self.cells.values())
        self.pooled_df = dof
        self.pooled_var = ss / dof if dof > 0 else math.nan

    def _mean(self, key: Cell) -> float:
        return float(self.cells[key].mean())

    def _contrast(self, terms_per_cell: list[list[tuple[Cell, float]]], confidence: float) -> Estimate:
        """Average over matched cells of sum_j w_j * y_bar_j, with its interval."""
        diffs = np.array([sum(w * self._mean(k) for k, w in terms) for terms in terms_per_cell])
        K = len(diffs)
        if K == 0:
            return Estimate(math.nan, math.nan, math.nan, 0, "none")
        est = float(diffs.mean())
        q = 0.5 + confidence / 2
        if self.pooled_df > 0:
            # Var(mean_c sum_j w_j y_bar_j) = s_p^2 / K^2 * sum_c sum_j w_j^2 / n_j
            inv_n = sum(w * w / len(self.cells[k]) for terms in terms_per_cell for k, w in terms)
            half = stats.t.ppf(q, self.pooled_df) * math.sqrt(self.pooled_var * inv_n) / K
            return Estimate(est, est - half, est + half, K, "replicates")
        if K >= 2:
            half = stats.t.ppf(q, K - 1) * diffs.std(ddof=1) / math.sqrt(K)
            return Estimate(est, est - half, est + half, K, "cells")
        return Estimate(est, math.nan, math.nan, K, "none")

    def _others(self, exclude: Sequence[int]) -> list[Cell]:
        """Distinct combinations of the factors not in `exclude`, in first-seen order."""
        seen: dict[Cell, None] = {}
        for key in self.cells:
            seen[tuple(v for i, v in enumerate(key) if i not in exclude)] = None
        return list(seen)

    @staticmethod
    def _insert(other: Cell, at: dict[int, str]) -> Cell:
        it = iter(other)
        return tuple(at[i] if i in at else next(it) for i in range(len(other) + len(at)))

    def main_effect(self, factor: str, level: str, confidence: float = 0.95) -> MainEffect:
        i = self.factors.index(factor)
        ref = self.reference[factor]
        terms = []
        for other in self._others([i]):
            hi, lo = self._insert(other, {i: level}), self._insert(other, {i: ref})
            if hi in self.cells and lo in self.cells:
                terms.append([(hi, 1.0), (lo, -1.0)])
        e = self._contrast(terms, confidence)
        return MainEffect(**vars(e), factor=factor, level=level, reference=ref)

    def main_effects(self, confidence: float = 0.95) -> list[MainEffect]:
        return [
            self.main_effect(f, lvl, confidence)
            for f in self.factors
            for lvl in self.levels[f]
            if lvl != self.reference[f]
        ]

    def interaction(self, fa: str, la: str, fb: str, lb: str, confidence: float = 0.95) -> Interaction:
        ia, ib = self.factors.index(fa), self.factors.index(fb)
        ra, rb = self.reference[fa], self.reference[fb]
        terms = []
        for other in self._others([ia, ib]):
            corners = [(la, lb, 1.0), (ra, lb, -1.0), (la, rb, -1.0), (ra, rb, 1.0)]
            keys = [(self._insert(other, {ia: a, ib: b}), w) for a, b, w in corners]
            if all(k in self.cells for k, _ in keys):
                terms.append(keys)
        e = self._contrast(terms, confidence)
        return Interaction(**vars(e), factor_a=fa, level_a=la, reference_a=ra, factor_b=fb, level_b=lb, reference_b=rb)

    def interactions(self, confidence: float = 0.95, relative_threshold: float = 0.5) -> list[Interaction]:
        """Every two-way level contrast. One stands out when its CI excludes zero; with no CI,
        when |I| >= relative_threshold * the larger of the two main effects (an interaction
        that size can reverse a conclusion drawn from the main effects alone)."""
        mains = {(m.factor, m.level): m.estimate for m in self.main_effects(confidence)}
        out = []
        for fa, fb in combinations(self.factors, 2):
            for la in self.levels[fa]:
                for lb in self.levels[fb]:
                    if la == self.reference[fa] or lb == self.reference[fb]:
                        continue
                    it = self.interaction(fa, la, fb, lb, confidence)
                    if not math.isfinite(it.estimate):
                        continue
                    if math.isfinite(it.ci_low):
                        stands = it.excludes_zero
                    else:
                        scale = max(abs(mains[(fa, la)]), abs(mains[(fb, lb)]))
                        stands = abs(it.estimate) >= relative_threshold * scale
                    out.append(Interaction(**{**vars(it), "stands_out": stands}))
        return sorted(out, key=lambda x: -abs(x.estimate))

"""Main effects and interactions against hand computations on small synthetic designs."""

import math

import pytest

from pipeline.analysis.effects import Factorial

# t quantiles from a printed table (two-sided 95%): df=4 -> 2.776, df=1 -> 12.706, df=2 -> 4.303
T95 = {1: 12.7062047, 2: 4.3026527, 4: 2.7764451}

# 2 x 2, two seeds per cell. Cell means, within-cell variances (ddof=1):
#   (a0,b0): 1.00, 1.20 -> 1.10, 0.02      (a1,b0): 0.80, 0.90 -> 0.85, 0.005
#   (a0,b1): 1.05, 1.15 -> 1.10, 0.005     (a1,b1): 0.10, 0.30 -> 0.20, 0.02
CELLS = {
    ("a0", "b0"): [1.00, 1.20],
    ("a1", "b0"): [0.80, 0.90],
    ("a0", "b1"): [1.05, 1.15],
    ("a1", "b1"): [0.10, 0.30],
}


def design(cells=CELLS, reference=None):
    return Factorial(["A", "B"], cells, {"A": ["a0", "a1"], "B": ["b0", "b1"]}, reference or {"A": "a0", "B": "b0"})


def test_main_effect_matches_hand_computation():
    d = design()
    # pooled variance = (0.02 + 0.005 + 0.005 + 0.02) / 4 = 0.0125 on 4 df
    assert d.pooled_df == 4
    assert d.pooled_var == pytest.approx(0.0125)
    a = d.main_effect("A", "a1")
    # mean of (0.85 - 1.10) and (0.20 - 1.10)
    assert a.estimate == pytest.approx(-0.575)
    # SE = sqrt(0.0125 / 2^2 * (4 * 1/2)) = sqrt(0.00625)
    half = T95[4] * math.sqrt(0.00625)
    assert (a.ci_low, a.ci_high) == (pytest.approx(-0.575 - half), pytest.approx(-0.575 + half))
    assert a.method == "replicates" and a.n_cells == 2 and a.excludes_zero
    b = d.main_effect("B", "b1")
    # mean of (1.10 - 1.10) and (0.20 - 0.85)
    assert b.estimate == pytest.approx(-0.325)
    assert b.ci_high - b.estimate == pytest.approx(half)


def test_interaction_matches_hand_computation():
    it = design().interaction("A", "a1", "B", "b1")
    # (0.20 - 1.10) - (0.85 - 1.10) = -0.65; SE = sqrt(0.0125 * 4 * 1/2) = sqrt(0.025)
    assert it.estimate == pytest.approx(-0.65)
    half = T95[4] * math.sqrt(0.025)
    assert it.ci_low == pytest.approx(-0.65 - half) and it.ci_high == pytest.approx(-0.65 + half)
    assert it.excludes_zero  # -0.65 +- 0.439
    (listed,) = design().interactions()
    assert listed.stands_out


def test_additive_design_has_no_interaction_that_stands_out():
    # y = 1 - 0.3 [A=a1] - 0.1 [B=b1] + noise of +-0.05 (same spread in every cell)
    cells = {
        ("a0", "b0"): [0.95, 1.05],
        ("a1", "b0"): [0.65, 0.75],
        ("a0", "b1"): [0.85, 0.95],
        ("a1", "b1"): [0.55, 0.65],
    }
    d = design(cells)
    assert d.main_effect("A", "a1").estimate == pytest.approx(-0.3)
    assert d.main_effect("B", "b1").estimate == pytest.approx(-0.1)
    (it,) = d.interactions()
    assert it.estimate == pytest.approx(0.0, abs=1e-12) and not it.stands_out


def test_reference_level_is_configurable():
    a = design(reference={"A": "a1", "B": "b0"}).main_effect("A", "a0")
    assert a.reference == "a1" and a.estimate == pytest.approx(0.575)
    with pytest.raises(ValueError, match="reference level for 'A' is 'zz'; valid: a0, a1"):
        design(reference={"A": "zz", "B": "b0"})


def test_unreplicated_design_uses_cells_as_replicates():
    # 2 x 3, one value per cell: the effect of A averages three paired differences and its
    # interval is the t-interval over them (df = 2).
    cells = {
        ("a0", "c0"): [1.0],
        ("a1", "c0"): [0.7],
        ("a0", "c1"): [2.0],
        ("a1", "c1"): [1.6],
        ("a0", "c2"): [3.0],
        ("a1", "c2"): [2.9],
    }
    d = Factorial(["A", "C"], cells, {"A": ["a0", "a1"], "C": ["c0", "c1", "c2"]}, {"A": "a0", "C": "c0"})
    assert d.pooled_df == 0
    a = d.main_effect("A", "a1")
    diffs = [-0.3, -0.4, -0.1]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 2)
    assert a.method == "cells" and a.estimate == pytest.approx(mean)
    assert a.ci_high == pytest.approx(mean + T95[2] * sd / math.sqrt(3))
    # c1 vs c0 is matched in two cells of A: +1.0 and +0.9 -> mean 0.95, SE = sd / sqrt(2) = 0.05
    c1 = d.main_effect("C", "c1")
    assert c1.estimate == pytest.approx(0.95) and c1.n_cells == 2
    assert c1.ci_high - c1.estimate == pytest.approx(T95[1] * 0.05)


def test_partial_grid_uses_matched_cells_only():
    cells = dict(CELLS)
    del cells[("a1", "b1")]
    d = design(cells)
    a = d.main_effect("A", "a1")
    assert a.n_cells == 1 and a.estimate == pytest.approx(0.85 - 1.10)
    assert d.interactions() == []  # no complete 2 x 2 square left

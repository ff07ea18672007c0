"""Main effects and interactions against hand computations on small designs: seed-paired
per-contrast intervals, the one-seed fallback, matched cells, Holm."""

import math

import numpy as np
import pytest

from pipeline.analysis.effects import Factorial, contrast, holm

# t quantiles from a printed table (two-sided 95%)
T95 = {1: 12.7062047, 2: 4.3026527, 4: 2.7764451}

# 2 x 2, seeds "0" and "1" (the first and second value of each cell)
CELLS = {
    ("a0", "b0"): [1.00, 1.20],
    ("a1", "b0"): [0.80, 0.90],
    ("a0", "b1"): [1.05, 1.15],
    ("a1", "b1"): [0.10, 0.30],
}
LEVELS = {"A": ["a0", "a1"], "B": ["b0", "b1"]}


def by_seed(cells):
    return {k: {str(i): x for i, x in enumerate(v)} for k, v in cells.items()}


def design(cells=CELLS, reference=None, levels=LEVELS):
    factors = list(levels)
    ref = reference or {f: levels[f][0] for f in factors}
    return Factorial.from_cells(factors, by_seed(cells), levels, ref)


def test_main_effect_is_paired_on_seed_with_its_own_variance():
    a = design().main_effect("A", "a1")
    # per seed, per cell of B:  b0: 0.80-1.00, 0.90-1.20 = -0.20, -0.30 (mean -0.25, s^2 0.005)
    #                           b1: 0.10-1.05, 0.30-1.15 = -0.95, -0.85 (mean -0.90, s^2 0.005)
    assert a.estimate == pytest.approx(-0.575)
    # Var = (0.005/2 + 0.005/2) / 2^2; Satterthwaite df = 0.005^2 / (2 * 0.0025^2 / 1) = 2
    se = math.sqrt(0.005 / 4)
    assert a.df == pytest.approx(2.0)
    assert (a.ci_low, a.ci_high) == (pytest.approx(-0.575 - T95[2] * se), pytest.approx(-0.575 + T95[2] * se))
    assert a.method == "seeds" and a.n_cells == 2 and a.n_seeds == 2 and a.excludes_zero


def test_interaction_is_paired_on_seed():
    it = design().interaction("A", "a1", "B", "b1")
    # per seed: 0.10-1.05-0.80+1.00 = -0.75 and 0.30-1.15-0.90+1.20 = -0.55: mean -0.65, sd 0.1414
    assert it.estimate == pytest.approx(-0.65)
    half = T95[1] * math.sqrt(0.02 / 2)
    assert it.ci_low == pytest.approx(-0.65 - half) and it.ci_high == pytest.approx(-0.65 + half)
    assert it.df == pytest.approx(1.0) and not it.excludes_zero


def test_a_shift_shared_by_a_seed_changes_no_interval():
    """Seed is a block: a seed whose batches make every configuration 0.3 worse moves no contrast."""
    shifted = {k: [v[0], v[1] + 0.3] for k, v in CELLS.items()}
    for e0, e1 in zip(design().main_effects(), design(shifted).main_effects()):
        assert (e1.estimate, e1.ci_low, e1.ci_high) == pytest.approx((e0.estimate, e0.ci_low, e0.ci_high))


def test_a_noisy_cell_widens_only_the_contrasts_that_use_it():
    """Per-contrast (Welch-type) variance: a2's noise leaves a1-vs-a0 untouched; a pooled
    variance would widen every interval."""
    rng = np.random.default_rng(0)
    levels = {"A": ["a0", "a1", "a2"]}
    base = {(lv,): list(1.0 + 0.01 * rng.standard_normal(3)) for lv in levels["A"]}
    noisy = dict(base)
    noisy[("a2",)] = [1.0 + 0.5 * x for x in rng.standard_normal(3)]
    quiet, loud = design(base, levels=levels), design(noisy, levels=levels)
    assert (loud.main_effect("A", "a1").ci_low, loud.main_effect("A", "a1").ci_high) == (
        quiet.main_effect("A", "a1").ci_low,
        quiet.main_effect("A", "a1").ci_high,
    )
    q2, l2 = quiet.main_effect("A", "a2"), loud.main_effect("A", "a2")
    assert l2.ci_high - l2.ci_low > 10 * (q2.ci_high - q2.ci_low)


def test_reference_level_is_configurable():
    a = design(reference={"A": "a1", "B": "b0"}).main_effect("A", "a0")
    assert a.reference == "a1" and a.estimate == pytest.approx(0.575)
    with pytest.raises(ValueError, match="reference level for 'A' is 'zz'; valid: a0, a1"):
        design(reference={"A": "zz", "B": "b0"})


def test_one_seed_uses_the_per_cell_differences():
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
    d = design(cells, levels={"A": ["a0", "a1"], "C": ["c0", "c1", "c2"]})
    assert d.min_seeds == 1
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
    # an interaction of an unreplicated 2 x 3 has one matched square: no interval, not tested
    (it, *_) = d.interactions()
    assert it.method == "none" and math.isnan(it.ci_low) and not it.significant()


def test_partial_grid_uses_matched_cells_only():
    cells = dict(CELLS)
    del cells[("a1", "b1")]
    d = design(cells)
    a = d.main_effect("A", "a1")
    assert a.n_cells == 1 and a.estimate == pytest.approx(np.mean([0.80 - 1.00, 0.90 - 1.20]))
    assert d.interactions() == []  # no complete 2 x 2 square left
    assert d.family_size == 2  # A and B main effects


def test_seeds_are_matched_not_pooled():
    """A cell that lacks a seed pairs only on the seeds both terms have."""
    cells = {("a0",): {"0": 1.0, "1": 1.1, "2": 5.0}, ("a1",): {"0": 0.8, "1": 0.9}}
    d = Factorial.from_cells(["A"], cells, {"A": ["a0", "a1"]}, {"A": "a0"})
    a = d.main_effect("A", "a1")
    assert a.estimate == pytest.approx(-0.2) and a.n_seeds == 2


def test_holm_matches_a_hand_computation():
    # sorted 0.005*4, 0.01*3, 0.03*2, 0.04*1 -> running max 0.02, 0.03, 0.06, 0.06
    assert holm(np.array([0.01, 0.04, 0.03, 0.005])) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    out = holm(np.array([np.nan, 0.01, 0.04]))  # NaN is not in the family: m = 2
    assert math.isnan(out[0]) and out[1:] == pytest.approx([0.02, 0.04])
    assert holm(np.array([[0.5, 0.9]])).shape == (1, 2)


def test_holm_correction_is_applied_across_the_family():
    mains, inters = design().analyse()
    assert len(mains) + len(inters) == 3 == design().family_size
    ps = sorted([e.p for e in [*mains, *inters]])
    smallest = min([*mains, *inters], key=lambda e: e.p)
    assert smallest.p_holm == pytest.approx(min(1.0, 3 * ps[0]))


def test_contrast_fallbacks():
    c = contrast(np.array([[0.1, np.nan]]))  # one cell, one seed
    assert c.method == 0 and np.isnan(c.se)
    c = contrast(np.array([[0.1, 0.1], [0.2, 0.2]]))  # seeds agree exactly: zero width
    lo, hi = c.interval()
    assert c.method == 2 and lo == hi == pytest.approx(0.15) and c.p_value() == 0.0

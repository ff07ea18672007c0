"""eta^2 shares of a complete grid: an exact decomposition, with noncentral-F intervals."""

import numpy as np
import pytest

from pipeline.analysis.anova import variance_shares
from pipeline.analysis.effects import Factorial


def grid(y):
    levels = {"A": ["a0", "a1", "a2"], "B": ["b0", "b1"]}
    return Factorial(["A", "B"], levels, {"A": "a0", "B": "b0"}, y)


def test_shares_add_up_and_match_hand_sums_of_squares():
    rng = np.random.default_rng(0)
    y = 3.0 - np.array([0, 0.2, 0.4])[:, None, None] + 0.05 * rng.standard_normal((3, 2, 3))
    shares = {s.term: s for s in variance_shares(grid(y))}
    assert set(shares) == {"A", "B", "A × B", "seed", "rest"}
    assert sum(s.eta2 for s in shares.values()) == pytest.approx(1.0)
    m = y.mean()
    # SS_A = (runs per level) x sum over levels of (level mean - grand mean)^2
    assert shares["A"].ss == pytest.approx(6 * ((y.mean(axis=(1, 2)) - m) ** 2).sum())
    assert shares["seed"].ss == pytest.approx(6 * ((y.mean(axis=(0, 1)) - m) ** 2).sum())
    assert shares["A"].df == 2 and shares["A × B"].df == 2 and shares["rest"].df == 17 - 2 - 1 - 2 - 2
    a = shares["A"]
    assert a.eta2 > 0.9 and a.partial_low < a.partial < a.partial_high
    assert shares["B"].partial_low == 0.0  # B does nothing: its interval reaches 0


def test_incomplete_grid_has_no_shares():
    y = np.ones((3, 2, 2))
    y[1, 1, 0] = np.nan
    assert variance_shares(grid(y)) is None


def test_one_seed_two_factors_takes_the_interaction_as_error():
    y = (3.0 - np.array([0, 0.2, 0.4])[:, None] + np.array([[0.01, -0.01], [0.0, 0.02], [-0.02, 0.0]]))[..., None]
    shares = {s.term: s for s in variance_shares(grid(y))}
    assert "rest" not in shares and np.isnan(shares["A × B"].partial)
    assert shares["A"].partial_low > 0.5

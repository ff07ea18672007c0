"""Power-law fit recovers known parameters; the compute multiplier recovers a known shift."""

import numpy as np
import pytest

from pipeline.analysis.powerlaw import compute_multiplier, fit_power_law


def law(C, a, b, c):
    return a * (C / 1e12) ** -b + c


def test_fit_recovers_parameters_with_offset():
    C = np.logspace(12, 15, 7)
    fit = fit_power_law(C, law(C, 2.0, 0.3, 1.5))
    assert fit.offset_fitted
    assert (fit.a, fit.b, fit.c) == (
        pytest.approx(2.0, rel=1e-3),
        pytest.approx(0.3, rel=1e-3),
        pytest.approx(1.5, rel=1e-3),
    )
    assert fit.compute_for(float(law(1e14, 2.0, 0.3, 1.5))) == pytest.approx(1e14, rel=1e-3)


def test_two_points_fit_without_offset():
    C = np.array([1e12, 1e13])
    fit = fit_power_law(C, law(C, 3.0, 0.2, 0.0))
    assert not fit.offset_fitted and fit.b == pytest.approx(0.2) and fit.c == 0.0
    assert fit_power_law([1e12, 1e12], [3.0, 2.9]) is None


@pytest.mark.parametrize("k", [0.5, 2.0, 4.0])
def test_multiplier_recovers_a_compute_shift(k):
    # An architecture that reaches the baseline's loss with 1/k of the compute: L_x(C) = L_b(kC)
    C = np.logspace(12, 15, 6)
    base = fit_power_law(C, law(C, 2.0, 0.3, 1.5))
    arch = fit_power_law(C, law(k * C, 2.0, 0.3, 1.5))
    assert compute_multiplier(arch, base, 1e15) == pytest.approx(k, rel=1e-2)

"""Power-law fit (Huber, log space) recovers known parameters; the compute multiplier recovers
a known shift, with a bootstrap interval that holds it; none outside the fitted range or when
the fit is not identifiable."""

import numpy as np
import pytest

from pipeline.analysis.powerlaw import compute_multiplier, fit_power_law, multiplier_with_interval


def law(C, a, b, c):
    return a * (C / 1e12) ** -b + c


def test_fit_recovers_parameters_with_offset():
    C = np.logspace(12, 15, 7)
    fit = fit_power_law(C, law(C, 2.0, 0.3, 1.5))
    assert fit.offset_fitted and fit.identifiable
    assert (fit.a, fit.b, fit.c) == (
        pytest.approx(2.0, rel=2e-2),
        pytest.approx(0.3, rel=2e-2),
        pytest.approx(1.5, rel=2e-2),
    )
    assert fit.compute_for(float(law(1e14, 2.0, 0.3, 1.5))) == pytest.approx(1e14, rel=5e-2)


def test_huber_fit_shrugs_off_an_outlier():
    C = np.repeat(np.logspace(12, 15, 6), 2)
    L = law(C, 2.0, 0.3, 1.5)
    L[3] += 0.5  # one diverged run
    fit = fit_power_law(C, L)
    assert fit.b == pytest.approx(0.3, rel=5e-2) and fit.c == pytest.approx(1.5, rel=5e-2)


def test_few_compute_values_fit_without_offset_and_are_not_identifiable():
    C = np.array([1e12, 1e13, 1e14])
    fit = fit_power_law(C, law(C, 3.0, 0.2, 0.0))
    assert not fit.offset_fitted and not fit.identifiable and fit.b == pytest.approx(0.2)
    assert fit_power_law([1e12, 1e12], [3.0, 2.9]) is None
    m = multiplier_with_interval((C, law(C, 3.0, 0.2, 0.0)), (C, law(C, 3.0, 0.2, 0.0)))
    assert np.isnan(m.value) and "not identifiable" in m.why_not


@pytest.mark.parametrize("k", [0.5, 2.0, 4.0])
def test_multiplier_recovers_a_compute_shift(k):
    # An architecture that reaches the baseline's loss with 1/k of the compute: L_x(C) = L_b(kC)
    C = np.logspace(12, 15, 6)
    base = fit_power_law(C, law(C, 2.0, 0.3, 1.5))
    arch = fit_power_law(C, law(k * C, 2.0, 0.3, 1.5))
    assert compute_multiplier(arch, base)[0] == pytest.approx(k, rel=3e-2)


def test_no_multiplier_outside_the_fitted_range():
    C = np.logspace(12, 13, 5)
    base = fit_power_law(C, law(C, 2.0, 0.3, 1.5))
    far = fit_power_law(C, law(1e3 * C, 2.0, 0.3, 1.5))  # its losses are all below the baseline's
    assert np.isnan(compute_multiplier(far, base)[0])


def test_bootstrap_interval_holds_the_multiplier_under_noise():
    rng = np.random.default_rng(0)
    C = np.repeat(np.logspace(12, 15, 5), 4)  # five sizes, four seeds each
    noise = lambda: 0.01 * rng.standard_normal(C.shape)  # noqa: E731
    base = (C, law(C, 2.0, 0.3, 1.5) + noise())
    arch = (C, law(2.0 * C, 2.0, 0.3, 1.5) + noise())
    m = multiplier_with_interval(arch, base, n_boot=50)
    assert m.low < m.value < m.high and m.defined_share > 0.9
    assert m.low < 2.0 < m.high
    assert m.high / m.low < 3  # five sizes at 0.01 noise pin it down (the 3 sizes: 8.7x to 108x)

"""The Diebold-Mariano test used by the accuracy benchmark."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from poe_pipeline.significance import diebold_mariano


def test_one_day_horizon_is_the_one_sample_t_test():
    # with h = 1 there are no autocovariance lags and the HLN factor turns the statistic into Student's t
    d = np.random.default_rng(3).normal(-0.01, 0.05, 120)
    stat, p = diebold_mariano(d, 1)
    expected = stats.ttest_1samp(d, 0.0, alternative="less")
    assert stat == pytest.approx(expected.statistic)
    assert p == pytest.approx(expected.pvalue)


def test_overlapping_horizons_widen_the_variance_of_autocorrelated_losses():
    rng = np.random.default_rng(5)
    shocks = rng.normal(-0.004, 0.05, 207)
    d = np.convolve(shocks, np.ones(7) / 7, mode="valid")  # 7-day overlaps: strongly autocorrelated
    _, p_naive = diebold_mariano(d, 1)
    _, p_hac = diebold_mariano(d, 7)
    assert p_hac > p_naive  # ignoring the overlap overstates significance


def test_a_clearly_better_method_is_significant_and_a_worse_one_is_not():
    rng = np.random.default_rng(7)
    assert diebold_mariano(rng.normal(-0.02, 0.02, 100), 3)[1] < 0.01
    assert diebold_mariano(rng.normal(0.02, 0.02, 100), 3)[1] > 0.99
    assert np.isnan(diebold_mariano(np.array([0.1, -0.1]), 1)[1])  # too few to say


# A published example: the test suite of the `dieboldmariano` package (PyPI), whose expected values are those of
# R's forecast::dm.test; the same 15 forecasts of a zero series, absolute loss, h = 3.
FIRST = [0.3675225224615024, 0.5450608127223211, 0.22044990720021074, 0.8688743471040006, 0.6072512228948467,
         0.8582283746501538, 0.41662295816718187, 0.3812100211114714, 0.7185133356116706, 0.30827323290318875,
         0.4297093624074402, 0.8615974488577858, 0.7240514514808826, 0.3450839595261038, 0.19675301374013598]
SECOND = [0.12794132529988733, 0.3679643204341153, 0.768715420996091, 0.09972248964114683, 0.27197653636654284,
          0.28797629010039505, 0.9160213458582482, 0.6112628048698798, 0.5452873235576241, 0.06785907231746158,
          0.6072666485541124, 0.6241575753989782, 0.39998026828867217, 0.19895665605941748, 0.8094941215215619]


def test_a_published_example_with_overlapping_horizons():
    d = np.abs(FIRST) - np.abs(SECOND)
    stat, p = diebold_mariano(d, 3)
    assert stat == pytest.approx(1.2109, abs=1e-4)
    assert p == pytest.approx(0.877, abs=1e-3)


def test_a_published_example_at_one_day():
    # the same suite's first case: squared loss (its default), h = 1, a two-sided p
    d = np.square([0, 1, 2, 3, 4, 5]) - np.square([0, 2, 3, 3, 5, 6])
    stat, p = diebold_mariano(d, 1)
    assert stat == pytest.approx(-2.4905, abs=1e-4)
    assert 2 * p == pytest.approx(0.05513, abs=1e-4)


def test_rectangular_weights_not_bartlett():
    # Positively autocorrelated losses: rectangular weights give a larger variance than Bartlett's, so a smaller
    # statistic (Bartlett weights with HLN understated the 7-day variance by about a third).
    rng = np.random.default_rng(11)
    d = np.convolve(rng.normal(-0.01, 0.05, 126), np.ones(7) / 7, mode="valid")
    n, h = d.size, 7
    gamma = [(d[k:] - d.mean()) @ (d[: n - k] - d.mean()) / n for k in range(h)]
    rectangular = gamma[0] + 2 * sum(gamma[1:])
    hln = np.sqrt((n + 1 - 2 * h + h * (h - 1) / n) / n)
    stat, _ = diebold_mariano(d, h)
    assert stat == pytest.approx(d.mean() / np.sqrt(rectangular / n) * hln)

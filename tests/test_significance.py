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

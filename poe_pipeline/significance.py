"""Is one forecaster's loss really lower than another's? The Diebold-Mariano test, for overlapping horizons."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def diebold_mariano(loss_diff: np.ndarray, horizon: int) -> tuple[float, float]:
    """(statistic, one-sided p) for "the method's loss is lower": ``loss_diff`` = method loss - reference loss,
    in time order. Newey-West (Bartlett) long-run variance with ``horizon - 1`` lags (h-day forecasts made daily
    overlap), Harvey-Leybourne-Newbold small-sample correction, Student t with n - 1 degrees of freedom."""
    d = np.asarray(loss_diff, dtype=float)
    n = d.size
    if n < 3:
        return float("nan"), float("nan")
    mean = d.mean()
    dc = d - mean
    lags = max(0, horizon - 1)
    var = dc @ dc / n
    for k in range(1, min(lags, n - 1) + 1):
        var += 2 * (1 - k / (lags + 1)) * (dc[k:] @ dc[:-k]) / n
    if var <= 0:
        return float("nan"), float("nan")
    stat = mean / math.sqrt(var / n)
    stat *= math.sqrt((n + 1 - 2 * horizon + horizon * (horizon - 1) / n) / n)
    return float(stat), float(stats.t.cdf(stat, df=n - 1))

"""Is one forecaster's loss really lower than another's? The Diebold-Mariano test, for overlapping horizons."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def _autocovariances(d: np.ndarray, lags: int) -> np.ndarray:
    """gamma_0 .. gamma_lags of ``d``, each a sum over the available pairs divided by n (as R's ``acf``)."""
    n = d.size
    dc = d - d.mean()
    return np.array([dc[k:] @ dc[: n - k] / n for k in range(min(lags, n - 1) + 1)])


def diebold_mariano(loss_diff: np.ndarray, horizon: int) -> tuple[float, float]:
    """(statistic, one-sided p) for "the method's loss is lower": ``loss_diff`` = method loss - reference loss,
    in time order.

    The test as published (Diebold & Mariano 1995, with the Harvey-Leybourne-Newbold 1997 correction, as R's
    ``forecast::dm.test``): the long-run variance sums the autocovariances up to lag ``horizon - 1`` with equal
    (rectangular) weights, since h-day forecasts made daily overlap by h - 1 days; only when that variance is
    not positive does it fall back to Bartlett weights, which always give a positive one. The HLN factor
    assumes the rectangular form. Student t with n - 1 degrees of freedom.
    """
    d = np.asarray(loss_diff, dtype=float)
    n = d.size
    if n < 3:
        return float("nan"), float("nan")
    gamma = _autocovariances(d, max(0, horizon - 1))
    var = gamma[0] + 2 * gamma[1:].sum()
    if var <= 0:
        lags = len(gamma) - 1
        var = gamma[0] + 2 * sum((1 - k / (lags + 1)) * gamma[k] for k in range(1, lags + 1))
    if var <= 0:
        return float("nan"), float("nan")
    stat = d.mean() / math.sqrt(var / n)
    stat *= math.sqrt((n + 1 - 2 * horizon + horizon * (horizon - 1) / n) / n)
    return float(stat), float(stats.t.cdf(stat, df=n - 1))

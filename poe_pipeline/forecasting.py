"""Predictions: forecasts through the champion models, with calibrated intervals and a confidence score.

For every currency and horizon, from the origin (the league's latest day of features):

- **Point forecast.** The global model's predicted log-return for the currency, times its partition's scale
  (``currency_model``); ``predicted_price = current_price x exp(m)``.
  A partition forecasts through the global version it was built on. A currency without a partition champion gets
  the global champion's forecast at the pooled scale, with its confidence halved (``GLOBAL_ONLY_CONFIDENCE``). Each
  global model forecasts all its currencies at once.
- **Interval, volatility-scaled split conformal, per league phase.** The global model kept the out-of-fold
  residuals of every currency it pooled; they calibrate every currency's intervals. (Each currency's own residuals
  were measured too: on nine development leagues, 27 league-phase cells, the pooled ones held 80 % coverage within
  +-5 points in 23 cells and a currency's own in 20, with wider intervals.) Each residual is divided by the
  volatility scale of its own day, ``s_i = r_i / sigma_i``, where
  ``sigma = max(v, VOL_FLOOR, VOL_FLOOR_REL x median v)`` and ``v = sqrt(realized_vol_14^2 + trend_slope_14^2)``,
  the root mean square of the last 14 daily log-returns (dispersion and drift). The half-width is
  ``q x sigma_now``: a calm currency gets a narrow interval and a wild one a wide one. ``q`` comes from the residuals
  of the forecast's league phase (days 0-6, 7-20, 21-55, 56 on: the first weeks of a league move far more, and its
  first week most of all) when there are
  enough of them, else from all; and it depends on how many residuals there are (the method is stored per row):

  - ``conformal`` (>= ``MIN_CONFORMAL`` residuals): ``q`` is the ``ceil((n + 1) x level)``-th smallest ``|s_i|``,
    the split-conformal quantile with its finite-sample correction (coverage >= level if the future is
    exchangeable with the validation folds);
  - ``bootstrap`` (``MIN_BOOTSTRAP`` to ``MIN_CONFORMAL - 1``): ``q`` is the ``level`` quantile of ``|s|``,
    averaged over ``BOOTSTRAP_RESAMPLES`` resamples (seeded, so reruns agree);
  - ``volatility`` (fewer): a conservative normal interval, ``CONSERVATIVE_INFLATION x z x sigma_now x sqrt(h)``.

  Intervals are symmetric in log-price, so they always contain the point forecast, and the half-width never shrinks
  from one horizon to a longer one (a longer horizon cannot honestly be more certain).
- **What the league itself teaches.** Models and calibration learn from past leagues, and a league does not always
  behave like them: on the late weeks of four development leagues, interval coverage fell to 65 % in one and
  rose to 92 % in another, and the same models beat "no change" by 7 % at 7 days in two leagues and lost 4 % at 3
  days in two others. So at each horizon, this league's forecasts that have already come true (stored predictions
  whose ``origin + horizon`` price is known at the origin; ``n`` of them) adjust the next ones, each shrunk towards
  "no adjustment" with the weight ``w = n / (n + LEAGUE_PRIOR_ROWS)`` (the prior: four days of 30 currencies):

  - ``point_shrink`` (measured, not applied: always 1): the multiplier ``b`` in [0, 1] of the models' forecast
    (``model_logret``) that minimised the absolute error of the resolved ones (a weighted median), used as
    ``1 + w x (b - 1)`` when ``LEAGUE_SHRINK_PRIOR_ROWS`` is set (the prior of ``w`` then). It moved a league where
    the models kept missing towards "no change", but once the global models were in it no longer earned its place:
    without it, skill changed by +0.36/-0.15/+0.07 points at 1/3/7 days on four development leagues and
    +0.06/+0.07/+0.10 on four others (docs/performance-log.md, "The league's point shrink, measured again"). The
    diagnostic ``best_shrink`` (``b``) is still computed and shown.
  - ``interval_scale``: ``r_i = |actual - point| / half_i`` in log-return, ``half_i`` the half-width before that
    forecast's own scale; ``q`` is the split-conformal ``level`` quantile of ``r``, used as ``q ^ w``. Only the
    forecasts whose target day falls in the latest ``LEAGUE_SCALE_DAYS`` days of targets count here (``n`` is
    theirs in ``w``): a league's volatility turns within weeks, and a scale pooled over all its days carried the
    calm first weeks into rougher ones (on two development leagues, days 21-34 then covered 68-74 %). Halving its
    prior scored better at 1 and 3 days and worse at 7 on eight leagues (docs/performance-log.md, "The league's
    point shrink, measured again").
- **Confidence in [0, 1].** ``sqrt(quality x width)`` times penalty factors, where quality averages
  ``clip(0.5 + skill)`` and ``clip(0.5 + R2)`` of validation (0.25 when unvalidated), width is
  ``1 / (1 + half_width / WIDTH_SCALE)``, and the factors are: sample size ``1 - penalty`` (n < 5: 0.7, < 10: 0.5,
  < 30: 0.3, < 100: 0.1, n = calibration residuals), recency ``exp(-days_since_observed / RECENCY_DAYS)``, and
  ``GLOBAL_ONLY_CONFIDENCE`` for a currency with no out-of-fold rows of its own.

Storage is append-only, one file per (league, origin date): ``predictions/league=<L>/origin_date=<D>/part.parquet``.
Re-running an origin rewrites that one file atomically, keeping the rows of currencies that the rerun left out.
A currency that cannot be forecast (no global champion, no price at the origin) gets no row; the run returns why,
and ``forecast_gaps`` lists, per origin, every pair of the league's most liquid currencies without a forecast with
the reason (``forecast_gaps/league=<L>/origin_date=<D>/part.parquet``, the warehouse view ``forecast_gaps``).
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from statistics import NormalDist
from typing import TYPE_CHECKING, Protocol

import numpy as np
import polars as pl

from poe_pipeline.lake import Lake, hive_dir, write_parquet_atomic
from poe_pipeline.prices import actual_prices, read_daily_prices, target_day
from poe_pipeline.settings import HORIZONS_DAYS
from poe_pipeline.universe import DEFAULT_RULES

if TYPE_CHECKING:  # both are imported where used: this module stays light for the warehouse to import
    from poe_pipeline.modeling import Ensemble

INTERVAL_LEVEL = 0.8
MIN_CONFORMAL = 15
MIN_BOOTSTRAP = 5
BOOTSTRAP_RESAMPLES = 1000
CONSERVATIVE_INFLATION = 1.5
VOL_COLUMNS = ("realized_vol_14", "trend_slope_14")
# interval phases by league day: 0-6, 7-20, 21-55, 56 on (coverage is checked per phase). The launch week's
# residuals are kept apart: pooled with days 7-20 they widened those intervals past 80 % coverage.
PHASE_BOUNDS = (7, 21, 56)
PHASE_NAMES = ("launch", "early", "mid", "late")  # one per span between the bounds
UNKNOWN_DAY_PHASE = "early"  # a day without a league calendar
VOL_FLOOR = 0.005  # 0.5 % a day: flat, quantised series (a price stuck at 1.0) still move a little
VOL_FLOOR_REL = 0.25  # and never below a quarter of the currency's typical volatility
FALLBACK_DAILY_VOL = 0.07  # median realized_vol_14 of the poe.ninja dumps: a currency without any history
WIDTH_SCALE = 0.10  # a +-10 % interval halves the width factor of the confidence
LEAGUE_PRIOR_ROWS = 120  # resolved forecasts of the league that weigh as much as the past leagues' calibration
LEAGUE_SHRINK_PRIOR_ROWS: int | None = None  # None: the point is never shrunk (measured; see the module docstring)
LEAGUE_SCALE_DAYS = 7  # the interval scale learns from the forecasts that came true in the latest week only
RECENCY_DAYS = 7.0
SAMPLE_PENALTIES = ((5, 0.7), (10, 0.5), (30, 0.3), (100, 0.1))

CONFORMAL, BOOTSTRAP, VOLATILITY = "conformal", "bootstrap", "volatility"

CONTRACT_COLUMNS = [
    "league", "currency", "origin_date", "horizon_days", "current_price", "predicted_price", "pred_lower",
    "pred_upper", "interval_level", "confidence", "model_version",
]
PREDICTIONS_SCHEMA: dict[str, pl.DataType] = {
    "league": pl.Utf8,
    "currency": pl.Utf8,
    "origin_date": pl.Date,
    "horizon_days": pl.Int32,
    "current_price": pl.Float64,
    "predicted_price": pl.Float64,
    "pred_lower": pl.Float64,
    "pred_upper": pl.Float64,
    "interval_level": pl.Float64,
    "confidence": pl.Float64,
    "model_version": pl.Utf8,
    # extras
    "model_name": pl.Utf8,
    "predicted_logret": pl.Float64,
    "lower_logret": pl.Float64,
    "upper_logret": pl.Float64,
    "interval_method": pl.Utf8,
    "residual_count": pl.Int32,
    "skill": pl.Float64,
    "r2": pl.Float64,
    "daily_volatility": pl.Float64,
    "days_since_observed": pl.Int32,
    "created_at": pl.Datetime("us", "UTC"),
    "global_model_version": pl.Utf8,
    "model_logret": pl.Float64,  # the models' forecast, before the league's own shrink
    "point_shrink": pl.Float64,  # predicted_logret / model_logret, learnt from the league's resolved forecasts
    "interval_scale": pl.Float64,  # the league's own scale of the half-width (1.0: as calibrated on past leagues)
}

PREDICTION_ERRORS_SQL = """
SELECT p.league, p.currency, p.origin_date, p.horizon_days,
       CAST(p.origin_date + p.horizon_days AS DATE) AS target_date,
       p.model_version, p.interval_level, p.interval_method, p.confidence,
       p.current_price, p.predicted_price, p.pred_lower, p.pred_upper,
       d.price_chaos AS realized_price,
       ln(d.price_chaos / p.current_price) AS realized_logret,
       ln(p.predicted_price / p.current_price) AS predicted_logret,
       abs(ln(d.price_chaos / p.predicted_price)) AS abs_log_error,
       abs(ln(d.price_chaos / p.current_price)) AS persistence_abs_log_error,
       d.price_chaos BETWEEN p.pred_lower AND p.pred_upper AS inside_interval
FROM predictions AS p
JOIN daily_prices AS d
  ON d.league = p.league AND d.currency = p.currency AND d.date = p.origin_date + p.horizon_days
""".strip()


def predictions_dir(lake: Lake) -> Path:
    return lake.predictions


# --- intervals --------------------------------------------------------------------------------------------------


def daily_volatility() -> pl.Expr:
    """The volatility that scales intervals: the root mean square of daily log-returns over 14 days, i.e. their
    dispersion (``realized_vol_14``) and their drift (``trend_slope_14``) together; a steady slide has little
    dispersion yet moves the price a lot over a week."""
    vol, drift = pl.col("realized_vol_14"), pl.col("trend_slope_14").fill_null(0.0)
    return (vol * vol + drift * drift).sqrt().alias("daily_volatility")


def volatility_scale(vol: float | None, reference: float | None = None) -> float:
    """A currency's daily volatility as an interval scale: floored, and never below a quarter of its typical one.

    Unknown (None or NaN) means the typical one, or ``FALLBACK_DAILY_VOL`` without any."""
    ref = reference if reference is not None and math.isfinite(reference) and reference > 0 else None
    v = vol if vol is not None and math.isfinite(vol) and vol >= 0 else (ref or FALLBACK_DAILY_VOL)
    return max(v, VOL_FLOOR, VOL_FLOOR_REL * ref if ref else 0.0)


def volatility_scales(vols: np.ndarray, reference: float | None = None) -> np.ndarray:
    """``volatility_scale`` of each value, vectorised (the same numbers, without a Python call per residual)."""
    vols = np.asarray(vols, dtype=np.float64)
    ref = reference if reference is not None and math.isfinite(reference) and reference > 0 else None
    with np.errstate(invalid="ignore"):
        known = np.isfinite(vols) & (vols >= 0)
    v = np.where(known, vols, ref or FALLBACK_DAILY_VOL)
    return np.maximum(np.maximum(v, VOL_FLOOR), VOL_FLOOR_REL * ref if ref else 0.0)


def interval_phase(league_day: int | None) -> str:
    """The league phase an interval is calibrated in: launch (days 0-6), early (7-20), mid (21-55), late (56 on)."""
    return UNKNOWN_DAY_PHASE if league_day is None else PHASE_NAMES[bisect.bisect_right(PHASE_BOUNDS, league_day)]


def _phase_expr(day: pl.Expr) -> pl.Expr:
    """``interval_phase`` over a column."""
    expr = pl.when(day.is_null()).then(pl.lit(UNKNOWN_DAY_PHASE))
    for bound, name in zip(PHASE_BOUNDS, PHASE_NAMES, strict=False):
        expr = expr.when(day < bound).then(pl.lit(name))
    return expr.otherwise(pl.lit(PHASE_NAMES[-1]))


@dataclass(frozen=True)
class Calibration:
    """Out-of-fold residuals, each divided by the volatility scale of its own day, kept per league phase."""

    scores: np.ndarray  # signed residual / scale, every phase
    reference_vol: float  # median volatility over the residuals' days (NaN without any)
    phases: np.ndarray | None = None  # the interval phase of each score
    # per phase: (|scores| in their order, the same sorted); every forecast of a horizon shares one calibration
    _abs: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def count(self) -> int:
        return len(self.scores)

    def for_phase(self, phase: str | None) -> np.ndarray:
        """The scores of one phase when there are enough of them for a conformal quantile, else all."""
        if phase is None or self.phases is None:
            return self.scores
        mine = self.scores[self.phases == phase]
        return mine if len(mine) >= MIN_CONFORMAL else self.scores

    def abs_scores(self, phase: str | None) -> tuple[np.ndarray, np.ndarray]:
        """``|for_phase(phase)|`` as it is and sorted, computed once per phase."""
        if phase not in self._abs:
            scores = np.abs(self.for_phase(phase))
            self._abs[phase] = (scores, np.sort(scores))
        return self._abs[phase]

    @classmethod
    def from_arrays(cls, residuals: np.ndarray, vols: np.ndarray | None = None,
                    phases: np.ndarray | None = None) -> Calibration:
        """``vols``: the currency's daily volatility on each residual's day (NaN where unknown)."""
        residuals = np.asarray(residuals, dtype=np.float64)
        keep = np.isfinite(residuals)
        residuals = residuals[keep]
        if vols is None:
            vols = np.full(len(keep), np.nan)
        vols = np.asarray(vols, dtype=np.float64)[keep]
        known = vols[np.isfinite(vols) & (vols > 0)]
        reference = float(np.median(known)) if len(known) else float("nan")
        scales = volatility_scales(vols, reference)
        return cls(residuals / scales if len(residuals) else residuals, reference,
                   None if phases is None else np.asarray(phases)[keep])

    @classmethod
    def from_residual_frame(cls, residuals: pl.DataFrame, vol_history: pl.DataFrame | None) -> Calibration:
        """``residuals``: league, date[, currency], residual; ``vol_history``: league, currency, date, league_day and
        ``VOL_COLUMNS`` of the currencies concerned (one currency's when ``residuals`` has no currency column)."""
        if vol_history is None or vol_history.height == 0:
            return cls.from_arrays(residuals["residual"].to_numpy())
        keys = ["league", "currency", "date"] if "currency" in residuals.columns else ["league", "date"]
        vols = vol_history.select(*keys, daily_volatility().alias("_vol"), _phase_expr(pl.col("league_day"))
                                  .alias("_phase")).unique(keys)
        joined = residuals.join(vols, on=keys, how="left", maintain_order="left")
        return cls.from_arrays(joined["residual"].to_numpy(), joined["_vol"].to_numpy(),
                               joined["_phase"].fill_null(UNKNOWN_DAY_PHASE).to_numpy())


@dataclass(frozen=True)
class IntervalEstimate:
    """A prediction interval in log-return space around the point forecast."""

    point: float
    half_width: float
    method: str
    residual_count: int

    @property
    def lower(self) -> float:
        return self.point - self.half_width

    @property
    def upper(self) -> float:
        return self.point + self.half_width


def _z(level: float) -> float:
    return NormalDist().inv_cdf(0.5 + level / 2)


def conformal_quantile(abs_scores: np.ndarray, level: float, presorted: bool = False) -> float:
    """The ``ceil((n + 1) level)``-th smallest score (the largest one when n is too small for the level)."""
    ordered = abs_scores if presorted else np.sort(abs_scores)
    k = min(math.ceil((len(ordered) + 1) * level), len(ordered))
    return float(ordered[k - 1])


def bootstrap_quantile(abs_scores: np.ndarray, level: float, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = 0) -> float:
    """The ``level`` quantile of the scores, averaged over bootstrap resamples."""
    rng = np.random.default_rng(seed)
    draws = rng.choice(abs_scores, size=(resamples, len(abs_scores)), replace=True)
    return float(np.mean(np.quantile(draws, level, axis=1)))


def prediction_interval(
    point: float,
    calibration: Calibration,
    current_vol: float | None,
    horizon: int,
    level: float = INTERVAL_LEVEL,
    seed: int = 0,
    phase: str | None = None,
) -> IntervalEstimate:
    """The interval of one forecast: conformal, bootstrap or volatility, by the number of residuals; calibrated
    on the residuals of the forecast's league ``phase`` where there are enough of them."""
    if not 0 < level < 1:
        raise ValueError(f"interval level {level!r} must lie strictly between 0 and 1, e.g. 0.8")
    scale = volatility_scale(current_vol, calibration.reference_vol)
    abs_scores, ordered = calibration.abs_scores(phase)
    n = len(abs_scores)
    if n >= MIN_CONFORMAL:
        return IntervalEstimate(point, conformal_quantile(ordered, level, presorted=True) * scale, CONFORMAL, n)
    if n >= MIN_BOOTSTRAP:
        return IntervalEstimate(point, bootstrap_quantile(abs_scores, level, seed=seed) * scale, BOOTSTRAP, n)
    half = CONSERVATIVE_INFLATION * _z(level) * scale * math.sqrt(horizon)
    return IntervalEstimate(point, half, VOLATILITY, n)


@dataclass(frozen=True)
class LeagueAdjustment:
    """What one horizon's forecasts of this league that have come true (``resolved`` of them) teach the next ones:
    the scale of the interval, and the shrink of the point towards "no change" when it is applied (see the module
    docstring)."""

    point_shrink: float = 1.0
    interval_scale: float = 1.0
    resolved: int = 0
    best_shrink: float = 1.0  # unshrunk: the multiplier in [0, 1] with the least absolute error on them
    quantile: float = 1.0  # unshrunk: the conformal quantile of |error| / half-width in the latest week of targets
    recent: int = 0  # the resolved forecasts of that week


def resolved_forecasts(predictions: pl.DataFrame, prices: pl.DataFrame, as_of: date) -> pl.DataFrame:
    """The ``predictions`` whose target day (``origin + horizon``) is at or before ``as_of`` and was observed in
    ``prices`` (league, currency, date, price_chaos), with ``target_date`` and ``actual_logret`` from the price at
    the origin."""
    due = predictions.with_columns(target_day().alias("target_date")).filter(pl.col("target_date") <= as_of)
    return (due.with_columns(actual_prices(prices, due))
            .filter(pl.col("actual_price").is_not_null())
            .with_columns((pl.col("actual_price") / pl.col("current_price")).log().alias("actual_logret"))
            .drop("actual_price"))


def least_absolute_shrink(model: np.ndarray, actual: np.ndarray) -> float:
    """The ``b`` in [0, 1] that minimises ``sum |actual - b x model|``: the median of ``actual / model`` weighted by
    ``|model|`` (rows where the model forecast no move weigh nothing), clipped; 1 without any such row."""
    moved = model != 0
    if not moved.any():
        return 1.0
    ratios, weights = actual[moved] / model[moved], np.abs(model[moved])
    order = np.argsort(ratios)
    cumulative = np.cumsum(weights[order])
    median = ratios[order][np.searchsorted(cumulative, cumulative[-1] / 2)]
    return float(min(max(median, 0.0), 1.0))


def league_adjustments(resolved: pl.DataFrame, level: float = INTERVAL_LEVEL, prior_rows: int = LEAGUE_PRIOR_ROWS,
                       shrink_prior_rows: int | None = LEAGUE_SHRINK_PRIOR_ROWS) -> dict[int, LeagueAdjustment]:
    """The league's ``LeagueAdjustment`` per horizon from its resolved forecasts (``resolved_forecasts``): the
    interval scale with the prior ``prior_rows``, the point shrink only with a ``shrink_prior_rows``. A stored
    prediction written before these columns existed had neither shrink nor scale."""
    if resolved.height == 0:
        return {}

    def stored(name: str, default: pl.Expr) -> pl.Expr:
        return pl.col(name).fill_null(default) if name in resolved.columns else default

    point, actual = pl.col("predicted_logret"), pl.col("actual_logret")
    rows = resolved.select(
        "horizon_days", "target_date", actual, stored("model_logret", point).alias("model"),
        ((actual - point).abs() / ((pl.col("upper_logret") - point) / stored("interval_scale", pl.lit(1.0))))
        .alias("r"),
    ).filter(pl.col("r").is_finite() & pl.col("model").is_finite() & actual.is_finite())
    out: dict[int, LeagueAdjustment] = {}
    for (h,), part in rows.partition_by("horizon_days", as_dict=True).items():
        n = part.height
        weight = 0.0 if shrink_prior_rows is None else n / (n + shrink_prior_rows)
        best = least_absolute_shrink(part["model"].to_numpy(), part["actual_logret"].to_numpy())
        recent = part.filter(pl.col("target_date") > part["target_date"].max() - timedelta(days=LEAGUE_SCALE_DAYS))
        q = conformal_quantile(recent["r"].to_numpy(), level)
        recent_weight = recent.height / (recent.height + prior_rows)
        scale = math.exp(recent_weight * math.log(q)) if q > 0 else 1.0
        out[int(h)] = LeagueAdjustment(1 + weight * (best - 1), scale, n, best, q, recent.height)
    return out


# --- confidence -------------------------------------------------------------------------------------------------


def sample_size_penalty(n: int) -> float:
    for limit, penalty in SAMPLE_PENALTIES:
        if n < limit:
            return penalty
    return 0.0


def _finite(x) -> float | None:
    return float(x) if x is not None and isinstance(x, int | float) and math.isfinite(x) else None


def confidence_score(
    skill: float | None,
    r2: float | None,
    half_width: float,
    sample_size: int,
    days_since_observed: int = 0,
) -> float:
    """How much to trust one forecast, in [0, 1] (see the module docstring for the formula)."""
    s, r = _finite(skill), _finite(r2)
    parts = [min(1.0, max(0.0, 0.5 + v)) for v in (s, r) if v is not None]
    quality = sum(parts) / len(parts) if parts else 0.25
    width = 1.0 / (1.0 + max(half_width, 0.0) / WIDTH_SCALE)
    score = math.sqrt(quality * width) * (1.0 - sample_size_penalty(sample_size))
    score *= math.exp(-max(days_since_observed, 0) / RECENCY_DAYS)
    return min(1.0, max(0.0, score))


# --- models -----------------------------------------------------------------------------------------------------


GLOBAL_ONLY_CONFIDENCE = 0.5  # a currency with no out-of-fold rows of its own: the global forecast, trusted less


@dataclass
class ForecastModel:
    """Everything one (currency, horizon) forecast needs: the global ensemble it forecasts through, the
    partition's scale of that forecast, the calibration of its intervals and its validation metrics."""

    currency: str
    horizon: int
    version: str  # the partition's registered version, or "global-v<N>" for a global forecast alone
    name: str
    global_model: Ensemble
    global_version: str
    scale: float
    calibration: Calibration
    metrics: dict[str, float] = field(default_factory=dict)  # on the currency's own out-of-fold rows
    own_rows: int = 0

    @property
    def global_only(self) -> bool:
        from poe_pipeline.currency_model import MIN_OWN_ROWS

        return self.own_rows < MIN_OWN_ROWS

    def predict_inputs(self, inputs: pl.DataFrame) -> np.ndarray:
        return self.scale * self.global_model.predict_inputs(inputs)

    @classmethod
    def load(cls, currency: str, horizon: int, version: str, directory: Path, base: GlobalForecaster,
             name: str = "") -> ForecastModel:
        """A trained partition (``currency_model``) over the global model it was built on (``base``), whose
        pooled out-of-fold residuals calibrate the intervals (see the module docstring for why not its own)."""
        from poe_pipeline.currency_model import read_currency_meta

        meta = read_currency_meta(directory)
        return cls(currency, horizon, version, name, base.ensemble, str(meta["global_version"]),
                   float(meta["scale"]), base.calibration, meta.get("metrics", {}).get("specialised", {}),
                   int(meta.get("own_rows", 0)))


@dataclass(frozen=True)
class Skip:
    currency: str
    horizon: int
    reason: str


def _current_vols(origin_rows: pl.DataFrame) -> dict[str, float | None]:
    if origin_rows.height == 0:
        return {}
    vols = origin_rows.select("currency", daily_volatility())
    return {c: _finite(v) for c, v in vols.iter_rows()}


def forecast(
    origin_rows: pl.DataFrame,
    models: Mapping[tuple[str, int], ForecastModel],
    level: float = INTERVAL_LEVEL,
    created_at: datetime | None = None,
    league: Mapping[int, LeagueAdjustment] | None = None,
) -> pl.DataFrame:
    """Prediction rows (``PREDICTIONS_SCHEMA``) for the feature rows at one origin, one per available model.

    ``origin_rows`` holds one feature row per currency (all of the same league and date). Each global ensemble
    forecasts every currency that uses it in one batched call. ``league``: what the league's resolved forecasts
    teach, per horizon (``league_adjustments``; none: nothing).
    """
    from poe_pipeline.modeling import model_inputs

    created_at = created_at or datetime.now(UTC)
    duplicated = origin_rows.filter(pl.col("currency").is_duplicated())
    if duplicated.height:
        raise ValueError(f"{duplicated.height} feature rows for {duplicated['currency'][0]} at one origin: "
                         "pass one row per currency")
    wanted = origin_rows.filter(pl.col("currency").is_in([c for c, _ in models]))
    if wanted.height == 0:
        return pl.DataFrame(schema=PREDICTIONS_SCHEMA)
    inputs, _ = model_inputs(wanted, [])
    index = {c: i for i, c in enumerate(wanted["currency"].to_list())}
    global_forecasts: dict[int, np.ndarray] = {}  # one batched call per global ensemble
    for m in models.values():
        if id(m.global_model) not in global_forecasts:
            global_forecasts[id(m.global_model)] = m.global_model.predict_inputs(inputs)
    vols = _current_vols(wanted)
    rows = {r["currency"]: r for r in wanted.iter_rows(named=True)}
    out: list[dict] = []
    previous_half: dict[str, float] = {}
    for m in sorted(models.values(), key=lambda m: (m.currency, m.horizon)):
        if m.currency not in index:
            continue
        row = rows[m.currency]
        adjustment = (league or {}).get(m.horizon, LeagueAdjustment())
        model_point = m.scale * float(global_forecasts[id(m.global_model)][index[m.currency]])
        point = adjustment.point_shrink * model_point
        vol = vols.get(m.currency)
        estimate = prediction_interval(point, m.calibration, vol, m.horizon, level, seed=m.horizon,
                                       phase=interval_phase(row.get("league_day")))
        # never narrower than a shorter horizon
        half = max(estimate.half_width * adjustment.interval_scale, previous_half.get(m.currency, 0.0))
        previous_half[m.currency] = half
        stale = int(row.get("days_since_observed") or 0)
        price = float(row["price_chaos"])
        confidence = confidence_score(m.metrics.get("skill"), m.metrics.get("r2"), half, estimate.residual_count,
                                      days_since_observed=stale)
        out.append({
            "league": row["league"], "currency": m.currency, "origin_date": row["date"],
            "horizon_days": m.horizon, "current_price": price,
            "predicted_price": price * math.exp(point),
            "pred_lower": price * math.exp(point - half), "pred_upper": price * math.exp(point + half),
            "interval_level": level,
            "confidence": confidence * (GLOBAL_ONLY_CONFIDENCE if m.global_only else 1.0),
            "model_version": m.version, "model_name": m.name, "predicted_logret": point,
            "lower_logret": point - half, "upper_logret": point + half,
            "interval_method": estimate.method, "residual_count": estimate.residual_count,
            "skill": _finite(m.metrics.get("skill")), "r2": _finite(m.metrics.get("r2")),
            "daily_volatility": volatility_scale(vol, m.calibration.reference_vol),
            "days_since_observed": stale, "created_at": created_at,
            "global_model_version": m.global_version, "model_logret": model_point,
            "point_shrink": adjustment.point_shrink, "interval_scale": adjustment.interval_scale,
        })
    frame = pl.DataFrame(out, schema=PREDICTIONS_SCHEMA)
    return frame.sort("currency", "horizon_days")


# --- the lake ---------------------------------------------------------------------------------------------------


class ModelStore(Protocol):
    """Where trained models live: ``tracking.ModelTracker`` (the MLflow registry) implements it, and also
    ``champion_versions(names)`` and ``verified(name, version)``: every champion from one registry query."""

    def champion(self, name: str) -> tuple[str, Path] | None: ...

    def version_dir(self, name: str, version: str) -> Path: ...


def _feature_files(lake: Lake) -> list[Path]:
    files = lake.parquet_files(lake.features)
    if not files:
        raise FileNotFoundError(f"No features under {lake.features}: materialize `features` first")
    return files


def volatility_history(lake: Lake, currencies: Iterable[str]) -> pl.DataFrame:
    """league, currency, date and the volatility columns of these currencies in every league."""
    return (
        pl.scan_parquet(_feature_files(lake), hive_partitioning=False)
        .filter(pl.col("currency").is_in(list(currencies)))
        .select("league", "currency", "date", "league_day", *VOL_COLUMNS)
        .collect()
    )


_ORIGIN_ROWS: dict[tuple[str, str, date | None], tuple[tuple, date, pl.DataFrame]] = {}


def origin_feature_rows(lake: Lake, league: str, origin: date | None = None) -> tuple[date, pl.DataFrame]:
    """(origin, the league's feature rows on that day); the origin defaults to the league's latest day.

    Kept per process while the league's feature files are unchanged (``files_signature``): reading one day
    decodes the whole league file, most of a one-currency forecast's time."""
    from poe_pipeline.tracking import files_signature

    files = [p for p in _feature_files(lake) if p.parent.name == f"league={league}"]
    if not files:
        raise ValueError(f"Unknown league {league!r}: no features for it under {lake.features}")
    key = (str(lake.features.resolve()), league, origin)
    signature = files_signature(files)
    kept = _ORIGIN_ROWS.get(key)
    if signature is not None and kept is not None and kept[0] == signature:
        return kept[1], kept[2]
    scan = pl.scan_parquet(files, hive_partitioning=False).filter(pl.col("league") == league)
    day = origin if origin is not None else scan.select(pl.col("date").max()).collect().item()
    rows = scan.filter(pl.col("date") == day).collect()
    if signature is not None:
        if len(_ORIGIN_ROWS) >= 16:  # a few leagues and origins: a backtest walking origins must not hoard them
            _ORIGIN_ROWS.pop(next(iter(_ORIGIN_ROWS)))
        _ORIGIN_ROWS[key] = (signature, day, rows)
    return day, rows


def training_reasons(lake: Lake) -> dict[tuple[str, int], str]:
    """The latest training outcome per (currency, horizon) that did not train, from ``model_metrics``."""
    files = lake.parquet_files(lake.model_metrics)
    if not files:
        return {}
    latest = (
        pl.scan_parquet(files, hive_partitioning=False)
        .select("trained_at", "currency", "horizon_days", "trained", "reason")
        .sort("trained_at")
        .group_by("currency", "horizon_days")
        .last()
        .filter(~pl.col("trained"))
        .collect()
    )
    return {(r["currency"], int(r["horizon_days"])): r["reason"] for r in latest.iter_rows(named=True)}


@dataclass
class PredictionRun:
    league: str
    origin_date: date
    predictions: pl.DataFrame
    skipped: list[Skip] = field(default_factory=list)
    path: Path | None = None
    league_adjustments: dict[int, LeagueAdjustment] = field(default_factory=dict)


@dataclass
class GlobalForecaster:
    """A loaded global ensemble with what a currency needs to forecast through it without a partition of its own:
    the pooled scale and the pooled calibration of its out-of-fold forecasts."""

    name: str
    version: str
    ensemble: Ensemble
    pooled_scale: float
    calibration: Calibration

    @classmethod
    def load(cls, name: str, version: str, directory: Path, vol_history: Callable[[list[str]], pl.DataFrame]
             ) -> GlobalForecaster:
        from poe_pipeline.currency_model import best_scale
        from poe_pipeline.global_model import OOF_FILE
        from poe_pipeline.modeling import Ensemble

        ensemble = Ensemble(directory)
        oof = pl.read_parquet(Path(directory) / OOF_FILE).filter(pl.col("in_pool"))
        scale = best_scale(oof["actual_logret"].to_numpy(), oof["pred_logret"].to_numpy())
        residuals = oof.select("league", "currency", "date",
                               (pl.col("actual_logret") - scale * pl.col("pred_logret")).alias("residual"))
        history = vol_history(sorted(set(residuals["currency"]))) if residuals.height else None
        return cls(name, version, ensemble, scale, Calibration.from_residual_frame(residuals, history))

    def for_currency(self, currency: str, horizon: int) -> ForecastModel:
        """The global forecast alone, for a currency without a partition champion (confidence lowered)."""
        return ForecastModel(currency, horizon, f"global-v{self.version}", self.name, self.ensemble, self.version,
                             self.pooled_scale, self.calibration)


class ModelCache:
    """Loaded models, kept per process and keyed by registry and registered version, so a new champion is picked
    up, an unchanged one is never loaded twice, and two lakes in one process never share an entry. Versions that
    a newer champion replaced are forgotten (``forget_superseded``): a long-lived process (a notebook, a server)
    holds the current models, not one set per retrain."""

    def __init__(self) -> None:
        self._globals: dict[tuple[str, str, str], GlobalForecaster] = {}
        self._partitions: dict[tuple[str, ...], ForecastModel] = {}

    def global_model(self, store: ModelStore, name: str, version: str,
                     vol_history: Callable[[list[str]], pl.DataFrame], directory: Path | None = None
                     ) -> GlobalForecaster:
        """``directory``: the version's verified folder when the caller has it (saves a registry lookup)."""
        key = (_registry_key(store), name, version)
        if key not in self._globals:
            folder = directory if directory is not None else store.version_dir(name, version)
            self._globals[key] = GlobalForecaster.load(name, version, folder, vol_history)
        return self._globals[key]

    def partition(self, key: tuple[str, ...], load: Callable[[], ForecastModel]) -> ForecastModel:
        if key not in self._partitions:
            self._partitions[key] = load()
        return self._partitions[key]

    def forget_superseded(self, used: Iterable[tuple[str, str, str]]) -> None:
        """Drop every (registry, name, version) whose name was just used at another version. A global version
        stays while a kept partition still forecasts through it."""
        from poe_pipeline.tracking import global_model_name

        versions: dict[tuple[str, str], set[str]] = {}
        for registry, name, version in used:
            versions.setdefault((registry, name), set()).add(version)

        def current(key: tuple[str, ...]) -> bool:
            return key[2] in versions.get((key[0], key[1]), {key[2]})

        self._partitions = {k: m for k, m in self._partitions.items() if current(k)}
        through = {(k[0], global_model_name(m.horizon), m.global_version) for k, m in self._partitions.items()}
        self._globals = {k: g for k, g in self._globals.items() if current(k) or k in through}

    def held(self) -> set[tuple[str, str]]:
        """(name, version) of every model held."""
        return {key[1:] for key in (*self._globals, *self._partitions)}

    def clear(self) -> None:
        self._globals.clear()
        self._partitions.clear()


DEFAULT_CACHE = ModelCache()


def clear_caches() -> None:
    """Forget what this process keeps between forecasts: loaded models, verified checksums, origin rows."""
    from poe_pipeline import tracking

    DEFAULT_CACHE.clear()
    _ORIGIN_ROWS.clear()
    tracking.forget_verified()


def _registry_key(store: ModelStore) -> str:
    return str(getattr(store, "uri", "") or id(store))


def _champion_lookup(store: ModelStore, names: list[str]) -> Callable[[str], tuple[str, Path] | None]:
    """``store.champion`` for these names, from one registry query when the store can answer for all at once
    (``ModelTracker.champion_versions``); each champion's files are still verified when it is asked for."""
    batch = getattr(store, "champion_versions", None)
    if batch is None:
        return store.champion
    versions = batch(names)  # an unreachable registry raises here, as constructing the tracker used to

    def champion(name: str) -> tuple[str, Path] | None:
        version = versions.get(name)
        return None if version is None else (str(version.version), store.verified(name, version))

    return champion


def load_champions(
    lake: Lake,
    currencies: Iterable[str],
    horizons: Iterable[int] = HORIZONS_DAYS,
    store: ModelStore | None = None,
    cache: ModelCache | None = None,
) -> tuple[dict[tuple[str, int], ForecastModel], list[Skip]]:
    """A model for every (currency, horizon) that can be forecast: the partition's champion over the global
    version it was built on, or, for a currency without one, the global champion alone (confidence lowered).
    A ``Skip`` with the reason for each one that cannot."""
    from poe_pipeline.tracking import global_model_name, registered_model_name

    currencies = list(dict.fromkeys(currencies))
    horizons = list(horizons)
    if store is None:
        from poe_pipeline.tracking import ModelTracker

        store = ModelTracker(lake)
    cache = cache or DEFAULT_CACHE
    registry = _registry_key(store)
    histories: dict[tuple[str, ...], pl.DataFrame] = {}

    def vol_history(names: list[str]) -> pl.DataFrame:
        key = tuple(names)
        if key not in histories:
            histories[key] = volatility_history(lake, names)
        return histories[key]

    champion = _champion_lookup(store, [global_model_name(h) for h in horizons]
                                + [registered_model_name(c, h) for h in horizons for c in currencies])
    reasons = functools.cache(lambda: training_reasons(lake))  # read only to explain a failure
    models: dict[tuple[str, int], ForecastModel] = {}
    skipped: list[Skip] = []
    used: set[tuple[str, str, str]] = set()  # (registry, name, version) of each model loaded now
    for h in horizons:
        gname = global_model_name(h)
        try:  # a broken or untrusted artifact folder (checksums) must not stop the other horizons
            found = champion(gname)
            if found is None:
                skipped += [Skip(c, h, f"no champion model {gname}: train global_models first") for c in currencies]
                continue
            champion_global = cache.global_model(store, gname, found[0], vol_history, directory=found[1])
            used.add((registry, gname, found[0]))
        except Exception as exc:
            skipped += [Skip(c, h, f"global model {gname} failed to load: {exc}") for c in currencies]
            continue
        for currency in currencies:
            name = registered_model_name(currency, h)
            try:
                partition = champion(name)
            except Exception as exc:
                skipped.append(Skip(currency, h, f"champion {name} failed to load: {exc}"))
                continue
            if partition is None:
                models[(currency, h)] = champion_global.for_currency(currency, h)
                continue
            version, directory = partition
            try:
                from poe_pipeline.currency_model import read_currency_meta

                built_on = str(read_currency_meta(directory)["global_version"])
                base = (champion_global if built_on == champion_global.version
                        else cache.global_model(store, gname, built_on, vol_history))
                models[(currency, h)] = cache.partition((registry, name, version), functools.partial(
                    ForecastModel.load, currency, h, version, directory, base, name))
                used |= {(registry, gname, built_on), (registry, name, version)}
            except Exception as exc:
                why = reasons().get((currency, h))
                skipped.append(Skip(currency, h, f"champion {name} v{version} at {directory} failed to load: {exc}"
                                    + (f" ({why})" if why else "")))
    cache.forget_superseded(used)
    return models, skipped


def predict_league(
    lake: Lake,
    league: str,
    currencies: Iterable[str],
    horizons: Iterable[int] = HORIZONS_DAYS,
    level: float = INTERVAL_LEVEL,
    origin: date | None = None,
    store: ModelStore | None = None,
) -> PredictionRun:
    """Forecast every currency x horizon with a champion from the origin (default: the league's latest day).

    Nothing is written; ``write_predictions`` stores the result.
    """
    currencies = list(dict.fromkeys(currencies))
    origin, rows = origin_feature_rows(lake, league, origin)
    models, skipped = load_champions(lake, currencies, horizons, store)
    present = set(rows["currency"])
    for currency in currencies:
        if currency not in present:
            skipped += [Skip(currency, h, f"no price for {currency} in {league} on {origin} or the 14 days before")
                        for h in horizons if (currency, h) in models]
    adjustments = league_adjustments(resolved_forecasts(
        read_predictions(lake, league).filter(pl.col("origin_date") < origin),
        read_daily_prices(lake, [league]), origin), level)
    frame = forecast(rows.filter(pl.col("currency").is_in(currencies)), models, level, league=adjustments)
    return PredictionRun(league, origin, frame, skipped, league_adjustments=adjustments)


def prediction_path(lake: Lake, league: str, origin: date) -> Path:
    return hive_dir(predictions_dir(lake), league=league, origin_date=origin.isoformat()) / "part.parquet"


def write_predictions(lake: Lake, predictions: pl.DataFrame) -> list[Path]:
    """Store each (league, origin) atomically; rows of the same origin that this frame lacks are kept."""
    paths = []
    frame = predictions.select(list(PREDICTIONS_SCHEMA)).cast(PREDICTIONS_SCHEMA)
    for (league, origin), part in frame.partition_by("league", "origin_date", as_dict=True).items():
        path = prediction_path(lake, league, origin)
        if path.exists():
            old = _read_stored([path])
            kept = old.join(part.select("currency", "horizon_days"), on=["currency", "horizon_days"], how="anti")
            part = pl.concat([kept, part])
        paths.append(write_parquet_atomic(part.sort("currency", "horizon_days"), path))
    return paths


# --- the pairs without a forecast ---------------------------------------------------------------------------------

FORECAST_GAPS_SCHEMA: dict[str, pl.DataType] = {
    "league": pl.Utf8,
    "origin_date": pl.Date,
    "currency": pl.Utf8,
    "horizon_days": pl.Int32,
    "liquidity_rank": pl.UInt32,
    "reason": pl.Utf8,
}
LEFT_OUT_OF_RUN = "left out of this run by its currency list (--currencies, or the run config's currencies)"


def forecast_gaps(stored: pl.DataFrame, skipped: Iterable[Skip], universe: pl.DataFrame, chosen: Iterable[str],
                  league: str, origin: date, horizons: Iterable[int] = HORIZONS_DAYS,
                  top_liquid: int = DEFAULT_RULES.top_liquid) -> pl.DataFrame:
    """The (currency, horizon) pairs without a forecast at ``origin``, each with the reason
    (``FORECAST_GAPS_SCHEMA``): every pair of the league's ``top_liquid`` most liquid currencies, which are promised a
    forecast from league day 7, and every pair the run skipped.

    ``stored``: the origin's stored predictions (a rerun keeps the rows of currencies it left out); ``universe``: the
    league's ``currency_universe``; ``chosen``: the currencies the run was asked to forecast."""
    forecast = set(zip(stored["currency"].to_list(), stored["horizon_days"].to_list(), strict=True))
    reasons = {(s.currency, int(s.horizon)): s.reason for s in skipped}
    rows = {r["currency"]: r for r in universe.iter_rows(named=True)}
    chosen = set(chosen)
    top = {c for c, r in rows.items() if r["liquidity_rank"] is not None and r["liquidity_rank"] <= top_liquid}
    out = []
    for currency in top | {c for c, _ in reasons}:
        row = rows.get(currency, {})
        for h in horizons:
            if (currency, h) in forecast:
                continue
            if (currency, h) in reasons:
                reason = reasons[(currency, h)]
            elif not row.get("eligible"):
                reason = f"not eligible: {row.get('reason') or f'not seen in {league}'} (view currency_universe)"
            elif currency not in chosen:
                reason = LEFT_OUT_OF_RUN
            else:
                reason = "no forecast stored for this origin: see the predictions asset's log"
            out.append({"league": league, "origin_date": origin, "currency": currency, "horizon_days": h,
                        "liquidity_rank": row.get("liquidity_rank"), "reason": reason})
    return (pl.DataFrame(out, schema=FORECAST_GAPS_SCHEMA)
            .sort("liquidity_rank", "currency", "horizon_days", nulls_last=True))


def forecast_gaps_path(lake: Lake, league: str, origin: date) -> Path:
    return hive_dir(lake.forecast_gaps, league=league, origin_date=origin.isoformat()) / "part.parquet"


def write_forecast_gaps(lake: Lake, gaps: pl.DataFrame, league: str, origin: date) -> Path:
    """Replace the origin's gaps (an empty file says that nothing is missing)."""
    return write_parquet_atomic(gaps.select(list(FORECAST_GAPS_SCHEMA)).cast(FORECAST_GAPS_SCHEMA),
                                forecast_gaps_path(lake, league, origin))


def read_forecast_gaps(lake: Lake, league: str, origin: date) -> pl.DataFrame | None:
    """The stored gaps of one origin; None when none were recorded (an origin forecast before they were)."""
    path = forecast_gaps_path(lake, league, origin)
    return pl.read_parquet(path).cast(FORECAST_GAPS_SCHEMA) if path.exists() else None


def read_predictions(lake: Lake, league: str | None = None, origin: date | None = None) -> pl.DataFrame:
    """Stored predictions (of one league, one origin, or all)."""
    files = lake.parquet_files(predictions_dir(lake))
    if league is not None:
        files = [p for p in files if p.parent.parent.name == f"league={league}"]
    if origin is not None:
        files = [p for p in files if p.parent.name == f"origin_date={origin.isoformat()}"]
    return _read_stored(files) if files else pl.DataFrame(schema=PREDICTIONS_SCHEMA)


def _read_stored(files: list[Path]) -> pl.DataFrame:
    """Prediction files as ``PREDICTIONS_SCHEMA``; a file written before a column existed has it null."""
    return pl.read_parquet(files, hive_partitioning=False, schema=PREDICTIONS_SCHEMA, missing_columns="insert")


def latest_origin(lake: Lake, league: str) -> date | None:
    frame = read_predictions(lake, league)
    return frame["origin_date"].max() if frame.height else None

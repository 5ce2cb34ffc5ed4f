"""Predictions: the champion ensembles' forecasts, with calibrated intervals and a confidence score.

For every currency and horizon, from the origin (the league's latest day of features):

- **Point forecast.** The champion ensemble's predicted log-return ``m`` (already shrunk towards "no change");
  ``predicted_price = current_price x exp(m)``.
- **Interval, volatility-scaled split conformal.** Training kept the ensemble's out-of-fold residuals (cross-fitted,
  so honest). Each residual is divided by the currency's volatility scale on its own day, ``s_i = r_i / sigma_i``,
  where ``sigma = max(v, VOL_FLOOR, VOL_FLOOR_REL x median v)`` and ``v = sqrt(realized_vol_14^2 +
  trend_slope_14^2)``, the root mean square of the last 14 daily log-returns (dispersion and drift). The
  half-width is ``q x sigma_now``: a calm currency gets a narrow interval and a wild one a wide one, from the same
  calibration. (On a Sanctum backtest the drift term lowered the mean Winkler score at every horizon.)
  ``q`` depends on how many residuals there are (the method is stored per row):

  - ``conformal`` (>= ``MIN_CONFORMAL`` residuals): ``q`` is the ``ceil((n + 1) x level)``-th smallest ``|s_i|``,
    the split-conformal quantile with its finite-sample correction (coverage >= level if the future is
    exchangeable with the validation folds);
  - ``bootstrap`` (``MIN_BOOTSTRAP`` to ``MIN_CONFORMAL - 1``): ``q`` is the ``level`` quantile of ``|s|``,
    averaged over ``BOOTSTRAP_RESAMPLES`` resamples (seeded, so reruns agree);
  - ``volatility`` (fewer): a conservative normal interval, ``CONSERVATIVE_INFLATION x z x sigma_now x sqrt(h)``.

  Intervals are symmetric in log-price, so they always contain the point forecast, and the half-width never shrinks
  from one horizon to a longer one (a longer horizon cannot honestly be more certain).
- **Confidence in [0, 1].** ``sqrt(quality x width)`` times penalty factors, where quality averages
  ``clip(0.5 + skill)`` and ``clip(0.5 + R2)`` of validation (0.25 when unvalidated), width is
  ``1 / (1 + half_width / WIDTH_SCALE)``, and the factors are: sample size ``1 - penalty`` (n < 5: 0.7, < 10: 0.5,
  < 30: 0.3, < 100: 0.1, n = validation residuals), dimensionality ``rows / features`` when the model has more
  features than training rows, and recency ``exp(-days_since_observed / RECENCY_DAYS)``.

Storage is append-only, one file per (league, origin date): ``predictions/league=<L>/origin_date=<D>/part.parquet``.
Re-running an origin rewrites that one file atomically, keeping the rows of currencies that the rerun left out.
A currency without a champion gets no row; the run returns why.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from statistics import NormalDist
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from poe_pipeline.lake import Lake, hive_dir, write_parquet_atomic
from poe_pipeline.settings import HORIZONS_DAYS

if TYPE_CHECKING:  # both are imported where used: this module stays light for the warehouse to import
    from poe_pipeline.modeling import Ensemble

INTERVAL_LEVEL = 0.8
MIN_CONFORMAL = 15
MIN_BOOTSTRAP = 5
BOOTSTRAP_RESAMPLES = 1000
CONSERVATIVE_INFLATION = 1.5
VOL_COLUMNS = ("realized_vol_14", "trend_slope_14")
VOL_FLOOR = 0.005  # 0.5 % a day: flat, quantised series (a price stuck at 1.0) still move a little
VOL_FLOOR_REL = 0.25  # and never below a quarter of the currency's typical volatility
FALLBACK_DAILY_VOL = 0.07  # median realized_vol_14 of the poe.ninja dumps: a currency without any history
WIDTH_SCALE = 0.10  # a +-10 % interval halves the width factor of the confidence
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
    return lake.root / "predictions"


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


@dataclass(frozen=True)
class Calibration:
    """An ensemble's out-of-fold residuals, each divided by the volatility scale of its own day."""

    scores: np.ndarray  # signed residual / scale
    reference_vol: float  # median volatility over the residuals' days (NaN without any)

    @property
    def count(self) -> int:
        return len(self.scores)

    @classmethod
    def from_arrays(cls, residuals: np.ndarray, vols: np.ndarray | None = None) -> Calibration:
        """``vols``: the currency's daily volatility on each residual's day (NaN where unknown)."""
        residuals = np.asarray(residuals, dtype=np.float64)
        keep = np.isfinite(residuals)
        residuals = residuals[keep]
        if vols is None:
            vols = np.full(len(keep), np.nan)
        vols = np.asarray(vols, dtype=np.float64)[keep]
        known = vols[np.isfinite(vols) & (vols > 0)]
        reference = float(np.median(known)) if len(known) else float("nan")
        scales = np.array([volatility_scale(v, reference) for v in vols]) if len(vols) else np.array([])
        return cls(residuals / scales if len(residuals) else residuals, reference)

    @classmethod
    def from_residual_frame(cls, residuals: pl.DataFrame, vol_history: pl.DataFrame | None) -> Calibration:
        """``residuals``: ``Ensemble.residuals()``; ``vol_history``: the currency's league, date, ``VOL_COLUMNS``."""
        if vol_history is not None and vol_history.height:
            vols = vol_history.select("league", "date", daily_volatility().alias("_vol")).unique(["league", "date"])
            joined = residuals.join(vols, on=["league", "date"], how="left", maintain_order="left")
            return cls.from_arrays(joined["residual"].to_numpy(), joined["_vol"].to_numpy())
        return cls.from_arrays(residuals["residual"].to_numpy())


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


def conformal_quantile(abs_scores: np.ndarray, level: float) -> float:
    """The ``ceil((n + 1) level)``-th smallest score (the largest one when n is too small for the level)."""
    ordered = np.sort(abs_scores)
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
) -> IntervalEstimate:
    """The interval of one forecast: conformal, bootstrap or volatility, by the number of residuals."""
    if not 0 < level < 1:
        raise ValueError(f"interval level {level!r} must lie strictly between 0 and 1, e.g. 0.8")
    scale = volatility_scale(current_vol, calibration.reference_vol)
    n = calibration.count
    abs_scores = np.abs(calibration.scores)
    if n >= MIN_CONFORMAL:
        return IntervalEstimate(point, conformal_quantile(abs_scores, level) * scale, CONFORMAL, n)
    if n >= MIN_BOOTSTRAP:
        return IntervalEstimate(point, bootstrap_quantile(abs_scores, level, seed=seed) * scale, BOOTSTRAP, n)
    half = CONSERVATIVE_INFLATION * _z(level) * scale * math.sqrt(horizon)
    return IntervalEstimate(point, half, VOLATILITY, n)


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
    n_features: int = 0,
    n_train_rows: int = 0,
    days_since_observed: int = 0,
) -> float:
    """How much to trust one forecast, in [0, 1] (see the module docstring for the formula)."""
    s, r = _finite(skill), _finite(r2)
    parts = [min(1.0, max(0.0, 0.5 + v)) for v in (s, r) if v is not None]
    quality = sum(parts) / len(parts) if parts else 0.25
    width = 1.0 / (1.0 + max(half_width, 0.0) / WIDTH_SCALE)
    score = math.sqrt(quality * width) * (1.0 - sample_size_penalty(sample_size))
    if n_features > n_train_rows > 0:
        score *= n_train_rows / n_features
    score *= math.exp(-max(days_since_observed, 0) / RECENCY_DAYS)
    return min(1.0, max(0.0, score))


# --- models -----------------------------------------------------------------------------------------------------


@dataclass
class ForecastModel:
    """A loaded ensemble with its calibration: everything one (currency, horizon) forecast needs."""

    currency: str
    horizon: int
    version: str
    name: str
    ensemble: Ensemble
    calibration: Calibration

    @property
    def metrics(self) -> dict[str, float]:
        return self.ensemble.meta.get("metrics", {}).get("ensemble", {})

    @property
    def train_rows(self) -> int:
        return int(self.ensemble.meta.get("data_window", {}).get("rows", 0) or 0)

    @classmethod
    def load(cls, currency: str, horizon: int, version: str, directory: Path, vol_history: pl.DataFrame | None,
             name: str = "") -> ForecastModel:
        from poe_pipeline.modeling import Ensemble

        ensemble = Ensemble(directory)
        residuals = ensemble.residuals() if (Path(directory) / "residuals.parquet").exists() else None
        if residuals is None or residuals.height == 0:
            calibration = Calibration.from_arrays(np.array([]))
        else:
            calibration = Calibration.from_residual_frame(residuals, vol_history)
        return cls(currency, horizon, version, name, ensemble, calibration)


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
) -> pl.DataFrame:
    """Prediction rows (``PREDICTIONS_SCHEMA``) for the feature rows at one origin, one per available model.

    ``origin_rows`` holds one feature row per currency (all of the same league and date).
    """
    from poe_pipeline.modeling import model_inputs

    created_at = created_at or datetime.now(UTC)
    out: list[dict] = []
    vols = _current_vols(origin_rows)
    by_currency: dict[str, list[ForecastModel]] = {}
    for (currency, _), model in models.items():
        by_currency.setdefault(currency, []).append(model)
    for currency, ms in by_currency.items():
        rows = origin_rows.filter(pl.col("currency") == currency)
        if rows.height == 0:
            continue
        if rows.height > 1:
            raise ValueError(f"{rows.height} feature rows for {currency} at one origin: pass one row per currency")
        row = rows.row(0, named=True)
        inputs, _ = model_inputs(rows, [])
        vol = vols.get(currency)
        previous_half = 0.0
        for m in sorted(ms, key=lambda m: m.horizon):
            point = float(m.ensemble.predict_inputs(inputs)[0])
            estimate = prediction_interval(point, m.calibration, vol, m.horizon, level,
                                           seed=m.horizon)
            half = max(estimate.half_width, previous_half)  # never narrower than a shorter horizon
            previous_half = half
            metrics = m.metrics
            stale = int(row.get("days_since_observed") or 0)
            price = float(row["price_chaos"])
            out.append({
                "league": row["league"], "currency": currency, "origin_date": row["date"],
                "horizon_days": m.horizon, "current_price": price,
                "predicted_price": price * math.exp(point),
                "pred_lower": price * math.exp(point - half), "pred_upper": price * math.exp(point + half),
                "interval_level": level,
                "confidence": confidence_score(metrics.get("skill"), metrics.get("r2"), half,
                                               estimate.residual_count, len(m.ensemble.feature_names),
                                               m.train_rows, stale),
                "model_version": m.version, "model_name": m.name, "predicted_logret": point,
                "lower_logret": point - half, "upper_logret": point + half,
                "interval_method": estimate.method, "residual_count": estimate.residual_count,
                "skill": _finite(metrics.get("skill")), "r2": _finite(metrics.get("r2")),
                "daily_volatility": volatility_scale(vol, m.calibration.reference_vol),
                "days_since_observed": stale, "created_at": created_at,
            })
    frame = pl.DataFrame(out, schema=PREDICTIONS_SCHEMA)
    return frame.sort("currency", "horizon_days")


# --- the lake ---------------------------------------------------------------------------------------------------


ChampionLookup = Callable[[str, int], "tuple[str, Path] | None"]


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
        .select("league", "currency", "date", *VOL_COLUMNS)
        .collect()
    )


def origin_feature_rows(lake: Lake, league: str, origin: date | None = None) -> tuple[date, pl.DataFrame]:
    """(origin, the league's feature rows on that day); the origin defaults to the league's latest day."""
    files = [p for p in _feature_files(lake) if p.parent.name == f"league={league}"]
    if not files:
        raise ValueError(f"Unknown league {league!r}: no features for it under {lake.features}")
    scan = pl.scan_parquet(files, hive_partitioning=False).filter(pl.col("league") == league)
    if origin is None:
        origin = scan.select(pl.col("date").max()).collect().item()
    return origin, scan.filter(pl.col("date") == origin).collect()


def training_reasons(lake: Lake) -> dict[tuple[str, int], str]:
    """The latest training outcome per (currency, horizon) that did not train, from ``model_metrics``."""
    files = lake.parquet_files(lake.root / "model_metrics")
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

    def skipped_frame(self) -> pl.DataFrame:
        return pl.DataFrame([s.__dict__ for s in self.skipped],
                            schema={"currency": pl.Utf8, "horizon": pl.Int64, "reason": pl.Utf8})


def load_champions(
    lake: Lake,
    currencies: Iterable[str],
    horizons: Iterable[int] = HORIZONS_DAYS,
    champion: ChampionLookup | None = None,
    vol_history: pl.DataFrame | None = None,
) -> tuple[dict[tuple[str, int], ForecastModel], list[Skip]]:
    """Every champion that exists and loads; a ``Skip`` with the reason for each one that does not."""
    from poe_pipeline.tracking import registered_model_name

    currencies = list(dict.fromkeys(currencies))
    horizons = list(horizons)
    if champion is None:
        from poe_pipeline.tracking import ModelTracker

        champion = ModelTracker(lake).champion_dir
    if vol_history is None:
        vol_history = volatility_history(lake, currencies)
    vols = {c: g for (c,), g in vol_history.partition_by("currency", as_dict=True).items()}
    reasons = training_reasons(lake)
    models: dict[tuple[str, int], ForecastModel] = {}
    skipped: list[Skip] = []
    for currency in currencies:
        for h in horizons:
            name = registered_model_name(currency, h)
            found = champion(currency, h)
            if found is None:
                why = reasons.get((currency, h))
                reason = f"no champion model {name}" + (f": {why}" if why else ": train currency_models first")
                skipped.append(Skip(currency, h, reason))
                continue
            version, directory = found
            try:
                models[(currency, h)] = ForecastModel.load(currency, h, version, directory, vols.get(currency), name)
            except Exception as exc:  # a broken artifact folder must not stop the other currencies
                skipped.append(Skip(currency, h, f"champion {name} v{version} at {directory} failed to load: {exc}"))
    return models, skipped


def predict_league(
    lake: Lake,
    league: str,
    currencies: Iterable[str],
    horizons: Iterable[int] = HORIZONS_DAYS,
    level: float = INTERVAL_LEVEL,
    origin: date | None = None,
    champion: ChampionLookup | None = None,
) -> PredictionRun:
    """Forecast every currency x horizon with a champion from the origin (default: the league's latest day).

    Nothing is written; ``write_predictions`` stores the result.
    """
    currencies = list(dict.fromkeys(currencies))
    origin, rows = origin_feature_rows(lake, league, origin)
    models, skipped = load_champions(lake, currencies, horizons, champion)
    present = set(rows["currency"])
    for currency in currencies:
        if currency not in present:
            skipped += [Skip(currency, h, f"no price for {currency} in {league} on {origin} or the 14 days before")
                        for h in horizons if (currency, h) in models]
    frame = forecast(rows.filter(pl.col("currency").is_in(currencies)), models, level)
    return PredictionRun(league, origin, frame, skipped)


def prediction_path(lake: Lake, league: str, origin: date) -> Path:
    return hive_dir(predictions_dir(lake), league=league, origin_date=origin.isoformat()) / "part.parquet"


def write_predictions(lake: Lake, predictions: pl.DataFrame) -> list[Path]:
    """Store each (league, origin) atomically; rows of the same origin that this frame lacks are kept."""
    paths = []
    frame = predictions.select(list(PREDICTIONS_SCHEMA)).cast(PREDICTIONS_SCHEMA)
    for (league, origin), part in frame.partition_by("league", "origin_date", as_dict=True).items():
        path = prediction_path(lake, league, origin)
        if path.exists():
            old = pl.read_parquet(path).select(list(PREDICTIONS_SCHEMA)).cast(PREDICTIONS_SCHEMA)
            kept = old.join(part.select("currency", "horizon_days"), on=["currency", "horizon_days"], how="anti")
            part = pl.concat([kept, part])
        paths.append(write_parquet_atomic(part.sort("currency", "horizon_days"), path))
    return paths


def read_predictions(lake: Lake, league: str | None = None, origin: date | None = None) -> pl.DataFrame:
    """Stored predictions (of one league, one origin, or all)."""
    files = lake.parquet_files(predictions_dir(lake))
    if league is not None:
        files = [p for p in files if p.parent.parent.name == f"league={league}"]
    if origin is not None:
        files = [p for p in files if p.parent.name == f"origin_date={origin.isoformat()}"]
    if not files:
        return pl.DataFrame(schema=PREDICTIONS_SCHEMA)
    return pl.read_parquet(files, hive_partitioning=False)


def latest_origin(lake: Lake, league: str) -> date | None:
    frame = read_predictions(lake, league)
    return frame["origin_date"].max() if frame.height else None

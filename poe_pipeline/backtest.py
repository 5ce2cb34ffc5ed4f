"""The backtest: replay a league day by day, as if live, and score the forecasts and the report's advice.

``poe-pipeline backtest --history DIR --league L [--refit-every 7] [--retune-every 1] [--profile test]``

- **Only the past.** For each origin day, every league's daily prices are cut to ``date <= origin`` and the
  features are rebuilt from that cut (a league whose data ended earlier is built once and reused). The league
  calendar forgets end dates after the origin, and the currency universe, when not given, is decided on the first
  origin's data. Models never see a target that was realised after the origin; ``tests/test_backtest.py`` proves it
  by multiplying every later price by 100 and getting the same predictions.
- **Refits.** Every ``refit_every`` origins, the global model of each horizon is retrained
  (``training.refit_globals``: the weekly retrain's (horizon, kind) jobs, without the registry) and specialised to
  every currency (``currency_model.train_currency``), without MLflow (artifacts in a temporary folder, loaded and
  then deleted); between refits the latest models predict from
  each day's fresh features. Intervals and confidence are computed exactly as live (``forecasting``), the league's
  own interval scale included: it learns from the replay's forecasts come true by each origin. With
  ``retune_every`` N > 1 only every N-th refit re-tunes and re-validates; the refits between keep that tuning
  (hyperparameters, weights, out-of-fold forecasts) and refit the final models on the new data, as the weekly
  retrain does: only when the pooled rows changed by ``global_model.REFIT_MIN_GROWTH`` since the last fit (a refit
  day that keeps the models is in ``kept_refits``; ``retune_every`` counts the refits that fitted).
- **Outputs.** A predictions file with the live columns plus ``actual_price`` (the price observed on
  ``origin + horizon``; null when that day was not observed) and, per horizon: log-MAE, MAPE, directional accuracy
  on moves of at least 1 %, skill against persistence, interval coverage against nominal, the mean Winkler score
  (in log-price, so currencies of any price weigh alike) and the mean half-width.
- **Strategy.** Every 7 origins, the report's advice at the longest horizon is followed for that horizon: its
  picks with its allocation (the rest in chaos), against holding chaos (0 %), an equal-weight basket of every
  backtested currency, and a forced top-k (the k best scores with a positive expected return, equal weights,
  confident or not). Exits use the last price observed on or before the exit day.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import polars as pl

from poe_pipeline.currency_model import train_currency
from poe_pipeline.features import FEATURE_COLUMNS, build_features
from poe_pipeline.forecasting import (
    INTERVAL_LEVEL,
    PREDICTIONS_SCHEMA,
    VOL_COLUMNS,
    ForecastModel,
    GlobalForecaster,
    Skip,
    forecast,
    league_adjustments,
    resolved_forecasts,
)
from poe_pipeline.global_model import OOF_FILE, GlobalValidation, pooled_rows, refit_due
from poe_pipeline.lake import Lake, write_parquet_atomic, write_text_atomic
from poe_pipeline.leagues import league_calendar, training_leagues
from poe_pipeline.modeling import DIRECTION_THRESHOLD, limit_threads
from poe_pipeline.names import canonical_currency_name, slug
from poe_pipeline.prices import actual_prices
from poe_pipeline.reporting import REPORT_FEATURE_COLUMNS, markdown_table
from poe_pipeline.seasonal import drift_table, with_league_day
from poe_pipeline.settings import HORIZONS_DAYS, Profile, get_profile, resolve_lake_root

FIRST_ORIGIN_DAY = 7  # forecasts start on league day 7, as live (the universe's 30 most liquid are known by then)
STRATEGY_EVERY = 7
STRATEGY_TOP_K = 3
BACKTEST_SCHEMA = {**PREDICTIONS_SCHEMA, "actual_price": pl.Float64, "refit_date": pl.Date}


# --- data -------------------------------------------------------------------------------------------------------


def load_history_prices(history: Path) -> pl.DataFrame:
    """Daily chaos prices of every poe.ninja dump in ``history`` (no lake needed)."""
    from poe_pipeline.history import find_dumps
    from poe_pipeline.prices import daily_from_dump_rows, merge_daily_prices
    from poe_pipeline.sources.poe_ninja import read_dump

    history = Path(history)
    dumps = find_dumps([history])
    if not dumps:
        raise ValueError(f"--history {history}: no poe.ninja dumps (<League>.currency.csv[.gz]) in it; "
                         "use --history sample_data")
    return merge_daily_prices(daily_from_dump_rows(pl.concat([read_dump(p) for p in dumps])))


def calendar_as_of(prices: pl.DataFrame, origin: date) -> pl.DataFrame:
    """The league calendar of the prices known at ``origin``, without end dates that lie after it."""
    calendar = league_calendar(prices)
    return calendar.with_columns(
        pl.when(pl.col("end_date") <= origin).then(pl.col("end_date")).alias("end_date")
    )


class FeaturesAsOf:
    """Features of every league as they were on an origin day, reusing leagues whose data ended before it."""

    def __init__(self, prices: pl.DataFrame):
        self.prices = prices
        self.last_day = dict(prices.group_by("league").agg(pl.col("date").max()).iter_rows())
        self._closed: tuple[tuple, pl.DataFrame] | None = None
        self._drift: dict[str, pl.DataFrame] = {}

    def _drift_of(self, league: str, calendar: pl.DataFrame) -> pl.DataFrame:
        """The league-phase drift of every day of an open league, once: a value depends only on returns dated on or
        before its own day (``seasonal``), so the whole history gives what the history known at any origin gives."""
        if league not in self._drift:
            days = with_league_day(self.prices.filter(pl.col("league") == league), calendar)
            self._drift[league] = drift_table(days, self.prices, calendar)
        return self._drift[league]

    def at(self, origin: date) -> tuple[pl.DataFrame, pl.DataFrame]:
        """(features, calendar) as of ``origin``."""
        known = self.prices.filter(pl.col("date") <= origin)
        calendar = calendar_as_of(known, origin)
        closed = sorted(lg for lg, last in self.last_day.items() if last <= origin and lg in set(calendar["league"]))
        key = tuple(calendar.filter(pl.col("league").is_in(closed)).sort("league").rows())
        if self._closed is None or self._closed[0] != key:
            rows = known.filter(pl.col("league").is_in(closed))
            self._closed = (key, build_features(rows, calendar, history=known) if rows.height else pl.DataFrame())
        open_rows = known.filter(~pl.col("league").is_in(closed))
        drift = (pl.concat([self._drift_of(lg, calendar) for lg in open_rows["league"].unique().sort()])
                 if open_rows.height else None)
        parts = [f for f in (self._closed[1],
                             build_features(open_rows, calendar, drift=drift) if open_rows.height else None)
                 if f is not None and f.height]
        return pl.concat(parts, how="vertical_relaxed") if parts else pl.DataFrame(), calendar


def backtest_origins(prices: pl.DataFrame, league: str, first_day: int = FIRST_ORIGIN_DAY,
                     max_origins: int | None = None, last: date | None = None) -> list[date]:
    """Every day of ``league`` with prices, from league day ``first_day`` to its second-to-last day."""
    days = prices.filter(pl.col("league") == league)["date"].unique().sort().to_list()
    if not days:
        known = ", ".join(sorted(prices["league"].unique()))
        raise ValueError(f"Unknown league {league!r}: the history has {known}")
    start = days[0] + timedelta(days=first_day)
    end = last or days[-1] - timedelta(days=1)
    origins = [d for d in days if start <= d <= end]
    if not origins:
        raise ValueError(f"{league} has {len(days)} days: too short for a backtest starting at league day {first_day}")
    return origins[:max_origins] if max_origins else origins


# --- the replay -------------------------------------------------------------------------------------------------


@dataclass
class BacktestRun:
    league: str
    predictions: pl.DataFrame  # BACKTEST_SCHEMA
    skipped: list[tuple[date, Skip]] = field(default_factory=list)
    refits: list[date] = field(default_factory=list)
    kept_refits: list[date] = field(default_factory=list)  # refit days whose pooled rows changed too little to refit
    currencies: list[str] = field(default_factory=list)
    seconds: float = 0.0
    report_features: dict[date, pl.DataFrame] = field(default_factory=dict)  # the league's rows at decision days


def _universe_at(prices: pl.DataFrame, league: str, origin: date) -> list[str]:
    from poe_pipeline.universe import currency_universe

    known = prices.filter(pl.col("date") <= origin)
    universe = currency_universe(known, calendar_as_of(known, origin), league)
    return universe.filter(pl.col("eligible"))["currency"].to_list()


def _refit(features: pl.DataFrame, rows: pl.DataFrame, calendar: pl.DataFrame, league: str, currencies: list[str],
           horizons: list[int], profile: Profile, workdir: Path, seed: int, version: str,
           validations: dict[int, GlobalValidation] | None = None, workers: int = 1,
           ) -> tuple[dict[tuple[str, int], ForecastModel], list[Skip]]:
    """Train the global model of each horizon on ``workers`` processes and specialise it to every currency, on the
    features known at the origin and their ``pooled_rows``; load the models in memory and delete the artifacts.

    ``validations``: None re-tunes every global model; a dict is used warm (a horizon found there keeps its tuning,
    weights and out-of-fold forecasts) and receives the validation of every global model trained now.
    """
    from poe_pipeline.training import refit_globals

    order = training_leagues(calendar, league)
    # a (horizon, kind) job each, as the weekly retrain: two cores stay busy while three horizons tune
    results = refit_globals(rows, FEATURE_COLUMNS, horizons, order, league, profile, workdir,
                            warm=validations or {}, workers=workers, seed=seed)
    history = features.filter(pl.col("currency").is_in(set(currencies) | set(rows["currency"].unique())))

    def vol_history(names: list[str]) -> pl.DataFrame:
        return history.filter(pl.col("currency").is_in(names)).select(
            "league", "currency", "date", "league_day", *VOL_COLUMNS)

    models: dict[tuple[str, int], ForecastModel] = {}
    skipped: list[Skip] = []
    for result in results:
        h = result.horizon
        if not result.trained:
            skipped += [Skip(c, h, result.reason) for c in currencies]
            continue
        directory = Path(result.artifact_dir)
        if validations is not None:
            validations[h] = GlobalValidation.read(directory)
        name = f"backtest-global-{h}d"
        base = GlobalForecaster.load(name, version, directory, vol_history)
        oof = pl.read_parquet(directory / OOF_FILE)
        for currency in currencies:
            part = train_currency(currency, h, oof, name, version, workdir / f"{slug(currency)}-{h}d")
            models[(currency, h)] = ForecastModel.load(currency, h, version, Path(part.artifact_dir), base,
                                                       f"backtest-{slug(currency)}-{h}d")
            shutil.rmtree(part.artifact_dir, ignore_errors=True)
        shutil.rmtree(directory, ignore_errors=True)  # loaded in memory
    return models, skipped


def run_backtest(
    prices: pl.DataFrame,
    league: str,
    origins: list[date],
    currencies: Iterable[str] | None = None,
    refit_every: int = 7,
    profile: Profile | str = "test",
    horizons: Iterable[int] = HORIZONS_DAYS,
    level: float = INTERVAL_LEVEL,
    workers: int = 1,
    seed: int = 42,
    progress: Callable[[str], None] | None = None,
    retune_every: int = 1,
    tuning: dict[int, GlobalValidation] | None = None,
) -> BacktestRun:
    """Replay ``league`` over ``origins`` (ascending), refitting every ``refit_every`` origins.

    ``retune_every``: every that many refits, the refit re-tunes and re-validates each partition (as the weekly
    retrain does); the refits between keep the last tuning and only refit the final models on the new data.
    ``tuning``: every refit is warm with these validations (horizon -> the global model's tuning, weights and
    out-of-fold rows), never re-tuned. Leak-free for a replay of the current league only: the league folds that
    tuning saw are past leagues.
    """
    started = time.perf_counter()
    profile = get_profile(profile) if isinstance(profile, str) else profile
    if refit_every < 1:
        raise ValueError(f"--refit-every {refit_every}: must be at least 1 (days between refits)")
    if retune_every < 1:
        raise ValueError(f"--retune-every {retune_every}: must be at least 1 (refits between re-tunes)")
    if not origins:
        raise ValueError("No origins to backtest")
    origins = sorted(origins)
    horizons = sorted(set(horizons))
    if currencies is None:
        currencies = _universe_at(prices, league, origins[0])
    else:
        currencies = list(dict.fromkeys(canonical_currency_name(c) for c in currencies))
    known_names = set(prices.filter(pl.col("league") == league)["currency"].unique())
    unknown = [c for c in currencies if c not in known_names]
    if unknown:
        raise ValueError(f"Unknown currencies in {league}: {', '.join(unknown)} "
                         "(check the spelling, e.g. 'Divine Orb')")
    if not currencies:
        raise ValueError(f"No eligible currency in {league} on {origins[0]}: pass currencies explicitly")
    say = progress or (lambda _: None)
    builder = FeaturesAsOf(prices)
    league_prices = prices.filter(pl.col("league") == league)
    frames: list[pl.DataFrame] = []
    run = BacktestRun(league, pl.DataFrame(schema=BACKTEST_SCHEMA), currencies=list(currencies))
    models: dict[tuple[str, int], ForecastModel] = {}
    refit_date: date | None = None
    fitted_rows = 0  # pooled rows at the last fit of the global models
    validations: dict[int, GlobalValidation] = dict(tuning or {})
    with tempfile.TemporaryDirectory(prefix="poe-backtest-") as tmp:
        for i, origin in enumerate(origins):
            features, calendar = builder.at(origin)
            if i % refit_every == 0:
                tuned_now = tuning is None and len(run.refits) % retune_every == 0
                pooled = pooled_rows(features, training_leagues(calendar, league), league, currencies)
                n_pooled = int(pooled["in_pool"].sum())  # labelled or not
                # as the weekly retrain: refit_due decides whether a refit that keeps the tuning fits
                due, change = refit_due(fitted_rows, n_pooled) if models and not tuned_now else (True, 0.0)
                if not due:
                    say(f"[{i + 1}/{len(origins)}] {origin}: kept {len(models)} models (the pooled rows changed "
                        f"{change:+.1%} since their fit)")
                    run.kept_refits.append(origin)
                else:
                    fitted_rows = n_pooled
                    t = time.perf_counter()
                    if tuned_now:
                        validations.clear()  # a full re-tune
                    models, skipped = _refit(features, pooled, calendar, league, currencies, horizons, profile,
                                             Path(tmp) / origin.isoformat(), seed, f"backtest-{origin}",
                                             validations if retune_every > 1 or tuning else None,  # kept if reused
                                             workers=workers)
                    refit_date = origin
                    run.refits.append(origin)
                    run.skipped += [(origin, s) for s in skipped]
                    verb = "re-tuned" if tuned_now else "refitted"
                    say(f"[{i + 1}/{len(origins)}] {origin}: {verb} {len(models)} models "
                        f"({len(skipped)} skipped) in {time.perf_counter() - t:.1f}s")
                del pooled  # the forecasts need only the origin's rows
            rows = features.filter((pl.col("league") == league) & (pl.col("date") == origin)
                                   & pl.col("currency").is_in(currencies))
            # as live: the replay's own forecasts that have come true by this origin adjust the next ones
            adjustments = league_adjustments(resolved_forecasts(
                pl.concat(frames).drop("refit_date") if frames else pl.DataFrame(schema=PREDICTIONS_SCHEMA),
                league_prices, origin), level)
            frame = forecast(rows, models, level, league=adjustments)
            if i % STRATEGY_EVERY == 0:
                run.report_features[origin] = features.filter(pl.col("league") == league).select(
                    [c for c in REPORT_FEATURE_COLUMNS if c in features.columns])
            frames.append(frame.with_columns(pl.lit(refit_date).alias("refit_date")))
    predictions = pl.concat(frames) if frames else pl.DataFrame(schema=PREDICTIONS_SCHEMA)
    predictions = predictions.with_columns(actual_prices(prices, predictions))
    run.predictions = predictions.select(list(BACKTEST_SCHEMA)).cast(BACKTEST_SCHEMA)
    run.seconds = time.perf_counter() - started
    return run


# --- scoring ----------------------------------------------------------------------------------------------------


def winkler_score(lower: np.ndarray, upper: np.ndarray, actual: np.ndarray, level: float) -> np.ndarray:
    """Interval width plus ``2 / alpha`` times the miss distance (Winkler 1972); lower is better."""
    alpha = 1.0 - level
    below = np.clip(lower - actual, 0.0, None)
    above = np.clip(actual - upper, 0.0, None)
    return (upper - lower) + (2.0 / alpha) * (below + above)


def forecast_scores(predictions: pl.DataFrame) -> pl.DataFrame:
    """Per horizon, over the rows whose actual price is known (log-price errors; see the module docstring)."""
    rows = []
    known = predictions.filter(pl.col("actual_price").is_not_null())
    for (h,), g in sorted(known.partition_by("horizon_days", as_dict=True).items()):
        price = g["current_price"].to_numpy()
        actual = np.log(g["actual_price"].to_numpy() / price)
        pred = np.log(g["predicted_price"].to_numpy() / price)
        lo, hi = np.log(g["pred_lower"].to_numpy() / price), np.log(g["pred_upper"].to_numpy() / price)
        level = float(g["interval_level"][0])
        mae, persistence = float(np.mean(np.abs(actual - pred))), float(np.mean(np.abs(actual)))
        moved = np.abs(actual) >= DIRECTION_THRESHOLD
        rows.append({
            "horizon_days": int(h), "n": g.height, "currencies": g["currency"].n_unique(),
            "log_mae": mae, "persistence_log_mae": persistence,
            "median_log_ae": float(np.median(np.abs(actual - pred))),  # robust to one-day glitches in the dumps
            "skill": 1.0 - mae / persistence if persistence > 0 else float("nan"),
            "mape": float(np.mean(np.abs(g["predicted_price"].to_numpy() / g["actual_price"].to_numpy() - 1))),
            "directional_accuracy": float(np.mean(np.sign(pred[moved]) == np.sign(actual[moved])))
            if moved.any() else float("nan"),
            "moves": int(moved.sum()),
            "coverage": float(np.mean((actual >= lo) & (actual <= hi))), "nominal": level,
            "mean_winkler": float(np.mean(winkler_score(lo, hi, actual, level))),
            "mean_half_width": float(np.mean((hi - lo) / 2)),
        })
    return pl.DataFrame(rows)


def strategy_returns(run: BacktestRun, prices: pl.DataFrame, top_k: int = STRATEGY_TOP_K) -> pl.DataFrame:
    """One row per decision day (every ``STRATEGY_EVERY`` origins): the realised return of the report's advice
    and of the benchmarks."""
    from poe_pipeline.reporting import build_report

    p = run.predictions
    if p.height == 0:
        return pl.DataFrame()
    h = int(p["horizon_days"].max())
    exits = p.filter(pl.col("horizon_days") == h)
    exits = exits.with_columns(actual_prices(prices, exits, exact=False).alias("exit_price"))
    rows = []
    for origin, features in sorted(run.report_features.items()):
        day = exits.filter(pl.col("origin_date") == origin)
        if day.height == 0 or day["exit_price"].null_count() == day.height:
            continue
        report = build_report(day.drop("actual_price", "refit_date", "exit_price"), features)
        ret = dict(zip(day["currency"], (day["exit_price"] / day["current_price"] - 1).to_list(), strict=True))
        picks = report.picks()
        report_ret = sum(float(f) * (ret.get(c) or 0.0) for c, f in zip(picks["currency"], picks["allocation_fraction"],
                                                                 strict=True))
        candidates = report.table.filter(pl.col("expected_logret") > 0).sort("score", descending=True).head(top_k)
        forced = [ret.get(c) for c in candidates["currency"] if ret.get(c) is not None]
        basket = [r for r in ret.values() if r is not None]
        rows.append({
            "origin_date": origin, "exit_date": origin + timedelta(days=h), "horizon_days": h,
            "picks": ", ".join(f"{c} {f:.0%}" for c, f in zip(picks["currency"], picks["allocation_fraction"],
                                                             strict=True)),
            "invested": float(picks["allocation_fraction"].sum()) if picks.height else 0.0,
            "report_return": float(report_ret),
            "top_k": ", ".join(candidates["currency"]),
            "top_k_return": float(np.mean(forced)) if forced else 0.0,
            "chaos_return": 0.0,
            "basket_return": float(np.mean(basket)) if basket else 0.0,
        })
    return pl.DataFrame(rows)


def strategy_summary(weekly: pl.DataFrame) -> dict[str, float]:
    if weekly.height == 0:
        return {}
    out = {"decisions": float(weekly.height),
           "weeks_invested": float((weekly["invested"] > 0).sum())}
    for col in ("report_return", "top_k_return", "chaos_return", "basket_return"):
        out[col.replace("_return", "_total")] = float(np.prod(1 + weekly[col].to_numpy()) - 1)
    return out


# --- the command ------------------------------------------------------------------------------------------------


@dataclass
class BacktestOutput:
    run: BacktestRun
    scores: pl.DataFrame
    weekly: pl.DataFrame
    strategy: dict[str, float]
    directory: Path
    predictions_path: Path
    summary_path: Path

    def summary_text(self) -> str:
        r = self.run
        p = r.predictions
        scores = self.scores.select(
            pl.col("horizon_days").alias("h"), "n", pl.col("log_mae").round(4), pl.col("persistence_log_mae").round(4),
            pl.col("median_log_ae").round(4),
            pl.col("skill").round(3), pl.col("mape").round(4), pl.col("directional_accuracy").round(3),
            pl.col("coverage").round(3), "nominal", pl.col("mean_winkler").round(4),
        ) if self.scores.height else self.scores
        lines = [
            f"Backtest of {r.league}: {p['origin_date'].n_unique()} origins "
            f"({p['origin_date'].min()} to {p['origin_date'].max()}), {len(r.currencies)} currencies, "
            f"{len(r.refits)} refits ({len(r.kept_refits)} more kept the models: too few new rows), "
            f"{r.seconds:.0f}s",
            f"Currencies: {', '.join(r.currencies)}",
            "",
            "Forecasts (log-price errors; skill > 0 beats 'no change'; coverage should match nominal):",
            markdown_table(scores) if scores.height else "(no origin has a realised price yet)",
            "",
        ]
        if p.height:
            last = p.filter(pl.col("origin_date") == p["origin_date"].max()).group_by("horizon_days").agg(
                pl.col("interval_scale").first()).sort("horizon_days")
            lines += [f"What the replay's forecasts that came true taught by {p['origin_date'].max()} (as live):",
                      *[f"  {h}d: interval x{scale:.2f}" for h, scale in last.rows()], ""]
        if self.strategy:
            s = self.strategy
            lines += [
                f"Strategy, one decision every {STRATEGY_EVERY} days at the {int(p['horizon_days'].max())}d "
                f"horizon ({int(s['decisions'])} decisions, invested in {int(s['weeks_invested'])}):",
                f"  report's advice (confident picks only): {s['report_total']:+.2%}",
                f"  forced top-{STRATEGY_TOP_K} by score, equal weights:      {s['top_k_total']:+.2%}",
                f"  equal-weight basket of all currencies:   {s['basket_total']:+.2%}",
                f"  holding chaos:                           {s['chaos_total']:+.2%}",
                "",
            ]
        if r.skipped:
            reasons = sorted({f"{s.currency} {s.horizon}d: {s.reason}" for _, s in r.skipped})
            lines += ["Not trained at some refits:", *[f"  {x}" for x in reasons[:20]], ""]
        lines += [f"Predictions: {self.predictions_path}", f"Summary:     {self.summary_path}"]
        return "\n".join(lines)


def backtest_dir(lake: Lake, league: str) -> Path:
    return lake.backtests / f"league={league}"


def write_backtest(lake: Lake, run: BacktestRun, prices: pl.DataFrame) -> BacktestOutput:
    scores = forecast_scores(run.predictions)
    weekly = strategy_returns(run, prices)
    strategy = strategy_summary(weekly)
    directory = backtest_dir(lake, run.league)
    predictions_path = write_parquet_atomic(run.predictions, directory / "predictions.parquet")
    if weekly.height:
        write_parquet_atomic(weekly, directory / "strategy.parquet")
    summary = {
        "league": run.league, "currencies": run.currencies, "refits": [str(d) for d in run.refits],
        "kept_refits": [str(d) for d in run.kept_refits],
        "origins": run.predictions["origin_date"].n_unique(), "seconds": run.seconds,
        "scores": scores.to_dicts(), "strategy": strategy,
        "skipped": [{"refit": str(d), "currency": s.currency, "horizon": s.horizon, "reason": s.reason}
                    for d, s in run.skipped],
    }
    summary_path = write_text_atomic(json.dumps(summary, indent=1, default=_json_default),
                                     directory / "summary.json")
    return BacktestOutput(run, scores, weekly, strategy, directory, predictions_path, summary_path)


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def run_backtest_cli(
    history: str | Path,
    league: str,
    refit_every: int = 7,
    profile: str = "test",
    lake_root: str | Path | None = None,
    currencies: Iterable[str] | str | None = None,
    max_origins: int | None = None,
    workers: int | None = None,
    retune_every: int = 1,
) -> str:
    """``poe-pipeline backtest``: replay, score, write under ``<lake>/backtests/league=<L>/``; returns the summary.

    ``workers``: training processes per refit (default: one per core).
    """
    if isinstance(currencies, str):
        currencies = [c.strip() for c in currencies.split(",") if c.strip()]
    history = Path(history).expanduser().resolve()
    if not history.is_dir():
        raise ValueError(f"--history {history}: no such directory; point it at a folder of poe.ninja dumps, "
                         "e.g. --history sample_data")
    get_profile(profile)  # names the choices when the profile is unknown
    prices = load_history_prices(history)
    origins = backtest_origins(prices, league, max_origins=max_origins)
    from poe_pipeline.training import default_workers

    limit_threads()
    run = run_backtest(prices, league, origins, currencies or None, refit_every, profile,
                       workers=workers or default_workers(), progress=print, retune_every=retune_every)
    output = write_backtest(Lake(resolve_lake_root(lake_root)), run, prices)
    return output.summary_text()

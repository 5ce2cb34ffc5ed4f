"""Forecasts: the predictions with calibrated intervals, and the investment report a player reads.

| definition | what it does |
| --- | --- |
| ``predictions`` | every currency x horizon, appended per origin day; the pairs without one in ``forecast_gaps`` |
| ``predictions_interval_contains_point`` | a blocking check: each interval contains its forecast, all finite |
| ``advice_outcomes`` | how past advice turned out (and ``plan_outcomes``); replays recent days that have no report |
| ``investment_report`` | what to buy, hold or sell: HTML, Markdown, CSV and a table, with its track record; alerts |
| ``forecast_job`` | the three assets with their check |
"""

import base64
import hashlib
from datetime import UTC, datetime

import dagster as dg
import polars as pl

from poe_pipeline import forecasting, quality, reporting, track_record
from poe_pipeline import monitoring as mon
from poe_pipeline.assets import column_schema, rounded, table, view_description
from poe_pipeline.features import read_features
from poe_pipeline.prices import read_daily_prices
from poe_pipeline.resources import LakeResource, MonitoringResource, RunScopeResource
from poe_pipeline.settings import HORIZONS_DAYS, Settings
from poe_pipeline.training import default_workers
from poe_pipeline.universe import read_universe


class PredictionsConfig(dg.Config):
    interval_level: float = forecasting.INTERVAL_LEVEL


class AdviceConfig(dg.Config):
    # Replay this many days before the latest forecast where no past report exists, so the track record is
    # never empty; 0 scores only the stored reports. None: POE_TRACK_RECORD_DAYS, else 14.
    backfill_days: int | None = None
    backfill_refit_every: int = track_record.BACKFILL_REFIT_EVERY


class ReportConfig(dg.Config):
    budget_chaos: float = reporting.DEFAULT_BUDGET_CHAOS
    top_k: int = reporting.TOP_K
    max_weight: float = reporting.MAX_WEIGHT  # the cap on each pick's share of the budget


def _eager_despite_missing(*ignored: str) -> dg.AutomationCondition:
    """``eager()``, except that missing partitions of ``ignored`` deps do not block: a currency partition whose model
    is not trained yet must not hold back the forecasts of every other currency."""
    return (
        (dg.AutomationCondition.newly_missing() | dg.AutomationCondition.any_deps_updated()).since_last_handled()
        & ~dg.AutomationCondition.any_deps_missing().ignore(dg.AssetSelection.assets(*ignored))
        & ~dg.AutomationCondition.any_deps_in_progress()
        & ~dg.AutomationCondition.in_progress()
    ).with_label("eager (untrained partitions do not block)")


@dg.asset(
    group_name="forecasts",
    kinds={"parquet", "duckdb"},
    deps=["global_models", "currency_models", "features", "currency_universe"],
    # after new features (daily) and after retrained models (weekly, or a degradation retrain)
    automation_condition=_eager_despite_missing("global_models", "currency_models"),
    metadata=column_schema("predictions"),
    description=view_description("predictions", "1, 3 and 7-day forecasts of every currency in the universe from its "
                                 "partition's champion (or the global champion alone for a currency without one), with "
                                 "volatility-scaled conformal intervals and a confidence score, appended per origin "
                                 "day. A pair without a forecast is listed with the reason in the view forecast_gaps."),
)
def predictions(
    context: dg.AssetExecutionContext, config: PredictionsConfig, lake: LakeResource, run_scope: RunScopeResource,
    monitoring: MonitoringResource,
) -> dg.MaterializeResult:
    store = lake.lake
    scope = run_scope.scope(store)
    currencies, left_out = scope.chosen()
    run = forecasting.predict_league(store, scope.league, currencies, level=config.interval_level)
    _alert_broken_models(context, run, lake, monitoring)
    paths = forecasting.write_predictions(store, run.predictions) if run.predictions.height else []
    gaps = forecasting.forecast_gaps(forecasting.read_predictions(store, scope.league, run.origin_date), run.skipped,
                                     read_universe(store, scope.league), currencies, scope.league, run.origin_date)
    forecasting.write_forecast_gaps(store, gaps, scope.league, run.origin_date)
    lake.publish_views(context.log)
    without = gaps.select("currency", pl.col("horizon_days").alias("h"), "liquidity_rank", "reason")
    if run.predictions.height == 0:
        raise dg.Failure(
            description=f"No forecast for {scope.league} on {run.origin_date}: "
            + ("no currency is eligible (see currency_universe)" if not currencies else
               f"{len(run.skipped)} (currency, horizon) pairs could not be forecast, e.g. {run.skipped[0].reason}"),
            metadata={"without_forecast": table(without, rows=90)})
    frame = run.predictions
    unasked = gaps.filter(pl.col("reason") == forecasting.LEFT_OUT_OF_RUN).height  # the run's currency list
    if unasked:
        context.log.info(f"{unasked} (currency, horizon) pair(s) of the league's most liquid currencies left out by "
                         "this run's currency list (view forecast_gaps)")
    if gaps.height > unasked:
        context.log.warning(f"{gaps.height - unasked} (currency, horizon) pair(s) without a forecast; the reasons "
                            "are in the warehouse view forecast_gaps and this materialization's metadata "
                            "(without_forecast)")
    global_only = frame.filter(pl.col("model_version").str.starts_with("global-"))["currency"].n_unique()
    context.log.info(f"predictions: {frame.height} rows for {scope.league} from {run.origin_date}; "
                     f"{global_only} currencies by the global model alone")
    context.log.info(f"what {scope.league}'s own forecasts taught: {_league_text(run.league_adjustments)}")
    preview = frame.select(
        "currency", pl.col("horizon_days").alias("h"), "current_price", "predicted_price", "pred_lower", "pred_upper",
        "confidence", pl.col("interval_method").alias("method"), "model_version")
    return dg.MaterializeResult(metadata={
        "league": scope.league,
        "origin_date": str(run.origin_date),
        "dagster/row_count": frame.height,
        "rows_per_horizon": dg.MetadataValue.json(
            {f"{h}d": frame.filter(pl.col("horizon_days") == h).height for h in HORIZONS_DAYS}),
        "interval_level": rounded(config.interval_level, 3),
        "league_adjustments": _league_text(run.league_adjustments),
        "currencies_by_the_global_model_alone": global_only,
        "without_forecast": table(without, rows=90) if gaps.height else "none",
        "not_eligible": left_out,
        "predictions": table(preview, rows=60),
        "path": dg.MetadataValue.path(str(paths[0].parent)),
    })


def _league_text(adjustments: dict[int, forecasting.LeagueAdjustment]) -> str:
    if not adjustments:
        return "nothing yet: no forecast of this league has come true (the models and past leagues' calibration only)"
    return "; ".join(f"{h}d from {a.resolved} forecasts come true: interval x{a.interval_scale:.2f} (from the latest "
                     f"week's {a.recent}), forecast x{a.point_shrink:.2f} (best on them x{a.best_shrink:.2f})"
                     for h, a in sorted(adjustments.items()))


def _alert_broken_models(context, run: forecasting.PredictionRun, lake: LakeResource,
                         monitoring: MonitoringResource) -> None:
    """A champion that fails to load (a damaged file, checksums that do not match) is an alert, not only a skip."""
    broken = [s for s in run.skipped if "failed to load" in s.reason]
    if not broken:
        return
    models = sorted({s.reason.split(" failed to load")[0] for s in broken})
    alert = mon.Alert(
        alert_id=f"model-load-{run.origin_date}-{hashlib.sha256(' '.join(models).encode()).hexdigest()[:12]}",
        kind="model_load_failure", severity="error",
        title=f"{len(models)} model(s) failed to load: {len(broken)} forecast(s) skipped",
        message="; ".join(sorted({s.reason for s in broken}))[:2000],
        created_at=datetime.now(UTC).isoformat(),
        details={"origin_date": str(run.origin_date), "models": models,
                 "skipped": [{"currency": s.currency, "horizon_days": s.horizon} for s in broken],
                 "hint": "retrain the models named (materialize global_models / currency_models)"},
    )
    context.log.info(monitoring.dispatch(alert, lake, context.log))


@dg.asset_check(
    asset=predictions,
    blocking=True,
    description="Every prediction interval contains its point forecast, and all three are finite prices above zero.",
)
def predictions_interval_contains_point(lake: LakeResource) -> dg.AssetCheckResult:
    frame = forecasting.read_predictions(lake.lake)
    if frame.height == 0:
        return dg.AssetCheckResult(passed=False, description="no predictions in the lake")
    bad = quality.interval_violations(frame)
    keys = ["league", "currency", "origin_date", "horizon_days", "pred_lower", "predicted_price", "pred_upper"]
    return dg.AssetCheckResult(
        passed=bad.height == 0,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"predictions": frame.height, "violations": bad.height, "examples": table(bad.select(keys))},
    )


@dg.asset(
    group_name="forecasts",
    kinds={"parquet", "duckdb"},
    deps=[predictions, "daily_prices", "global_models"],
    # after each day's forecasts; new prices and models reach it through them, and must not run it twice
    automation_condition=dg.AutomationCondition.eager().ignore(dg.AssetSelection.assets("daily_prices",
                                                                                         "global_models")),
    metadata=column_schema("advice_outcomes"),
    description=view_description("advice_outcomes", "Scores every past piece of the report's advice (buy, hold or "
                                 "sell per currency and horizon) against the price that came true, and every past "
                                 "plan against holding chaos and an equal-weight basket (view plan_outcomes). Where "
                                 "no past report exists in the last days, replays them first: the global champions "
                                 "refitted warm on only the prices known each day."),
)
def advice_outcomes(
    context: dg.AssetExecutionContext, config: AdviceConfig, lake: LakeResource, run_scope: RunScopeResource,
) -> dg.MaterializeResult:
    store = lake.lake
    scope = run_scope.scope(store)
    league = scope.league
    latest = forecasting.latest_origin(store, league)
    if latest is None:
        raise dg.Failure(f"No predictions for {league}: nothing to score (materialize predictions first)")
    prices = read_daily_prices(store)
    covered = set(track_record.league_advice(store, league)["origin_date"].unique().to_list())
    days = config.backfill_days
    if days is None:
        days = Settings.from_env(store.root).track_record_days
    days = track_record.BACKFILL_DAYS if days is None else days
    origins = track_record.backfill_origins(prices, league, latest, days, covered)
    replayed = 0
    if origins:
        tuning, missing = track_record.champion_tuning(store, HORIZONS_DAYS)
        for why in missing:
            context.log.warning(f"advice_outcomes: no replay at this horizon: {why}")
        if tuning:
            currencies, _ = scope.chosen()
            context.log.info(f"advice_outcomes: replaying {len(origins)} day(s) of {league} ({origins[0]} to "
                             f"{origins[-1]}) for {len(currencies)} currencies, refits every "
                             f"{config.backfill_refit_every} days")
            replayed = track_record.backfill_advice(
                store, league, currencies, origins, tuning, refit_every=config.backfill_refit_every,
                workers=default_workers(), progress=context.log.info)["origin_date"].n_unique()
    outcomes = track_record.score_advice(track_record.league_advice(store, league), prices)
    plans = track_record.plan_outcomes(outcomes)
    paths = track_record.write_outcomes(store, league, outcomes, plans)
    lake.publish_views(context.log)
    scored = outcomes.filter(pl.col("status") == "scored")
    summary = track_record.TrackRecord.build(outcomes, plans, league, latest).summary()
    context.log.info(f"advice_outcomes: {outcomes.height} pieces of advice, {scored.height} scored; "
                     f"{plans.filter(pl.col('status') == 'scored').height} plans scored")
    return dg.MaterializeResult(metadata={
        "league": league,
        "dagster/row_count": outcomes.height,
        "scored": scored.height,
        "days_replayed_now": replayed,
        "by_status": dg.MetadataValue.json(dict(outcomes.group_by("status").len().iter_rows())),
        "by_source": dg.MetadataValue.json(dict(outcomes.group_by("source").len().iter_rows())),
        "summary": table(summary) if summary.height else "nothing scored yet",
        "path": dg.MetadataValue.path(str(paths[0].parent.parent)),
    })


@dg.asset(
    group_name="forecasts",
    kinds={"html", "parquet", "duckdb"},
    deps=[predictions, advice_outcomes],
    automation_condition=dg.AutomationCondition.eager(),
    metadata=column_schema("investment_report"),
    description=view_description("investment_report", "Ranks currencies per horizon by expected, risk-adjusted return "
                                 "with liquidity, correlation-aware picks, a capped allocation of a chaos budget and "
                                 "rebalancing triggers; says 'no confident opportunity' when nothing beats its "
                                 "interval noise. HTML, Markdown and a table under the lake's reports/<date>/."),
)
def investment_report(
    context: dg.AssetExecutionContext, config: ReportConfig, lake: LakeResource, run_scope: RunScopeResource,
    monitoring: MonitoringResource,
) -> dg.MaterializeResult:
    store = lake.lake
    league = run_scope.scope(store).league
    origin = forecasting.latest_origin(store, league)
    if origin is None:
        raise dg.Failure(f"No predictions for {league}: nothing to report (materialize predictions first)")
    preds = forecasting.read_predictions(store, league, origin)
    features = read_features(store, [league]).select(reporting.REPORT_FEATURE_COLUMNS)
    past = track_record.TrackRecord.build(*track_record.read_outcomes(store, league), league, origin)
    try:
        report = reporting.build_report(preds, features, budget_chaos=config.budget_chaos, top_k=config.top_k,
                                        max_weight=config.max_weight, track_record=past,
                                        gaps=forecasting.read_forecast_gaps(store, league, origin))
    except ValueError as exc:
        raise dg.Failure(f"investment_report config: {exc}") from exc
    files = reporting.write_report(store, report, features)
    lake.publish_views(context.log)
    context.log.info(report.headline())
    signals = _alert_new_buys(report, lake, monitoring, context.log)
    picks = report.picks().select(
        "currency", pl.col("horizon_days").alias("h"), "current_price", "current_price_divines", "predicted_price",
        "pred_lower", "expected_return", "allocation_chaos", "allocation_divines", "units", "trust", "trigger")
    chart = next((p for p in files.charts.values() if p.suffix == ".png"), None)
    return dg.MaterializeResult(metadata={
        "league": league,
        "origin_date": str(origin),
        "status": "confident opportunity" if report.confident else reporting.NO_CONFIDENT,
        "headline": report.headline(),
        "budget_chaos": rounded(config.budget_chaos, 0),
        "divine_price_chaos": rounded(report.divine_price_chaos, 1) if report.divine_price_chaos else "none",
        "picks": table(picks) if picks.height else reporting.NO_CONFIDENT,
        "new_buy_signals": dg.MetadataValue.json(signals),
        "top_10": table(report.top(10)),
        "chart": dg.MetadataValue.md(
            f"![{chart.stem}](data:image/png;base64,{base64.b64encode(chart.read_bytes()).decode()})")
        if chart else "no chart",
        "html": dg.MetadataValue.url(files.html.resolve().as_uri()),
        "markdown": dg.MetadataValue.path(str(files.markdown)),
        "csv": dg.MetadataValue.path(str(files.csv)),
        "table": dg.MetadataValue.path(str(files.table)),
        "dagster/row_count": report.table.height,
    })


def _alert_new_buys(report: reporting.InvestmentReport, lake: LakeResource, monitoring: MonitoringResource,
                    log) -> list[str]:
    """One alert per confident buy the league's previous report did not have; the id is the signal's own, so a
    re-run stores and sends nothing new. Returns the alert ids."""
    ids = []
    for row in reporting.new_buys(lake.lake, report).iter_rows(named=True):
        title, message = reporting.buy_signal_text(row, report.interval_level)
        alert = mon.Alert(
            alert_id=f"buy-signal-{report.league}-{row['currency']}-{row['horizon_days']}d-{report.origin_date}",
            kind="buy_signal", severity="info", title=title, message=message,
            created_at=datetime.now(UTC).isoformat(),
            details={
                "league": report.league, "currency": row["currency"], "horizon_days": row["horizon_days"],
                "origin_date": str(report.origin_date), "expected_return_pct": round(row["expected_return"] * 100, 2),
                **{c: row[c] for c in ("current_price", "pred_lower", "pred_upper", "current_price_divines",
                                       "pred_lower_divines", "pred_upper_divines", "divine_price_chaos", "units",
                                       "allocation_chaos", "allocation_divines", "skill")},
                "hint": f"the report: {reporting.report_stem(lake.lake, report.league, report.origin_date)}.html",
            },
        )
        log.info(monitoring.dispatch(alert, lake, log))
        ids.append(alert.alert_id)
    return ids


forecast_job = dg.define_asset_job(
    "forecast_job", selection=[predictions, advice_outcomes, investment_report],
    description="Forecast every eligible currency from the champions, score past advice, and write the report.")

defs = dg.Definitions(assets=[predictions, advice_outcomes, investment_report],
                      asset_checks=[predictions_interval_contains_point], jobs=[forecast_job])

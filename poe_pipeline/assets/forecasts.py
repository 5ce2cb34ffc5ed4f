"""``predictions`` (forecasts with calibrated intervals) and ``investment_report`` (what to buy, sell or leave)."""

import dagster as dg
import polars as pl

from poe_pipeline import forecasting, reporting
from poe_pipeline.features import read_features
from poe_pipeline.lake import Lake
from poe_pipeline.leagues import current_league_of, league_calendar
from poe_pipeline.markdown import markdown_table
from poe_pipeline.prices import read_daily_prices
from poe_pipeline.resources import LakeResource, RunScopeResource
from poe_pipeline.settings import HORIZONS_DAYS
from poe_pipeline.universe import read_universe, restrict_universe


class PredictionsConfig(dg.Config):
    interval_level: float = forecasting.INTERVAL_LEVEL


class ReportConfig(dg.Config):
    budget_chaos: float = reporting.DEFAULT_BUDGET_CHAOS
    top_k: int = reporting.TOP_K


def _league(store: Lake, run_scope: RunScopeResource) -> str:
    return current_league_of(league_calendar(read_daily_prices(store)), run_scope.league)


@dg.asset(
    group_name="forecasts",
    kinds={"parquet", "duckdb"},
    deps=["global_models", "currency_models", "features", "currency_universe"],
    description="1, 3 and 7-day forecasts of every currency in the universe from its `champion` model, with "
    "volatility-scaled conformal intervals and a confidence score; appended per origin date under "
    "predictions/league=<L>/origin_date=<D>/. A currency without a champion gets no row; the metadata says why.",
)
def predictions(
    context: dg.AssetExecutionContext, config: PredictionsConfig, lake: LakeResource, run_scope: RunScopeResource
) -> dg.MaterializeResult:
    store = lake.lake
    league = _league(store, run_scope)
    universe, left_out = restrict_universe(read_universe(store, league), run_scope.currencies or None)
    currencies = universe["currency"].to_list()
    run = forecasting.predict_league(store, league, currencies, level=config.interval_level)
    paths = forecasting.write_predictions(store, run.predictions) if run.predictions.height else []
    lake.publish_views(context.log)
    for skip in run.skipped:
        context.log.warning(f"{skip.currency} {skip.horizon}d: no prediction: {skip.reason}")
    frame = run.predictions
    per_horizon = {f"{h}d": frame.filter(pl.col("horizon_days") == h).height for h in HORIZONS_DAYS}
    preview = frame.select(
        "currency", pl.col("horizon_days").alias("h"), "current_price", "predicted_price", "pred_lower",
        "pred_upper", pl.col("confidence").round(3), pl.col("interval_method").alias("method"), "model_version",
    )
    context.log.info(f"predictions: {frame.height} rows for {league} from {run.origin_date}; "
                     f"{len(run.skipped)} (currency, horizon) without a prediction")
    return dg.MaterializeResult(
        metadata={
            "league": league,
            "origin_date": str(run.origin_date),
            "dagster/row_count": frame.height,
            "rows_per_horizon": dg.MetadataValue.json(per_horizon),
            "interval_level": config.interval_level,
            "interval_methods": dg.MetadataValue.json(
                dict(frame.group_by("interval_method").len().iter_rows()) if frame.height else {}),
            "without_champion": dg.MetadataValue.md(
                markdown_table(run.skipped_frame()) if run.skipped else "Every currency has a champion."),
            "not_in_universe": left_out,
            "predictions": dg.MetadataValue.md(markdown_table(preview.head(60)) if frame.height else "No rows."),
            "path": dg.MetadataValue.path(str(paths[0]) if paths else str(forecasting.predictions_dir(store))),
        }
    )


@dg.asset(
    group_name="forecasts",
    kinds={"html", "parquet", "duckdb"},
    deps=[predictions],
    automation_condition=dg.AutomationCondition.eager(),
    description="Ranks currencies per horizon by expected, risk-adjusted return with liquidity, correlation-aware "
    "picks, a capped allocation of a chaos budget and rebalancing triggers; says 'no confident opportunity' "
    "when nothing beats its interval noise. HTML and Markdown under reports/<date>/, a table in DuckDB.",
)
def investment_report(
    context: dg.AssetExecutionContext, config: ReportConfig, lake: LakeResource, run_scope: RunScopeResource
) -> dg.MaterializeResult:
    store = lake.lake
    league = _league(store, run_scope)
    origin = forecasting.latest_origin(store, league)
    if origin is None:
        context.log.warning(f"No predictions for {league}: nothing to report (see the predictions asset's metadata)")
        return dg.MaterializeResult(metadata={"league": league, "status": f"no predictions for {league}"})
    preds = forecasting.read_predictions(store, league, origin)
    features = read_features(store, [league]).select(reporting.REPORT_FEATURE_COLUMNS)
    report = reporting.build_report(preds, features, budget_chaos=config.budget_chaos, top_k=config.top_k)
    files = reporting.write_report(store, report, features)
    lake.publish_views(context.log)
    context.log.info(report.headline())
    picks = report.picks().select(
        "currency", pl.col("horizon_days").alias("h"), "current_price", "predicted_price", "pred_lower",
        "allocation_chaos", "units", "trigger",
    )
    return dg.MaterializeResult(
        metadata={
            "league": league,
            "origin_date": str(origin),
            "status": "confident opportunity" if report.confident else reporting.NO_CONFIDENT,
            "headline": report.headline(),
            "budget_chaos": config.budget_chaos,
            "top_10": dg.MetadataValue.md(markdown_table(report.top(10))),
            "picks": dg.MetadataValue.md(markdown_table(picks) if picks.height else reporting.NO_CONFIDENT),
            "html": dg.MetadataValue.path(str(files.html)),
            "markdown": dg.MetadataValue.path(str(files.markdown)),
            "table": dg.MetadataValue.path(str(files.table)),
            "dagster/row_count": report.table.height,
        }
    )

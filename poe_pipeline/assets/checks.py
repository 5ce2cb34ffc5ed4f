"""Asset checks: the data contracts of daily_prices, features and predictions, checked on what is in the lake.

The rules are in ``poe_pipeline.quality``. Blocking checks stop downstream assets of the same run when they fail.
``checks_for(asset_names)`` returns the checks whose asset is in the graph, so the predictions check only exists once
the predictions asset does.
"""

import os

import dagster as dg
import polars as pl

from poe_pipeline import quality
from poe_pipeline.leagues import current_league_of, league_calendar
from poe_pipeline.markdown import markdown_table
from poe_pipeline.prices import read_daily_prices
from poe_pipeline.resources import LakeResource, RunScopeResource

SHOWN_ROWS = 20
FEATURE_CHECK_SAMPLES = 3


def _table(frame: pl.DataFrame) -> dg.MetadataValue:
    shown = frame.head(SHOWN_ROWS).with_columns(pl.col(pl.Date, pl.Datetime).cast(pl.Utf8))
    return dg.MetadataValue.md(markdown_table(shown) if shown.height else "none")


@dg.asset_check(
    asset="daily_prices",
    blocking=True,
    description="Every stored price is a finite number above zero.",
)
def daily_prices_positive_finite(lake: LakeResource) -> dg.AssetCheckResult:
    prices = read_daily_prices(lake.lake)
    bad = quality.invalid_prices(prices)
    return dg.AssetCheckResult(
        passed=bad.height == 0 and prices.height > 0,
        severity=dg.AssetCheckSeverity.ERROR,
        description=None if prices.height else "daily_prices is empty",
        metadata={"rows": prices.height, "invalid_rows": bad.height, "examples": _table(bad)},
    )


@dg.asset_check(
    asset="daily_prices",
    blocking=True,
    description="One row per (league, currency, date).",
)
def daily_prices_unique_keys(lake: LakeResource) -> dg.AssetCheckResult:
    duplicates = quality.duplicate_keys(read_daily_prices(lake.lake))
    return dg.AssetCheckResult(
        passed=duplicates.height == 0,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"duplicated_keys": duplicates.height, "examples": _table(duplicates)},
    )


def jump_factor() -> float:
    return float(os.environ.get("POE_JUMP_FACTOR") or quality.DEFAULT_JUMP_FACTOR)


@dg.asset_check(
    asset="daily_prices",
    blocking=False,
    description="Flags day-over-day moves of a close by more than POE_JUMP_FACTOR (default 3x, up or down) in the "
    "last 7 days of the current league. A warning, not a block: a real market can move like that, a glitch too.",
)
def daily_prices_day_over_day_jumps(lake: LakeResource, run_scope: RunScopeResource) -> dg.AssetCheckResult:
    prices = read_daily_prices(lake.lake)
    if prices.height == 0:
        return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.WARN, description="no prices")
    factor = jump_factor()
    league = current_league_of(league_calendar(prices), run_scope.league)
    recent = quality.day_over_day_jumps(prices, factor, quality.DEFAULT_JUMP_WINDOW_DAYS, leagues=[league])
    return dg.AssetCheckResult(
        passed=recent.height == 0,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"{recent.height} close(s) of {league} moved more than {factor:g}x from the day before in its "
        f"last {quality.DEFAULT_JUMP_WINDOW_DAYS} days",
        metadata={
            "league": league,
            "jump_factor": factor,
            "recent_jumps": recent.height,
            "jumps_in_all_history": quality.day_over_day_jumps(prices, factor).height,
            "largest_recent_jumps": _table(recent),
        },
    )


@dg.asset_check(
    asset="features",
    blocking=True,
    description="The leak test's invariant on a sample: for a few (league, cutoff) pairs, the features up to the "
    "cutoff are rebuilt without the later days and must be identical.",
)
def features_no_lookahead(context: dg.AssetCheckExecutionContext, lake: LakeResource) -> dg.AssetCheckResult:
    prices = read_daily_prices(lake.lake)
    # a new sample every run: over time the check covers many cutoffs; a failure names its pair to reproduce it
    seed = int(context.run.run_id.replace("-", "")[:8], 16) if context.run else 0
    pairs = quality.sample_cutoffs(prices, FEATURE_CHECK_SAMPLES, seed=seed)
    failures = [d for league, cutoff in pairs if (d := quality.lookahead_difference(prices, league, cutoff))]
    return dg.AssetCheckResult(
        passed=bool(pairs) and not failures,
        severity=dg.AssetCheckSeverity.ERROR,
        description="; ".join(failures) if failures else None if pairs else "no league with two days of data",
        metadata={"checked": [f"{league} cut at {cutoff}" for league, cutoff in pairs], "failures": failures},
    )


def read_predictions(lake) -> pl.DataFrame:
    files = lake.parquet_files(lake.root / "predictions")
    return pl.read_parquet(files, hive_partitioning=False) if files else pl.DataFrame()


@dg.asset_check(
    asset="predictions",
    blocking=True,
    description="Every prediction interval contains its point forecast, and all three are finite prices above zero.",
)
def predictions_interval_contains_point(lake: LakeResource) -> dg.AssetCheckResult:
    predictions = read_predictions(lake.lake)
    if predictions.height == 0:
        return dg.AssetCheckResult(passed=False, description="no predictions under <lake>/predictions")
    bad = quality.interval_violations(predictions)
    keys = [c for c in ("league", "currency", "origin_date", "horizon_days", "pred_lower", "predicted_price",
                        "pred_upper") if c in bad.columns]
    return dg.AssetCheckResult(
        passed=bad.height == 0,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"predictions": predictions.height, "violations": bad.height, "examples": _table(bad.select(keys))},
    )


ALL_CHECKS = [
    daily_prices_positive_finite,
    daily_prices_unique_keys,
    daily_prices_day_over_day_jumps,
    features_no_lookahead,
    predictions_interval_contains_point,
]


def checks_for(asset_names: set[str]) -> list[dg.AssetChecksDefinition]:
    """The checks whose asset exists in the graph."""
    return [c for c in ALL_CHECKS if all(k.asset_key.to_user_string() in asset_names for k in c.check_keys)]

"""Prices: poe.ninja league dumps imported into the lake, and one clean daily price per (league, currency).

| definition | what it does |
| --- | --- |
| ``historical_prices`` | imports dumps; quirky rows quarantined, structurally bad files rejected by file and line |
| ``daily_prices`` | dumps merged with the daily close of the live snapshots; refreshed daily after 00:10 UTC |
| checks of ``daily_prices`` | finite positive prices and unique keys (blocking); day-over-day jumps (a warning) |
| ``prices_job`` | both assets with their checks |
"""

import dagster as dg
import polars as pl

from poe_pipeline import quality
from poe_pipeline.assets import column_schema, rounded, table, view_description
from poe_pipeline.history import find_dumps, import_dumps
from poe_pipeline.prices import read_daily_prices, refresh_daily_prices
from poe_pipeline.resources import LakeResource, MonitoringResource, RunScopeResource

DAILY_REFRESH_CRON = "10 0 * * *"  # 00:10 UTC: yesterday's last poll (23:55) is in, and the 00:10 poll follows


@dg.asset(
    group_name="prices",
    kinds={"parquet", "python"},
    metadata=column_schema("historical_prices"),
    description=view_description("historical_prices", "Imports every poe.ninja dump (<League>.currency.csv[.gz]) "
                                 "from the history folders and the lake's inbox (the inbox wins over another dump of "
                                 "the same league). A file imported before is skipped by its hash; a different dump of "
                                 "a league replaces the earlier import. Quirky rows (a Value of 0, an absurd value, a "
                                 "duplicate, a future date) are quarantined and the rest imported; a structurally bad "
                                 "file is rejected by file and line, the others still import, and the run fails."),
)
def historical_prices(
    context: dg.AssetExecutionContext, lake: LakeResource, run_scope: RunScopeResource
) -> dg.MaterializeResult:
    store = lake.lake
    dirs = [*run_scope.scope(store).history_dirs, store.inbox]
    report = import_dumps(store, find_dumps(dirs), progress=context.log.info)
    lake.publish_views(context.log)
    if report.quarantined:
        context.log.warning(
            f"Quarantined {report.quarantined_rows} quirky dump row(s) with their reasons (the warehouse's "
            "`quarantine` view, source 'poe_ninja_dump'): "
            + ", ".join(f"{name}: {n}" for name, n in report.quarantined.items()))
    metadata = {
        "searched": [str(d) for d in dirs],
        "imported": report.imported,
        "already_imported": len(report.already_imported),
        "replaced": dg.MetadataValue.json(report.replaced),
        "rows_imported": report.rows_imported,
        "rows_quarantined": report.quarantined_rows,
        "quarantined_per_file": dg.MetadataValue.json(report.quarantined),
        "leagues": sorted(report.leagues),
    }
    if report.rejected:
        raise dg.Failure(
            description="Rejected malformed dumps (the other files were imported; nothing already stored was "
            "changed): " + "; ".join(report.rejected.values()),
            metadata={**metadata, "rejected": dg.MetadataValue.json(report.rejected)},
        )
    return dg.MaterializeResult(metadata=metadata)


@dg.asset(
    group_name="prices",
    kinds={"parquet", "duckdb"},
    deps=[historical_prices, "price_snapshots"],
    metadata=column_schema("daily_prices"),
    # daily, once a poll of the new day has landed; imports of history dumps are not awaited
    automation_condition=dg.AutomationCondition.on_cron(DAILY_REFRESH_CRON).ignore(
        dg.AssetSelection.assets("historical_prices")),
    description=view_description("daily_prices", "One daily chaos price per (league, currency) with provenance: "
                                 "poe.ninja dumps merged with the daily close (the last poll of the UTC day) of the "
                                 "live snapshots. Refreshed each day after 00:10 UTC by the daily_refresh sensor."),
)
def daily_prices(context: dg.AssetExecutionContext, lake: LakeResource) -> dg.MaterializeResult:
    store = lake.lake
    written = refresh_daily_prices(store)
    lake.publish_views(context.log)
    prices = read_daily_prices(store)
    if prices.height == 0:
        raise dg.Failure("daily_prices is empty: import poe.ninja dumps (historical_prices) or ingest snapshots first")
    summary = (
        prices.group_by("league")
        .agg(pl.col("date").min().alias("first_day"), pl.col("date").max().alias("last_day"),
             pl.col("currency").n_unique().alias("currencies"), pl.len().alias("rows"),
             pl.col("price_chaos").filter(pl.col("currency") == "Divine Orb").last().round(1).alias("divine_close"))
        .sort("first_day", descending=True)
    )
    context.log.info(f"daily_prices: {prices.height:,} rows; rewrote {len(written)} league(s)")
    return dg.MaterializeResult(metadata={
        "dagster/row_count": prices.height,
        "leagues_rewritten": sorted(written),
        "sources": dg.MetadataValue.json(prices["source"].value_counts().to_dicts()),
        "leagues": table(summary, rows=40),
    })


@dg.asset_check(asset=daily_prices, blocking=True, description="Every stored price is a finite number above zero.")
def daily_prices_positive_finite(lake: LakeResource) -> dg.AssetCheckResult:
    prices = read_daily_prices(lake.lake)
    bad = quality.invalid_prices(prices)
    return dg.AssetCheckResult(
        passed=bad.height == 0 and prices.height > 0,
        severity=dg.AssetCheckSeverity.ERROR,
        description=None if prices.height else "daily_prices is empty",
        metadata={"rows": prices.height, "invalid_rows": bad.height, "examples": table(bad)},
    )


@dg.asset_check(asset=daily_prices, blocking=True, description="One row per (league, currency, date).")
def daily_prices_unique_keys(lake: LakeResource) -> dg.AssetCheckResult:
    duplicates = quality.duplicate_keys(read_daily_prices(lake.lake))
    return dg.AssetCheckResult(
        passed=duplicates.height == 0,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"duplicated_keys": duplicates.height, "examples": table(duplicates)},
    )


@dg.asset_check(
    asset=daily_prices,
    blocking=False,
    description="Flags day-over-day moves of a close by more than POE_JUMP_FACTOR (default 3x, up or down) in the "
    "last 7 days of the current league. A warning, not a block: a real market can move like that, a glitch too.",
)
def daily_prices_day_over_day_jumps(
    lake: LakeResource, run_scope: RunScopeResource, monitoring: MonitoringResource
) -> dg.AssetCheckResult:
    store = lake.lake
    prices = read_daily_prices(store)
    if prices.height == 0:
        return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.WARN, description="no prices")
    factor = monitoring.jump_factor or quality.DEFAULT_JUMP_FACTOR
    league = run_scope.scope(store).league
    recent = quality.day_over_day_jumps(prices, factor, quality.DEFAULT_JUMP_WINDOW_DAYS, leagues=[league])
    return dg.AssetCheckResult(
        passed=recent.height == 0,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"{recent.height} close(s) of {league} moved more than {factor:g}x from the day before in its "
        f"last {quality.DEFAULT_JUMP_WINDOW_DAYS} days",
        metadata={
            "league": league, "jump_factor": rounded(factor),
            "recent_jumps": recent.height,
            "jumps_in_all_history": quality.day_over_day_jumps(prices, factor).height,
            "largest_recent_jumps": table(recent),
        },
    )


prices_job = dg.define_asset_job(
    "prices_job", selection=[historical_prices, daily_prices],
    description="Import the poe.ninja dumps and rebuild daily_prices, with their checks.")

defs = dg.Definitions(
    assets=[historical_prices, daily_prices],
    asset_checks=[daily_prices_positive_finite, daily_prices_unique_keys, daily_prices_day_over_day_jumps],
    jobs=[prices_job],
)

"""``historical_prices`` (poe.ninja dumps) and ``daily_prices`` (the clean daily series)."""


from pathlib import Path

import dagster as dg
import polars as pl

from poe_pipeline.history import find_dumps, import_dumps
from poe_pipeline.markdown import markdown_table
from poe_pipeline.prices import read_daily_prices, refresh_daily_prices
from poe_pipeline.resources import LakeResource, RunScopeResource


@dg.asset(
    group_name="history",
    kinds={"parquet", "python"},
    description="Imports every poe.ninja dump (<League>.currency.csv[.gz]) from the configured history directories "
    "and the lake's inbox (a dump in the inbox wins over one of the same league elsewhere). Idempotent: a file "
    "already imported is skipped by its hash; a different dump of a league replaces the earlier import. Quirky "
    "rows (a Value of 0, an absurd value, a duplicate, a future date) are quarantined and the rest imported; a "
    "structurally bad file is rejected by file and line, the others still import, and the run fails.",
)
def historical_prices(
    context: dg.AssetExecutionContext, lake: LakeResource, run_scope: RunScopeResource
) -> dg.MaterializeResult:
    store = lake.lake
    dirs = [*(Path(d) for d in run_scope.history_dirs), store.inbox]
    dumps = find_dumps(dirs)
    report = import_dumps(store, dumps, progress=context.log.info)
    lake.publish_views(context.log)
    if report.quarantined:
        context.log.warning(
            f"Quarantined {report.quarantined_rows} quirky dump row(s) with their reasons (the warehouse's "
            f"`quarantine` view, source 'poe_ninja_dump'): "
            + ", ".join(f"{name}: {n}" for name, n in report.quarantined.items())
        )
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
    description="One daily chaos price per (league, currency) with provenance: poe.ninja dumps merged with "
    "the daily close of the live poe.watch snapshots.",
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
        .agg(
            pl.col("date").min().alias("first_day"),
            pl.col("date").max().alias("last_day"),
            pl.col("currency").n_unique().alias("currencies"),
            pl.len().alias("rows"),
            pl.col("price_chaos").filter(pl.col("currency") == "Divine Orb").last().round(1).alias("divine_close"),
        )
        .sort("first_day", descending=True)
    )
    context.log.info(f"daily_prices: {prices.height:,} rows; rewrote {len(written)} league(s)")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": prices.height,
            "leagues_rewritten": sorted(written),
            "sources": dg.MetadataValue.json(prices["source"].value_counts().to_dicts()),
            "leagues": dg.MetadataValue.md(markdown_table(summary)),
        }
    )


"""``daily_prices``: one clean daily chaos price per (league, currency), with provenance.

History (poe.ninja dumps) and live poe.watch snapshots are merged. Snapshots are
reduced to a daily close, the last poll of the UTC day. Where both sources have
the same day, the dump wins: it is poe.ninja's own end-of-day figure.

The files are derived: one that cannot be read (cut short, overwritten) is rewritten by the next refresh.
"""

from __future__ import annotations

import logging

import polars as pl

from poe_pipeline.lake import read_parquet_files
from poe_pipeline.sources.poe_ninja import chaos_prices_from_dump_rows

SOURCE_DUMP = "poe_ninja_dump"
SOURCE_POE_WATCH = "poe_watch"
_SOURCE_PRIORITY = {SOURCE_DUMP: 0, SOURCE_POE_WATCH: 1}
REBUILD_HINT = "materialize daily_prices again: refresh_daily_prices rewrites it from the raw data"

log = logging.getLogger(__name__)

# The public contract (the warehouse's daily_prices view); extra columns follow these.
DAILY_PRICES_SCHEMA: dict[str, pl.DataType] = {
    "league": pl.Utf8,
    "currency": pl.Utf8,
    "date": pl.Date,
    "price_chaos": pl.Float64,
    "confidence": pl.Utf8,
    "volume": pl.Int64,
    "source": pl.Utf8,
    "reverse_price_chaos": pl.Float64,
    "observations": pl.Int32,
}


def daily_from_dump_rows(rows: pl.DataFrame) -> pl.DataFrame:
    prices = chaos_prices_from_dump_rows(rows)
    return prices.select(
        "league", "currency", "date", "price_chaos", "confidence",
        pl.lit(None, dtype=pl.Int64).alias("volume"),
        pl.lit(SOURCE_DUMP).alias("source"),
        "reverse_price_chaos",
        pl.lit(1, dtype=pl.Int32).alias("observations"),
    )


def daily_close_from_snapshots(snapshots: pl.DataFrame) -> pl.DataFrame:
    """The last poll of each UTC day per (league, currency): its mean price, listings and confidence."""
    if snapshots.height == 0:
        return pl.DataFrame(schema=DAILY_PRICES_SCHEMA)
    return (
        snapshots.with_columns(pl.col("polled_at").dt.convert_time_zone("UTC").dt.date().alias("date"))
        .sort("polled_at")
        .group_by("league", "currency", "date")
        .agg(
            pl.col("mean").last().alias("price_chaos"),
            pl.when(pl.col("low_confidence").last()).then(pl.lit("Low")).otherwise(pl.lit("High"))
            .alias("confidence"),
            pl.col("daily").last().cast(pl.Int64).alias("volume"),
            pl.len().cast(pl.Int32).alias("observations"),
        )
        .with_columns(
            pl.lit(SOURCE_POE_WATCH).alias("source"),
            pl.lit(None, dtype=pl.Float64).alias("reverse_price_chaos"),
        )
        .select(list(DAILY_PRICES_SCHEMA))
    )


def merge_daily_prices(*frames: pl.DataFrame) -> pl.DataFrame:
    """Merge daily series from several sources: one row per key, best source first, non-positive prices out."""
    stacked = pl.concat([f.select(list(DAILY_PRICES_SCHEMA)).cast(DAILY_PRICES_SCHEMA) for f in frames])
    return (
        stacked.filter(pl.col("price_chaos").is_finite() & (pl.col("price_chaos") > 0))
        .with_columns(pl.col("source").replace_strict(_SOURCE_PRIORITY, default=9).alias("_priority"))
        .sort("league", "currency", "date", "_priority")
        .unique(subset=["league", "currency", "date"], keep="first", maintain_order=True)
        .drop("_priority")
    )


def daily_prices_path(lake, league: str):
    return lake.league_path(lake.daily_prices, league, "part.parquet")


def read_daily_prices(lake, leagues=None) -> pl.DataFrame:
    """The stored daily prices. A file that cannot be read raises ``UnreadableFileError`` naming it."""
    files = [
        p for p in lake.parquet_files(lake.daily_prices)
        if leagues is None or p.parent.name.removeprefix("league=") in set(leagues)
    ]
    if not files:
        return pl.DataFrame(schema=DAILY_PRICES_SCHEMA)
    return read_parquet_files(files, REBUILD_HINT, hive_partitioning=False)


def _stored_equals(path, rows: pl.DataFrame) -> bool:
    """The file at ``path`` holds exactly ``rows``. An unreadable file holds nothing: it gets rewritten."""
    if not path.exists():
        return False
    try:
        return pl.read_parquet(path).equals(rows)
    except (pl.exceptions.PolarsError, OSError) as exc:
        log.warning("%s cannot be read (%s); rewriting it from the raw data", path, exc)
        return False


def refresh_daily_prices(lake) -> dict[str, int]:
    """Rebuild ``daily_prices`` from the raw data; rewrite only the leagues whose rows changed.

    Returns ``{league: rows}`` for the leagues written.
    """
    from poe_pipeline.history import read_history
    from poe_pipeline.ingestion import read_snapshots
    from poe_pipeline.lake import write_parquet_atomic

    merged = merge_daily_prices(
        daily_from_dump_rows(read_history(lake)), daily_close_from_snapshots(read_snapshots(lake))
    )
    written: dict[str, int] = {}
    for (league,), rows in merged.partition_by("league", as_dict=True, maintain_order=True).items():
        path = daily_prices_path(lake, league)
        if _stored_equals(path, rows):
            continue
        write_parquet_atomic(rows, path)
        written[league] = rows.height
    return written


def target_day() -> pl.Expr:
    """The day a forecast is for: ``origin_date + horizon_days``."""
    return (pl.col("origin_date") + pl.duration(days=pl.col("horizon_days"))).cast(pl.Date)


def actual_prices(prices: pl.DataFrame, predictions: pl.DataFrame, exact: bool = True) -> pl.Series:
    """The price on ``origin + horizon`` of each prediction: observed that day (``exact``), or else the last one
    observed before it (null when that day lies beyond the league's data)."""
    target = predictions.select(
        pl.int_range(pl.len()).alias("_i"), "league", "currency", target_day().alias("_target"),
    )
    known = prices.select("league", "currency", pl.col("date").alias("_target"), pl.col("price_chaos").alias("_p"))
    if exact:
        joined = target.join(known, on=["league", "currency", "_target"], how="left")
    else:
        last = prices.group_by("league").agg(pl.col("date").max().alias("_last"))
        joined = (
            target.sort("_target")
            .join_asof(known.sort("_target"), on="_target", by=["league", "currency"], strategy="backward",
                       check_sortedness=False)
            .join(last, on="league", how="left")
            .with_columns(pl.when(pl.col("_target") <= pl.col("_last")).then(pl.col("_p")).alias("_p"))
        )
    return joined.sort("_i")["_p"].alias("actual_price")

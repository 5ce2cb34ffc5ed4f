"""Data-quality rules behind the asset checks: plain Polars, no Dagster.

Each rule returns the offending rows (an empty frame means the rule holds), so a check can both decide and show
the evidence.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from datetime import date, timedelta

import polars as pl

from poe_pipeline.features import FEATURE_COLUMNS, KEYS, build_league_features
from poe_pipeline.leagues import league_calendar

DAILY_KEYS = ["league", "currency", "date"]
DEFAULT_JUMP_FACTOR = 3.0  # a day-over-day move to more than 3x, or less than a third, of the previous close
DEFAULT_JUMP_WINDOW_DAYS = 7

BuildFn = Callable[[pl.DataFrame, pl.DataFrame, str], pl.DataFrame]


def invalid_prices(prices: pl.DataFrame) -> pl.DataFrame:
    """Rows whose ``price_chaos`` is null, NaN, infinite, zero or negative."""
    price = pl.col("price_chaos")
    return prices.filter(price.is_null() | ~price.is_finite() | (price <= 0))


def duplicate_keys(prices: pl.DataFrame, keys: list[str] = DAILY_KEYS) -> pl.DataFrame:
    """One row per (league, currency, date) that occurs more than once, with its count."""
    return prices.group_by(keys).len("rows").filter(pl.col("rows") > 1).sort(keys)


def day_over_day_jumps(
    prices: pl.DataFrame, factor: float = DEFAULT_JUMP_FACTOR, window_days: int | None = None,
    leagues: list[str] | None = None,
) -> pl.DataFrame:
    """Consecutive-day moves of a currency's close by more than ``factor`` (up or down).

    ``leagues`` limits the search to those leagues; ``window_days`` keeps only jumps within the last ``window_days``
    days of their league (its newest date counts as day 1). Sorted by the size of the move, largest first;
    ``ratio`` is today's close over yesterday's.
    """
    if factor <= 1:
        raise ValueError(f"jump factor must be above 1 (e.g. 3 for a tripling), got {factor}")
    limit = math.log(factor)
    by_series = ["league", "currency"]
    if leagues is not None:
        prices = prices.filter(pl.col("league").is_in(leagues))
    moves = (
        prices.filter(pl.col("price_chaos").is_finite() & (pl.col("price_chaos") > 0))
        .sort([*by_series, "date"])
        .with_columns(
            pl.col("price_chaos").shift(1).over(by_series).alias("previous_close"),
            pl.col("date").shift(1).over(by_series).alias("previous_date"),
            pl.col("date").max().over("league").alias("_league_last"),
        )
        .filter((pl.col("date") - pl.col("previous_date")).dt.total_days() == 1)
        .with_columns((pl.col("price_chaos") / pl.col("previous_close")).alias("ratio"))
        .filter(pl.col("ratio").log().abs() > limit)
    )
    if window_days is not None:
        moves = moves.filter(pl.col("date") > pl.col("_league_last") - timedelta(days=window_days))
    return (
        moves.sort(pl.col("ratio").log().abs(), descending=True)
        .select("league", "currency", "previous_date", "previous_close", "date", "price_chaos", "ratio",
                "confidence")
    )


def sample_cutoffs(prices: pl.DataFrame, samples: int = 3, seed: int = 0) -> list[tuple[str, date]]:
    """``samples`` (league, cutoff day) pairs to re-check for look-ahead: the newest league first, then others.

    Cutoffs are drawn, with a fixed seed, from days that have data and leave later days in the league (a cutoff on
    the last day proves nothing). The choice depends only on the data and the seed, so a failure reproduces.
    """
    rng = random.Random(seed)
    days = prices.select("league", "date").unique().sort("league", "date")
    per_league = {
        league: frame["date"].to_list()[:-1]
        for (league,), frame in days.partition_by("league", as_dict=True).items()
    }
    candidates = [lg for lg, dates in per_league.items() if dates]
    if not candidates:
        return []
    calendar = league_calendar(prices).sort("start_date", descending=True)
    order = [lg for lg in calendar["league"] if lg in candidates]
    chosen = [order[0], *rng.sample(order[1:], min(len(order) - 1, max(samples - 1, 0)))]
    while len(chosen) < samples:
        chosen.append(order[0])  # fewer leagues than samples: more cutoffs in the newest one
    return [(league, rng.choice(per_league[league])) for league in chosen[:samples]]


def lookahead_difference(
    prices: pl.DataFrame, league: str, cutoff: date, build: BuildFn = build_league_features
) -> str | None:
    """The leak test's invariant: ``league``'s feature rows up to ``cutoff`` are the same whether or not its later
    rows exist. Returns None when they are, else a description of the first difference.

    ``build(prices, calendar, league)`` builds one league's features; they depend on that league's prices and
    calendar row and on the earlier leagues' prices (the league-phase drift), which the cut leaves as they are, so
    only this league is rebuilt (twice).
    """
    kept = (pl.col("league") != league) | (pl.col("date") <= cutoff)
    truncated = prices.filter(kept)
    columns = [*KEYS, *FEATURE_COLUMNS]
    full = build(prices, league_calendar(prices), league).filter(pl.col("date") <= cutoff).select(columns).sort(KEYS)
    part = build(truncated, league_calendar(truncated), league).select(columns).sort(KEYS)
    if full.height != part.height:
        return f"{league} cut at {cutoff}: {part.height} feature rows without the future, {full.height} with it"
    if part.equals(full):
        return None
    for column in columns:
        differs = ~part[column].eq_missing(full[column])
        if differs.any():
            row = part.filter(differs).row(0, named=True)
            other = full.filter(differs).row(0, named=True)
            return (
                f"{league} cut at {cutoff}: feature {column!r} of {row['currency']} on {row['date']} is "
                f"{row[column]!r} without the later days but {other[column]!r} with them (look-ahead)"
            )
    return f"{league} cut at {cutoff}: the feature frames differ"


def interval_violations(predictions: pl.DataFrame) -> pl.DataFrame:
    """Predictions whose interval does not contain the point forecast, or whose prices are not finite/positive."""
    point, low, high = pl.col("predicted_price"), pl.col("pred_lower"), pl.col("pred_upper")
    finite = point.is_finite() & low.is_finite() & high.is_finite()
    return predictions.filter(
        point.is_null() | low.is_null() | high.is_null() | ~finite | (point <= 0) | (low > point) | (point > high)
    )

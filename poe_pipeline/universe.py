"""The currency universe: which currencies of the current league have enough data to model.

A currency seen in the current league is eligible when all of these hold (thresholds from the ``Profile``):

- it had at least ``universe_min_days_per_league`` observed days in at least ``universe_min_past_leagues``
  past challenge leagues (event leagues do not count; "past" means started before the current league);
- it has at least ``universe_min_current_days`` observed days in the current league;
- over the last ``universe_recent_days`` days of the current league (ending on its latest observed day), it
  was observed with High or Medium confidence on at least ``universe_min_good_confidence_share`` of the days
  (a day without an observation counts as not good);
- its median price over those days is at least ``universe_min_price_chaos`` chaos.

Chaos Orb, the unit every price is quoted in, is never eligible.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path

import polars as pl

from poe_pipeline.lake import Lake, hive_dir, write_parquet_atomic
from poe_pipeline.names import canonical_currency_name
from poe_pipeline.settings import Profile

CHAOS = "Chaos Orb"
GOOD_CONFIDENCE = ("High", "Medium")
UNIVERSE_SCHEMA = {
    "currency": pl.Utf8,
    "eligible": pl.Boolean,
    "reason": pl.Utf8,
    "past_leagues_with_enough_days": pl.UInt32,
    "current_days": pl.UInt32,
    "good_confidence_share": pl.Float64,
    "median_price_chaos": pl.Float64,
}


def currency_universe(
    daily_prices: pl.DataFrame, calendar: pl.DataFrame, current_league: str, profile: Profile
) -> pl.DataFrame:
    """One row per currency seen in ``current_league``: eligibility, the reason, and the numbers behind it."""
    if current_league not in set(calendar["league"]):
        known = ", ".join(calendar.sort("start_date")["league"])
        raise ValueError(f"Unknown league {current_league!r}: known leagues are {known}")
    start = calendar.filter(pl.col("league") == current_league)["start_date"].item()
    past = calendar.filter((pl.col("start_date") < start) & ~pl.col("is_event"))["league"]

    past_counts = (
        daily_prices.filter(pl.col("league").is_in(past))
        .group_by("league", "currency")
        .len()
        .filter(pl.col("len") >= profile.universe_min_days_per_league)
        .group_by("currency")
        .agg(pl.len().alias("past_leagues_with_enough_days"))
    )
    current = daily_prices.filter(pl.col("league") == current_league)
    if current.height == 0:
        return pl.DataFrame(schema=UNIVERSE_SCHEMA)
    # the recent window ends on the league's latest day; a league younger than the window uses all its days
    as_of = current["date"].max()
    recent_days = min(profile.universe_recent_days, (as_of - current["date"].min()).days + 1)
    recent = current.filter(pl.col("date") > as_of - timedelta(days=recent_days))
    stats = (
        current.group_by("currency")
        .agg(pl.len().alias("current_days"))
        .join(
            recent.group_by("currency").agg(
                (pl.col("confidence").is_in(GOOD_CONFIDENCE).sum() / recent_days).alias(
                    "good_confidence_share"
                ),
                pl.col("price_chaos").median().alias("median_price_chaos"),
            ),
            on="currency",
            how="left",
        )
        .join(past_counts, on="currency", how="left")
        .with_columns(
            pl.col("past_leagues_with_enough_days").fill_null(0),
            pl.col("good_confidence_share").fill_null(0.0),
        )
    )
    p = profile
    checks = [
        (pl.col("currency") == CHAOS, pl.lit("Chaos Orb is the unit prices are quoted in")),
        (
            pl.col("current_days") < p.universe_min_current_days,
            pl.format(
                "{} days in {} (needs {})",
                "current_days",
                pl.lit(current_league),
                pl.lit(p.universe_min_current_days),
            ),
        ),
        (
            pl.col("past_leagues_with_enough_days") < p.universe_min_past_leagues,
            pl.format(
                "{} past league(s) with {}+ days (needs {})",
                "past_leagues_with_enough_days",
                pl.lit(p.universe_min_days_per_league),
                pl.lit(p.universe_min_past_leagues),
            ),
        ),
        (
            pl.col("good_confidence_share") < p.universe_min_good_confidence_share,
            pl.format(
                "High/Medium confidence on {} of the last {} days (needs {})",
                pl.col("good_confidence_share").round(2),
                pl.lit(recent_days),
                pl.lit(p.universe_min_good_confidence_share),
            ),
        ),
        (
            pl.col("median_price_chaos").is_null(),
            pl.format("no price in the last {} days", pl.lit(recent_days)),
        ),
        (
            pl.col("median_price_chaos") < p.universe_min_price_chaos,
            pl.format(
                "median price {} chaos over the last {} days (needs {})",
                pl.col("median_price_chaos").round_sig_figs(3),
                pl.lit(recent_days),
                pl.lit(p.universe_min_price_chaos),
            ),
        ),
    ]
    reasons = pl.concat_str(
        [pl.when(failed).then(text) for failed, text in checks], separator="; ", ignore_nulls=True
    )
    return (
        stats.with_columns(reasons.alias("reason"))
        .with_columns(
            (pl.col("reason") == "").alias("eligible"),
            pl.when(pl.col("reason") == "").then(pl.lit("eligible")).otherwise("reason").alias("reason"),
        )
        .select(list(UNIVERSE_SCHEMA))
        .cast(UNIVERSE_SCHEMA)
        .sort("currency")
    )


def restrict_universe(universe: pl.DataFrame, names: Iterable[str] | None) -> tuple[pl.DataFrame, list[str]]:
    """Apply a user's ``--currencies`` list: (the eligible rows among those names, the names left out).

    Names are canonicalised and matched case-insensitively; a name left out is unknown in the league or not
    eligible (its row in ``universe`` says why). ``None`` or an empty list means no restriction: every
    eligible currency.
    """
    eligible = universe.filter(pl.col("eligible"))
    wanted = list(dict.fromkeys(canonical_currency_name(n) for n in names or []))
    if not wanted:
        return eligible, []
    by_key = {c.casefold(): c for c in eligible["currency"]}  # users type "divine orb"
    chosen = [by_key[n.casefold()] for n in wanted if n.casefold() in by_key]
    return eligible.filter(pl.col("currency").is_in(chosen)), [
        n for n in wanted if n.casefold() not in by_key
    ]


def universe_path(lake: Lake, league: str) -> Path:
    return hive_dir(lake.root / "currency_universe", league=league) / "part.parquet"


def write_universe(universe: pl.DataFrame, lake: Lake, league: str) -> Path:
    """Store the universe of ``league`` (replacing the previous one) for the warehouse and later runs."""
    return write_parquet_atomic(
        universe.with_columns(pl.lit(league).alias("league")), universe_path(lake, league)
    )


def read_universe(lake: Lake, league: str) -> pl.DataFrame:
    path = universe_path(lake, league)
    if not path.exists():
        raise FileNotFoundError(f"No currency universe for {league!r} at {path}: materialize `currency_universe` first")
    return pl.read_parquet(path)

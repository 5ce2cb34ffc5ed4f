"""The currency universe: which currencies of the current league get a forecast, on liquidity, never on price.

Most of what players trade costs less than a chaos (Orb of Alteration, Chromatic Orb, Orb of Fusing), so there is
no price floor. A currency seen in the current league is eligible (``UniverseRules``) when either:

- it is among the ``top_liquid`` most liquid currencies of the league, ranked by its days with a High or Medium
  confidence price (then by observed days, then by name), once the league is ``min_league_day`` days old; or
- it has at least ``min_current_days`` observed days in the league, and over the last ``recent_days`` days
  (ending on the league's latest day) it was observed with High or Medium confidence on at least
  ``min_good_confidence_share`` of them (a day without an observation counts as not good).

Chaos Orb, the unit every price is quoted in, is never eligible. History in past leagues is no condition: the
global model forecasts a currency that is new to the market, and its partition says when it has too few rows of its
own to specialise (``past_leagues_with_enough_days`` is kept as information).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import polars as pl

from poe_pipeline.lake import Lake, hive_dir, write_parquet_atomic
from poe_pipeline.names import canonical_currency_name

CHAOS = "Chaos Orb"
GOOD_CONFIDENCE = ("High", "Medium")
PAST_LEAGUE_MIN_DAYS = 30  # a past league "counts" for past_leagues_with_enough_days with this many days
UNIVERSE_SCHEMA = {
    "currency": pl.Utf8,
    "eligible": pl.Boolean,
    "reason": pl.Utf8,
    "past_leagues_with_enough_days": pl.UInt32,
    "current_days": pl.UInt32,
    "good_confidence_share": pl.Float64,
    "median_price_chaos": pl.Float64,
    "liquidity_rank": pl.UInt32,
    "good_confidence_days": pl.UInt32,
}


@dataclass(frozen=True)
class UniverseRules:
    """Who gets a forecast: liquidity and history in the current league (see the module docstring)."""

    top_liquid: int = 30
    min_league_day: int = 7
    min_current_days: int = 7
    recent_days: int = 14
    min_good_confidence_share: float = 0.6

    def as_dict(self) -> dict:
        return asdict(self)


DEFAULT_RULES = UniverseRules()


def liquidity_ranking(current: pl.DataFrame) -> pl.DataFrame:
    """currency, good_confidence_days, current_days, liquidity_rank (1 = most liquid) of one league's prices."""
    return (
        current.filter(pl.col("currency") != CHAOS)
        .group_by("currency")
        .agg(pl.col("confidence").is_in(GOOD_CONFIDENCE).sum().alias("good_confidence_days"),
             pl.len().alias("current_days"))
        .sort(["good_confidence_days", "current_days", "currency"], descending=[True, True, False])
        .with_columns(pl.int_range(1, pl.len() + 1).alias("liquidity_rank"))
    )


def currency_universe(
    daily_prices: pl.DataFrame, calendar: pl.DataFrame, current_league: str, rules: UniverseRules = DEFAULT_RULES
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
        .filter(pl.col("len") >= PAST_LEAGUE_MIN_DAYS)
        .group_by("currency")
        .agg(pl.len().alias("past_leagues_with_enough_days"))
    )
    current = daily_prices.filter(pl.col("league") == current_league)
    if current.height == 0:
        return pl.DataFrame(schema=UNIVERSE_SCHEMA)
    # the recent window ends on the league's latest day; a league younger than the window uses all its days
    as_of = current["date"].max()
    league_day = (as_of - start).days
    recent_days = min(rules.recent_days, (as_of - current["date"].min()).days + 1)
    recent = current.filter(pl.col("date") > as_of - timedelta(days=recent_days))
    ranking = liquidity_ranking(current)
    stats = (
        current.select("currency").unique()
        .join(ranking, on="currency", how="left")
        .join(
            recent.group_by("currency").agg(
                (pl.col("confidence").is_in(GOOD_CONFIDENCE).sum() / recent_days).alias("good_confidence_share"),
                pl.col("price_chaos").median().alias("median_price_chaos"),
            ),
            on="currency",
            how="left",
        )
        .join(past_counts, on="currency", how="left")
        .with_columns(
            pl.col("past_leagues_with_enough_days").fill_null(0),
            pl.col("good_confidence_share").fill_null(0.0),
            pl.col("current_days").fill_null(0),
            pl.col("good_confidence_days").fill_null(0),
        )
    )
    r = rules
    top = (pl.col("liquidity_rank") <= r.top_liquid) & pl.lit(league_day >= r.min_league_day)
    checks = [
        (pl.col("current_days") < r.min_current_days,
         pl.format("{} days in {} (needs {})", "current_days", pl.lit(current_league), pl.lit(r.min_current_days))),
        (pl.col("good_confidence_share") < r.min_good_confidence_share,
         pl.format("High/Medium confidence on {} of the last {} days (needs {})",
                   pl.col("good_confidence_share").round(2), pl.lit(recent_days),
                   pl.lit(r.min_good_confidence_share))),
        (pl.col("median_price_chaos").is_null(), pl.format("no price in the last {} days", pl.lit(recent_days))),
    ]
    reasons = pl.concat_str([pl.when(failed).then(text) for failed, text in checks], separator="; ",
                            ignore_nulls=True)
    eligible = (pl.col("currency") != CHAOS) & (top | (pl.col("_reason") == ""))
    return (
        stats.with_columns(reasons.alias("_reason"))
        .with_columns(eligible.alias("eligible"))
        .with_columns(
            pl.when(pl.col("currency") == CHAOS).then(pl.lit("Chaos Orb is the unit prices are quoted in"))
            .when(pl.col("eligible") & top)
            .then(pl.format("eligible: one of the {} most liquid currencies of the league", pl.lit(r.top_liquid)))
            .when(pl.col("eligible")).then(pl.lit("eligible"))
            .otherwise(pl.col("_reason"))
            .alias("reason"),
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
    return hive_dir(lake.currency_universe, league=league) / "part.parquet"


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

"""The league calendar: when each challenge league started and ended.

``leagues.csv`` holds the dates of the leagues in poe.ninja's public dumps. A
league that is not in it (a new live league) starts on its first observed day
and has no known end, unless the live API reports one.
"""

from __future__ import annotations

from datetime import date
from functools import cache
from pathlib import Path

import polars as pl

CALENDAR_FILE = Path(__file__).with_name("leagues.csv")
EVENT_LEAGUE_MARKERS = ("Event", "(IRE", "(SRE")


def is_event_league(league: str) -> bool:
    """Short, hardcore or special leagues: kept in the lake, left out of training."""
    return any(marker in league for marker in EVENT_LEAGUE_MARKERS)


@cache
def known_leagues() -> pl.DataFrame:
    return pl.read_csv(CALENDAR_FILE, try_parse_dates=True, schema_overrides={"league": pl.Utf8})


def league_calendar(observed: pl.DataFrame, end_overrides: dict[str, date] | None = None) -> pl.DataFrame:
    """One row per league in ``observed`` (league, date): start, known end, event flag, recency rank.

    ``recency_rank`` is 0 for the newest league, 1 for the one before, and so on.
    """
    first_seen = observed.group_by("league").agg(pl.col("date").min().alias("first_date"))
    cal = first_seen.join(known_leagues(), on="league", how="left").with_columns(
        pl.coalesce("start_date", "first_date").alias("start_date"),
    )
    if end_overrides:
        overrides = pl.DataFrame(
            {"league": list(end_overrides), "end_override": list(end_overrides.values())},
            schema={"league": pl.Utf8, "end_override": pl.Date},
        )
        cal = cal.join(overrides, on="league", how="left").with_columns(
            pl.coalesce("end_override", "end_date").alias("end_date")
        ).drop("end_override")
    return (
        cal.with_columns(pl.col("league").map_elements(is_event_league, return_dtype=pl.Boolean).alias("is_event"))
        .sort("start_date")
        .with_columns((pl.len() - 1 - pl.int_range(pl.len())).cast(pl.Int32).alias("recency_rank"))
        .select("league", "start_date", "end_date", "is_event", "recency_rank")
    )


def current_league_of(calendar: pl.DataFrame, requested: str = "") -> str:
    """The league forecasts start from: the one requested, else the newest non-event league in the data."""
    leagues = calendar["league"].to_list()
    if requested:
        if requested not in leagues:
            raise ValueError(f"Unknown league {requested!r}: the data has {', '.join(sorted(leagues))}")
        return requested
    regular = calendar.filter(~pl.col("is_event")).sort("start_date")
    if regular.height == 0:
        raise ValueError("No league in the data yet: import poe.ninja dumps or ingest snapshots first")
    return regular["league"][-1]


def training_leagues(calendar: pl.DataFrame, current_league: str) -> list[str]:
    """Non-event leagues up to and including the current one, oldest first: what a model may learn from."""
    start = calendar.filter(pl.col("league") == current_league)["start_date"].item()
    return (
        calendar.filter(~pl.col("is_event") & (pl.col("start_date") <= start) | (pl.col("league") == current_league))
        .sort("start_date")["league"].to_list()
    )

"""What one run covers, resolved once: the lake, the history to import, the current league, the currencies asked for
and the training profile. The Dagster layer builds it from its ``run_scope`` resource; plain Python builds it
directly. Everything derived (the league calendar, the current league, the training leagues) is computed on first
use and kept for the rest of the run."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import polars as pl

from poe_pipeline.lake import Lake
from poe_pipeline.leagues import current_league_of, league_calendar, training_leagues
from poe_pipeline.names import canonical_currency_name
from poe_pipeline.settings import DEFAULT_PROFILE, Profile, get_profile


@dataclass(frozen=True)
class RunScope:
    lake: Lake
    history_dirs: tuple[Path, ...] = ()
    requested_league: str = ""  # empty: the newest non-event league in the data
    currencies: tuple[str, ...] = ()  # canonical names; empty: every eligible currency
    profile_name: str = DEFAULT_PROFILE

    def __post_init__(self) -> None:
        get_profile(self.profile_name)  # an unknown profile is refused at once, naming the choices
        object.__setattr__(self, "currencies", tuple(dict.fromkeys(canonical_currency_name(c)
                                                                    for c in self.currencies if c.strip())))

    @property
    def profile(self) -> Profile:
        return get_profile(self.profile_name)

    @cached_property
    def calendar(self) -> pl.DataFrame:
        from poe_pipeline.prices import read_daily_prices

        return league_calendar(read_daily_prices(self.lake))

    @cached_property
    def league(self) -> str:
        """The current league: the one asked for, else the newest non-event league in ``daily_prices``."""
        return current_league_of(self.calendar, self.requested_league)

    @cached_property
    def training_leagues(self) -> list[str]:
        return training_leagues(self.calendar, self.league)

    def eligible(self) -> list[str]:
        """The stored universe's eligible currencies of the current league (all of them: the global model learns
        from every one)."""
        from poe_pipeline.universe import read_universe

        return read_universe(self.lake, self.league).filter(pl.col("eligible"))["currency"].to_list()

    def chosen(self) -> tuple[list[str], list[str]]:
        """(the eligible currencies within ``currencies``, the requested names that are not eligible)."""
        from poe_pipeline.universe import read_universe, restrict_universe

        chosen, left_out = restrict_universe(read_universe(self.lake, self.league), list(self.currencies) or None)
        return chosen["currency"].to_list(), left_out

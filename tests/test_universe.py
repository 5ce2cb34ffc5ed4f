"""The currency universe on real poe.ninja data (Expedition..Sanctum): who is eligible, who is not and why."""

from __future__ import annotations

from dataclasses import replace
from functools import cache

import polars as pl
import pytest

from conftest import SAMPLE
from poe_pipeline.leagues import league_calendar
from poe_pipeline.prices import daily_from_dump_rows, merge_daily_prices
from poe_pipeline.settings import get_profile
from poe_pipeline.sources.poe_ninja import read_dump
from poe_pipeline.universe import currency_universe, restrict_universe

TEST = get_profile("test")


@cache
def real_prices() -> pl.DataFrame:
    rows = pl.concat([read_dump(p) for p in sorted(SAMPLE.glob("*.currency.csv.gz"))])
    return merge_daily_prices(daily_from_dump_rows(rows))


def universe(prices: pl.DataFrame | None = None, league: str = "Sanctum", profile=TEST) -> pl.DataFrame:
    prices = real_prices() if prices is None else prices
    return currency_universe(prices, league_calendar(prices), league, profile)


def row(u: pl.DataFrame, currency: str) -> dict:
    return u.filter(pl.col("currency") == currency).row(0, named=True)


def test_divine_orb_is_eligible_in_sanctum() -> None:
    u = universe()
    divine = row(u, "Divine Orb")
    assert divine["eligible"] and divine["reason"] == "eligible"
    assert (
        divine["past_leagues_with_enough_days"] == 5
    )  # Expedition, Scourge, Archnemesis, Sentinel, Kalandra
    assert divine["current_days"] > 100 and divine["good_confidence_share"] == 1.0
    assert 150 < divine["median_price_chaos"] < 400
    assert (
        u["currency"].n_unique()
        == u.height
        == real_prices().filter(pl.col("league") == "Sanctum")["currency"].n_unique()
    )
    assert 0 < u["eligible"].sum() < u.height
    assert set(u.filter(pl.col("eligible"))["reason"]) == {"eligible"}


def test_a_currency_new_in_the_league_is_excluded_for_its_history() -> None:
    # Fracturing Orbs arrived in Sanctum (3.20): liquid and valuable, but no past league to learn from
    fracturing = row(universe(), "Fracturing Orb")
    assert not fracturing["eligible"]
    assert fracturing["past_leagues_with_enough_days"] == 0
    assert fracturing["reason"] == "0 past league(s) with 30+ days (needs 2)"
    assert row(universe(profile=replace(TEST, universe_min_past_leagues=0)), "Fracturing Orb")["eligible"]


def test_too_few_days_in_the_current_league() -> None:
    prices = real_prices()
    first_days = prices.filter(
        (pl.col("league") != "Sanctum") | (pl.col("date") < pl.date(2022, 12, 14))  # Sanctum days 1..5
    )
    divine = row(universe(first_days), "Divine Orb")
    assert not divine["eligible"] and divine["current_days"] == 5
    assert "5 days in Sanctum (needs 7)" in divine["reason"]


def test_cheap_and_illiquid_currencies_are_excluded() -> None:
    u = universe()
    transmutation = row(u, "Orb of Transmutation")
    assert not transmutation["eligible"] and transmutation["median_price_chaos"] < 1.0
    assert transmutation["reason"].startswith("median price")
    low_confidence = u.filter(pl.col("good_confidence_share") < TEST.universe_min_good_confidence_share)
    assert low_confidence.height > 0 and not low_confidence["eligible"].any()
    assert low_confidence["reason"].str.contains("confidence").all()


def test_chaos_orb_is_never_in_the_universe() -> None:
    # the unit of account at its (exact) price of 1 chaos, on the days Divine was quoted
    prices = real_prices()
    divine = prices.filter(pl.col("currency") == "Divine Orb")
    chaos = divine.with_columns(pl.lit("Chaos Orb").alias("currency"), pl.lit(1.0).alias("price_chaos"))
    u = universe(merge_daily_prices(prices, chaos))
    assert not row(u, "Chaos Orb")["eligible"]
    assert row(u, "Chaos Orb")["reason"] == "Chaos Orb is the unit prices are quoted in"


def test_restrict_universe_reports_unknown_and_ineligible_names() -> None:
    u = universe()
    chosen, left_out = restrict_universe(
        u, ["divine orb", "Jeweler's Orb", "Fracturing Orb", "Mirror of Calandra", "Divine Orb"]
    )
    assert chosen["currency"].to_list() == ["Divine Orb"]
    # canonical spellings come back: Jeweler's -> Jeweller's (ineligible), plus one unknown name
    assert left_out == ["Jeweller's Orb", "Fracturing Orb", "Mirror of Calandra"]
    everything, none_left = restrict_universe(u, None)
    assert none_left == [] and everything.height == u["eligible"].sum()


def test_unknown_league_is_refused() -> None:
    with pytest.raises(ValueError, match="Unknown league 'Foo': known leagues are Expedition"):
        universe(league="Foo")

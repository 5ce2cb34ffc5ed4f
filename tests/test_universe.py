"""The currency universe on real poe.ninja data (Expedition..Sanctum): who is eligible, who is not and why."""

from __future__ import annotations

from functools import cache

import polars as pl
import pytest

from conftest import SAMPLE
from poe_pipeline.leagues import league_calendar
from poe_pipeline.prices import daily_from_dump_rows, merge_daily_prices
from poe_pipeline.sources.poe_ninja import read_dump
from poe_pipeline.universe import DEFAULT_RULES, UniverseRules, currency_universe, restrict_universe


@cache
def real_prices() -> pl.DataFrame:
    rows = pl.concat([read_dump(p) for p in sorted(SAMPLE.glob("*.currency.csv.gz"))])
    return merge_daily_prices(daily_from_dump_rows(rows))


def universe(prices: pl.DataFrame | None = None, league: str = "Sanctum",
             rules: UniverseRules = DEFAULT_RULES) -> pl.DataFrame:
    prices = real_prices() if prices is None else prices
    return currency_universe(prices, league_calendar(prices), league, rules)


def row(u: pl.DataFrame, currency: str) -> dict:
    return u.filter(pl.col("currency") == currency).row(0, named=True)


def test_divine_orb_is_eligible_in_sanctum() -> None:
    u = universe()
    divine = row(u, "Divine Orb")
    assert divine["eligible"] and divine["reason"].startswith("eligible")
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
    assert u.filter(pl.col("eligible"))["reason"].str.starts_with("eligible").all()


def test_a_currency_new_to_the_market_is_in():
    # Fracturing Orbs arrived in Sanctum (3.20): liquid and valuable, with no past league to learn from. The global
    # model forecasts it; history in past leagues is no condition.
    fracturing = row(universe(), "Fracturing Orb")
    assert fracturing["eligible"] and fracturing["past_leagues_with_enough_days"] == 0


def test_cheap_bulk_currencies_are_in():
    # No price floor: most of what players trade costs less than a chaos
    u = universe()
    for name in ("Orb of Alteration", "Chromatic Orb", "Orb of Fusing", "Regal Orb", "Orb of Transmutation"):
        cheap = row(u, name)
        assert cheap["eligible"] and cheap["median_price_chaos"] < 1.0, cheap
    assert u.filter(pl.col("eligible") & (pl.col("median_price_chaos") < 1)).height > 50


def test_the_30_most_liquid_currencies_are_in_from_league_day_7():
    prices = real_prices()
    # Sanctum started on 2022-12-09: its first 8 days (league days 0..7), then its first 6
    week = prices.filter((pl.col("league") != "Sanctum") | (pl.col("date") <= pl.date(2022, 12, 16)))
    strict = UniverseRules(min_current_days=30)  # nobody passes the other rule this early
    u = universe(week, rules=strict)
    assert u["eligible"].sum() == 30
    assert u.filter(pl.col("eligible"))["liquidity_rank"].max() == 30
    assert u.filter(pl.col("eligible"))["reason"].str.contains("30 most liquid").all()
    assert u.filter(~pl.col("eligible"))["reason"].str.contains(r"^\d days in Sanctum \(needs 30\)").all()
    before = universe(week.filter((pl.col("league") != "Sanctum") | (pl.col("date") <= pl.date(2022, 12, 14))),
                      rules=strict)
    assert before["eligible"].sum() == 0  # league day 5: the top-30 rule does not apply yet


def test_illiquid_currencies_are_excluded_with_their_reason() -> None:
    u = universe()
    low_confidence = u.filter((pl.col("good_confidence_share") < DEFAULT_RULES.min_good_confidence_share)
                              & (pl.col("liquidity_rank") > DEFAULT_RULES.top_liquid))
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
        u, ["divine orb", "Jeweler's Orb", "Mirror of Calandra", "Divine Orb"]
    )
    # canonical spellings come back: Jeweler's -> Jeweller's, plus one unknown name
    assert sorted(chosen["currency"].to_list()) == ["Divine Orb", "Jeweller's Orb"]
    assert left_out == ["Mirror of Calandra"]
    everything, none_left = restrict_universe(u, None)
    assert none_left == [] and everything.height == u["eligible"].sum()


def test_unknown_league_is_refused() -> None:
    with pytest.raises(ValueError, match="Unknown league 'Foo': known leagues are Expedition"):
        universe(league="Foo")

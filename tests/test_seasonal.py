"""The league-phase drift on real leagues: what it learns from, and that it never looks ahead."""

from __future__ import annotations

from datetime import timedelta

import polars as pl
import pytest
from polars.testing import assert_frame_equal
from test_features import real_prices

from poe_pipeline import seasonal
from poe_pipeline.leagues import league_calendar


def with_overlapping_league(gap_days: int) -> pl.DataFrame:
    """The two real leagues plus "Overlap": Kalandra's prices again, started ``gap_days`` before Sanctum, so its
    later days lie inside Sanctum's."""
    prices = real_prices()
    kalandra = prices.filter(pl.col("league") == "Kalandra")
    shift = prices.filter(pl.col("league") == "Sanctum")["date"].min() - timedelta(days=gap_days) \
        - kalandra["date"].min()
    return pl.concat([prices, kalandra.with_columns(pl.lit("Overlap").alias("league"), pl.col("date") + shift)])


def sanctum_days(prices: pl.DataFrame, calendar: pl.DataFrame) -> pl.DataFrame:
    start = calendar.filter(pl.col("league") == "Sanctum")["start_date"].item()
    return (prices.filter(pl.col("league") == "Sanctum")
            .select("league", "currency", "date",
                    (pl.col("date") - start).dt.total_days().cast(pl.Int32).alias("league_day")))


def assert_known_by_each_day(prices: pl.DataFrame, league_days: tuple[int, ...]) -> None:
    """The drift of every Sanctum row up to each cut is the same from the whole history as from the prices dated
    up to the cut."""
    calendar = league_calendar(prices)
    rows = sanctum_days(prices, calendar)
    full = seasonal.drift_table(rows, prices, calendar)
    for day in league_days:
        cut = rows.filter(pl.col("league_day") == day)["date"][0]
        known = prices.filter(pl.col("date") <= cut)
        part = seasonal.drift_table(rows.filter(pl.col("date") <= cut), known, league_calendar(known))
        expected = full.join(part.select(seasonal.KEYS), on=seasonal.KEYS, how="semi")
        assert part.height == expected.height > 0
        assert_frame_equal(part.sort(seasonal.KEYS), expected.sort(seasonal.KEYS), check_exact=True)


def test_drift_uses_only_returns_known_by_the_row_day() -> None:
    prices = with_overlapping_league(gap_days=seasonal.GAP_DAYS)  # just early enough to count
    assert seasonal.source_leagues(league_calendar(prices), "Sanctum") == ["Kalandra", "Overlap"]
    assert_known_by_each_day(prices, (0, 2, 7, 30))


def test_the_no_lookahead_check_catches_a_league_that_started_too_late(monkeypatch) -> None:
    prices = with_overlapping_league(gap_days=3)
    assert seasonal.source_leagues(league_calendar(prices), "Sanctum") == ["Kalandra"]
    monkeypatch.setattr(seasonal, "GAP_DAYS", 0)  # the leak: a league started 3 days before becomes a source
    with pytest.raises(AssertionError):
        assert_known_by_each_day(prices, (0, 2, 7, 30))


def test_drift_is_the_currency_median_at_that_league_age() -> None:
    prices = real_prices()
    calendar = league_calendar(prices)
    table = seasonal.drift_table(sanctum_days(prices, calendar), prices, calendar)
    # by hand: the Divine Orb's 7-day returns in Kalandra that start at league days 7..13 (day 10 +- 3)
    kalandra = prices.filter(pl.col("league") == "Kalandra", pl.col("currency") == "Divine Orb")
    start = calendar.filter(pl.col("league") == "Kalandra")["start_date"].item()
    lp = dict(zip(kalandra["date"].to_list(), kalandra["price_chaos"].log().to_list(), strict=True))
    returns = [lp[start + timedelta(days=d + 7)] - lp[start + timedelta(days=d)] for d in range(7, 14)
               if start + timedelta(days=d) in lp and start + timedelta(days=d + 7) in lp]
    assert len(returns) >= seasonal.MIN_RETURNS
    got = table.filter(pl.col("currency") == "Divine Orb", pl.col("league_day") == 10)["seasonal_drift_7d"].item()
    assert got == pytest.approx(pl.Series(returns).median(), abs=1e-12)
    # Kalandra itself has no earlier league here: no drift
    assert seasonal.drift_table(pl.DataFrame({"league": ["Kalandra"], "currency": ["Divine Orb"],
                                              "league_day": [10]}, schema_overrides={"league_day": pl.Int32}),
                                prices, calendar).height == 0


def test_a_currency_new_to_the_market_gets_the_all_currency_median() -> None:
    prices = real_prices()
    calendar = league_calendar(prices)
    rows = pl.DataFrame({"league": ["Sanctum"] * 2, "currency": ["Brand New Orb", "Divine Orb"],
                         "league_day": [10, 10]}, schema_overrides={"league_day": pl.Int32})
    out = seasonal.seasonal_drift(rows, prices, calendar)
    new, divine = out.row(0, named=True), out.row(1, named=True)
    assert all(new[c] is not None for c in seasonal.COLUMNS)
    assert new["seasonal_drift_7d"] != divine["seasonal_drift_7d"]

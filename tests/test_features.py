"""The feature store on real poe.ninja data: no look-ahead, no leakage between leagues, sane values, and
incremental writes."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, timedelta
from functools import cache

import numpy as np
import polars as pl
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from conftest import REPO, SAMPLE
from poe_pipeline import seasonal
from poe_pipeline.features import (
    FEATURE_COLUMNS,
    KEYS,
    OUTLIER_WINDOW,
    OUTPUT_COLUMNS,
    TARGET_COLUMNS,
    _sorting_network,
    build_features,
    build_league_features,
    feature_path,
    features_markdown,
    update_features,
)
from poe_pipeline.leagues import league_calendar
from poe_pipeline.prices import daily_from_dump_rows, merge_daily_prices
from poe_pipeline.sources.poe_ninja import read_dump

LEAGUES = ("Kalandra", "Sanctum")
BuildFn = Callable[[pl.DataFrame, pl.DataFrame], pl.DataFrame]


@cache
def real_prices() -> pl.DataFrame:
    """Daily prices of two real leagues, every currency (the market-wide features need them all)."""
    rows = pl.concat([read_dump(SAMPLE / f"{league}.currency.csv.gz") for league in LEAGUES])
    return merge_daily_prices(daily_from_dump_rows(rows))


@cache
def real_features() -> pl.DataFrame:
    prices = real_prices()
    return build_features(prices, league_calendar(prices))


@cache
def league_dates(league: str) -> list[date]:
    return real_prices().filter(pl.col("league") == league)["date"].unique().sort().to_list()


def assert_no_lookahead(build_fn: BuildFn, prices: pl.DataFrame, league: str, cutoff: date) -> None:
    """Every feature row up to ``cutoff`` is the same whether or not any later price exists.

    ``cutoff`` is a day with data in ``league`` (as live: features are built as of the latest day). Rows are
    compared exactly, nulls equal to nulls, in every league: a later league's drift learns from the earlier
    leagues, so a row may change only when data dated on or before it does.
    """
    kept = pl.col("date") <= cutoff
    truncated = prices.filter(kept)
    full = build_fn(prices, league_calendar(prices)).filter(kept)
    part = build_fn(truncated, league_calendar(truncated))
    # the rank counts the leagues in the calendar: cutting a later league away renumbers it (no model reads it)
    columns = [*KEYS, *(c for c in FEATURE_COLUMNS if c != "league_recency_rank")]
    assert part.height == full.height, (
        f"{league} cut at {cutoff}: {part.height} rows, {full.height} with the future"
    )
    assert_frame_equal(part.select(columns).sort(KEYS), full.select(columns).sort(KEYS), check_exact=True)


@settings(max_examples=15, deadline=None)
@given(league=st.sampled_from(LEAGUES), day=st.integers(min_value=0, max_value=10_000))
@example(league="Kalandra", day=0)  # launch day
@example(league="Sanctum", day=2)
@example(league="Kalandra", day=13)  # the longest windows fill up
def test_features_never_look_ahead(league: str, day: int) -> None:
    dates = league_dates(league)
    assert_no_lookahead(build_features, real_prices(), league, dates[day % len(dates)])


def _peek_tomorrow(prices: pl.DataFrame, calendar: pl.DataFrame) -> pl.DataFrame:
    out = build_features(prices, calendar)
    return out.with_columns(pl.col("log_price").shift(-1).over("league", "currency").alias("log_price_lag_1"))


def _centered_window(prices: pl.DataFrame, calendar: pl.DataFrame) -> pl.DataFrame:
    out = build_features(prices, calendar)
    centered = pl.col("log_price").rolling_mean(3, min_samples=1, center=True).over("league", "currency")
    return out.with_columns(centered.alias("log_price_roll_mean_3"))


def _market_tomorrow(prices: pl.DataFrame, calendar: pl.DataFrame) -> pl.DataFrame:
    out = build_features(prices, calendar)
    by_day = out.group_by("league", "date").agg(pl.col("logret_1d").median().alias("_m"))
    tomorrow = by_day.with_columns(pl.col("date") - timedelta(days=1))
    return (
        out.drop("market_median_logret_1d")
        .join(tomorrow, on=["league", "date"], how="left")
        .rename({"_m": "market_median_logret_1d"})
    )


@pytest.mark.parametrize("leaky_build", [_peek_tomorrow, _centered_window, _market_tomorrow])
def test_lookahead_checker_catches_a_leaky_feature(leaky_build: BuildFn) -> None:
    cutoff = league_dates("Kalandra")[40]
    with pytest.raises(AssertionError):
        assert_no_lookahead(leaky_build, real_prices(), "Kalandra", cutoff)
    assert_no_lookahead(build_features, real_prices(), "Kalandra", cutoff)  # the real build passes


def test_leagues_do_not_leak_into_each_other() -> None:
    prices, full = real_prices(), real_features()
    calendar = league_calendar(prices)
    for league in LEAGUES:
        alone = build_league_features(prices, calendar, league)
        assert_frame_equal(alone, full.filter(pl.col("league") == league), check_exact=True)
    # a league's own prices alone, with the calendar recomputed without the other league: only the league-phase
    # drift, learnt from the earlier league, is gone
    sanctum = prices.filter(pl.col("league") == "Sanctum")
    alone = build_features(sanctum, league_calendar(sanctum))
    with_past = full.filter(pl.col("league") == "Sanctum")
    assert_frame_equal(alone.drop(seasonal.COLUMNS), with_past.drop(seasonal.COLUMNS), check_exact=True)
    assert alone.select(pl.col(seasonal.COLUMNS).is_null().all()).row(0) == (True,) * len(seasonal.COLUMNS)
    known = with_past.filter(pl.col("league_day") < 90)  # Kalandra lasted 109 days: its 7-day returns end there
    assert min(known.select(pl.col(seasonal.COLUMNS).is_not_null().mean()).row(0)) > 0.99


def test_targets_need_an_observed_future_day() -> None:
    f = real_features()
    for h in (1, 3, 7):
        future = f.select(
            "league",
            "currency",
            (pl.col("date") - timedelta(days=h)).alias("date"),
            pl.col("log_price").alias("future_log_price"),
            pl.col("is_imputed").alias("future_imputed"),
        )
        joined = f.join(future, on=KEYS, how="left")
        target = pl.col(f"target_logret_{h}d")
        observed_future = pl.col("future_imputed").not_() & pl.col("future_imputed").is_not_null()
        # the real data has imputed future days, so the rule is exercised
        assert joined.filter(pl.col("future_imputed").fill_null(False)).height > 0
        assert joined.filter(observed_future.not_() & target.is_not_null()).height == 0
        ok = joined.filter(observed_future)
        assert ok[f"target_logret_{h}d"].null_count() == 0
        assert (ok[f"target_logret_{h}d"] - (ok["future_log_price"] - ok["log_price"])).abs().max() < 1e-12
        assert (ok[f"target_direction_{h}d"] == ok[f"target_logret_{h}d"].sign()).all()
        last_days = f.filter(pl.col("date") > pl.col("date").max().over("league") - timedelta(days=h))
        assert last_days[f"target_logret_{h}d"].null_count() == last_days.height


def test_targets_are_never_features() -> None:
    assert not set(TARGET_COLUMNS) & set(FEATURE_COLUMNS)
    assert not [c for c in FEATURE_COLUMNS if "target" in c]
    assert list(real_features().columns) == OUTPUT_COLUMNS


def test_a_missing_day_is_filled_flagged_and_never_a_target() -> None:
    prices = real_prices()
    gap = date(2022, 9, 20)
    divine = (pl.col("league") == "Kalandra") & (pl.col("currency") == "Divine Orb")
    f = build_features(prices.filter(~(divine & (pl.col("date") == gap))), league_calendar(prices))
    rows = f.filter(divine, pl.col("date").is_between(gap - timedelta(days=1), gap + timedelta(days=1))).sort(
        "date"
    )
    before, filled, after = rows.iter_rows(named=True)
    assert filled["is_imputed"] and filled["days_since_observed"] == 1
    assert filled["price_chaos"] == before["price_chaos"] and filled["confidence_level"] is None
    assert before["target_logret_1d"] is None and filled["target_logret_1d"] is not None
    assert not after["is_imputed"] and after["logret_1d"] == pytest.approx(
        after["log_price"] - before["log_price"], abs=1e-12
    )


def test_outlier_flag_catches_a_spike_not_the_league_start() -> None:
    prices = real_prices()
    spike_day = date(2022, 10, 10)
    divine = (pl.col("league") == "Kalandra") & (pl.col("currency") == "Divine Orb")
    spiked = prices.with_columns(
        pl.when(divine & (pl.col("date") == spike_day))
        .then(pl.col("price_chaos") * 10)
        .otherwise(pl.col("price_chaos"))
        .alias("price_chaos")
    )
    f = build_features(spiked, league_calendar(spiked)).filter(divine).sort("date")
    day = f.filter(pl.col("date") == spike_day).row(0, named=True)
    assert day["is_outlier"] and day["logret_1d"] > 2.0
    assert day["logret_1d_winsorized"] < day["logret_1d"]  # clipped for volatility and momentum
    assert day["price_chaos"] == pytest.approx(
        10 * prices.filter(divine, pl.col("date") == spike_day)["price_chaos"][0]
    )
    # Divine's real league-start climb (89 -> 125 chaos in four days) is a real move, not an outlier
    assert not f.filter(pl.col("league_day") < 7)["is_outlier"].any()
    assert real_features()["is_outlier"].mean() < 0.03


def test_sanity_on_real_prices() -> None:
    f = real_features()
    divine_mid = f.filter(
        pl.col("league") == "Kalandra", pl.col("currency") == "Divine Orb", pl.col("league_phase_mid")
    )
    assert divine_mid.height > 30
    assert divine_mid["price_chaos"].is_between(100, 300).all()
    for stat in ("mean", "min", "max", "median"):
        assert (f[f"log_price_roll_{stat}_1"] == f["log_price"]).all()
    assert (f["log_price_roll_std_1"] == 0).all()
    rsi = f["rsi_14"].drop_nulls()
    assert rsi.is_between(0, 100).all() and rsi.min() < 30 and rsi.max() > 70
    assert f.filter(pl.col("series_age_days") > 0)["rsi_14"].null_count() == 0  # flat stretches are 50
    assert f.filter(pl.col("currency") == "Divine Orb")["log_price_rel_divine"].abs().max() == 0
    assert f["market_median_logret_1d"].null_count() < f.height * 0.02
    assert f.select(
        (
            pl.col("league_phase_early").cast(pl.Int8)
            + pl.col("league_phase_mid").cast(pl.Int8)
            + pl.col("league_phase_late").cast(pl.Int8)
            == 1
        ).all()
    ).item()


def test_fast_windows_match_plain_polars_windows() -> None:
    # windows, medians and EWMs are computed in numpy; check them against Polars' own rolling and EWM functions
    f = real_features().sort(KEYS)
    gaps = f.group_by("league", "currency").agg(
        (pl.col("date").diff().dt.total_days().max() > 1).alias("gap")
    )
    f = f.join(gaps.filter(~pl.col("gap")), on=["league", "currency"], how="semi")
    lp, by = pl.col("log_price"), ["league", "currency"]
    ref = f.select(
        (pl.col("log_price_roll_mean_7") - lp.rolling_mean(7, min_samples=1).over(by))
        .abs()
        .max()
        .alias("mean"),
        (pl.col("log_price_roll_std_14") - lp.rolling_std(14, min_samples=1, ddof=0).over(by))
        .abs()
        .max()
        .alias("std"),
        (pl.col("log_price_roll_median_7") - lp.rolling_median(7, min_samples=1).over(by))
        .abs()
        .max()
        .alias("median"),
        (pl.col("realized_vol_14") - pl.col("logret_1d_winsorized").rolling_std(14, min_samples=2).over(by))
        .abs()
        .max()
        .alias("vol"),
        (pl.col("log_price_roll_median_14") - lp.rolling_median(14, min_samples=1).over(by)).abs().max().alias("m14"),
        (pl.col("ema_26") - lp.ewm_mean(span=26, adjust=False).over(by)).abs().max().alias("ema"),
        (pl.col("macd_signal") - pl.col("macd").ewm_mean(span=9, adjust=False).over(by)).abs().max().alias("signal"),
        (pl.col("drawdown_from_high") - (lp - lp.cum_max().over(by))).abs().max().alias("drawdown"),
        (
            pl.col("trend_slope_14")
            - pl.rolling_cov(
                pl.col("series_age_days").cast(pl.Float64), lp, window_size=14, min_samples=3, ddof=0
            ).over(by)
            / pl.col("series_age_days").cast(pl.Float64).rolling_var(14, min_samples=3, ddof=0).over(by)
        )
        .abs()
        .max()
        .alias("slope"),
    ).row(0, named=True)
    assert max(ref.values()) < 1e-9, ref


def test_unknown_league_and_duplicates_are_refused() -> None:
    prices = real_prices()
    with pytest.raises(ValueError, match="not in the calendar"):
        build_features(prices, league_calendar(prices.filter(pl.col("league") == "Sanctum")))
    with pytest.raises(ValueError, match="duplicate"):
        build_features(pl.concat([prices, prices.head(1)]), league_calendar(prices))
    with pytest.raises(ValueError, match="Unknown league 'Foo'"):
        build_league_features(prices, league_calendar(prices), "Foo")
    for bad in (0.0, -1.0, float("nan"), float("inf"), None):  # merge_daily_prices drops these
        price = pl.when(pl.int_range(pl.len()) == 5).then(pl.lit(bad, pl.Float64)).otherwise("price_chaos")
        with pytest.raises(ValueError, match="non-positive price"):
            build_features(prices.with_columns(price.alias("price_chaos")), league_calendar(prices))


def test_no_prices_give_no_rows() -> None:
    prices = real_prices()
    empty = build_features(prices.head(0), league_calendar(prices))
    assert empty.height == 0 and empty.schema == real_features().schema


def test_sorting_networks_sort() -> None:
    # the rolling medians order each window with these networks; by the 0-1 principle, sorting every 0/1 input
    # proves a network sorts any input
    for n in range(1, OUTLIER_WINDOW + 1):
        wires = [((np.arange(2**n) >> i) & 1).astype(float) for i in range(n)]
        for i, j in _sorting_network(n):
            wires[i], wires[j] = np.minimum(wires[i], wires[j]), np.maximum(wires[i], wires[j])
        assert (np.diff(np.array(wires), axis=0) >= 0).all(), n


def test_incremental_update_rewrites_only_the_league_that_changed(lake) -> None:
    prices = real_prices()
    last = prices.filter(pl.col("league") == "Sanctum")["date"].max()
    yesterday = prices.filter((pl.col("league") != "Sanctum") | (pl.col("date") < last))

    written = update_features(yesterday, league_calendar(yesterday), lake)
    assert sorted(written) == sorted(feature_path(lake, lg) for lg in LEAGUES)
    assert feature_path(lake, "Sanctum") == lake.features / "league=Sanctum" / "part.parquet"
    kalandra = feature_path(lake, "Kalandra")
    before = (kalandra.stat().st_mtime_ns, kalandra.read_bytes())

    written = update_features(prices, league_calendar(prices), lake)  # one new day for the current league
    assert written == [feature_path(lake, "Sanctum")]
    assert (kalandra.stat().st_mtime_ns, kalandra.read_bytes()) == before
    stored = pl.read_parquet(feature_path(lake, "Sanctum"))
    assert stored["date"].max() == last
    assert_frame_equal(stored, real_features().filter(pl.col("league") == "Sanctum"), check_exact=True)
    assert update_features(prices, league_calendar(prices), lake) == []  # nothing changed


def test_a_corrected_earlier_league_rebuilds_the_leagues_whose_drift_learns_from_it(lake) -> None:
    prices = real_prices()
    update_features(prices, league_calendar(prices), lake)
    # a re-imported dump corrects one Kalandra price: Sanctum's league-phase drift learns from Kalandra
    fixed = prices.with_columns(pl.when((pl.col("league") == "Kalandra") & (pl.col("currency") == "Divine Orb")
                                        & (pl.col("date") == pl.col("date").min().over("league") + timedelta(days=5)))
                                .then(pl.col("price_chaos") * 2).otherwise(pl.col("price_chaos")).alias("price_chaos"))
    written = update_features(fixed, league_calendar(fixed), lake)
    assert sorted(written) == sorted(feature_path(lake, lg) for lg in LEAGUES)
    stored = pl.read_parquet(feature_path(lake, "Sanctum"))
    assert_frame_equal(stored, build_features(fixed, league_calendar(fixed)).filter(pl.col("league") == "Sanctum"),
                       check_exact=True)
    assert not stored.equals(real_features().filter(pl.col("league") == "Sanctum"))


def test_docs_list_every_feature() -> None:
    doc = (REPO / "docs" / "features.md").read_text(encoding="utf-8")
    assert doc == features_markdown(), "docs/features.md is stale: regenerate it with features_markdown()"
    for name in FEATURE_COLUMNS:
        assert f"- `{name}` — " in doc


def test_output_matches_the_stored_reference() -> None:
    # tests/data/features-reference.parquet: rows of this module's real_features() as built before the
    # speed rewrite (six whole series plus 100 sampled rows; see tests/data/README.md)
    ref = pl.read_parquet(REPO / "tests" / "data" / "features-reference.parquet")
    # the columns added since (the league-phase drift) have their own tests
    new = real_features().join(ref.select(KEYS), on=KEYS, how="semi").sort(KEYS).select(ref.columns)
    assert new.height == ref.height
    floats = [c for c, t in ref.schema.items() if t == pl.Float64]
    assert_frame_equal(new.drop(floats), ref.drop(floats), check_exact=True)
    assert_frame_equal(new.select(floats), ref.select(floats), check_exact=False, rtol=1e-9, atol=1e-12)

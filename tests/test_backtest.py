"""The backtest on real leagues: it never reads past its origin, and it scores forecasts and advice honestly."""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from functools import cache

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from conftest import SAMPLE
from poe_pipeline.backtest import (
    BACKTEST_SCHEMA,
    FeaturesAsOf,
    backtest_origins,
    run_backtest,
    run_backtest_cli,
    winkler_score,
)
from poe_pipeline.forecasting import CONTRACT_COLUMNS
from poe_pipeline.prices import daily_from_dump_rows, merge_daily_prices
from poe_pipeline.sources.poe_ninja import read_dump

LEAGUES = ("Sentinel", "Kalandra", "Sanctum")


@cache
def real_prices() -> pl.DataFrame:
    return merge_daily_prices(daily_from_dump_rows(
        pl.concat([read_dump(SAMPLE / f"{lg}.currency.csv.gz") for lg in LEAGUES])))


def _forecast_part(run) -> pl.DataFrame:
    return run.predictions.drop("created_at", "actual_price").sort("currency", "horizon_days")


def test_the_backtest_never_reads_a_date_after_its_origin(monkeypatch):
    prices = real_prices()
    origins = backtest_origins(prices, "Sanctum")[10:15]  # league days 17-21, one refit
    origin = origins[-1]
    corrupted = prices.with_columns(
        pl.when(pl.col("date") > origin).then(pl.col("price_chaos") * 100).otherwise(pl.col("price_chaos"))
        .alias("price_chaos"))
    assert corrupted.filter(pl.col("date") > origin).height > 5000  # the future exists, and it is now absurd

    currencies = ["Divine Orb", "Exalted Orb", "Orb of Alteration"]
    clean = run_backtest(prices, "Sanctum", origins, currencies, refit_every=10, horizons=(1, 3))
    dirty = run_backtest(corrupted, "Sanctum", origins, currencies, refit_every=10, horizons=(1, 3))
    assert clean.predictions.height == 5 * 3 * 2
    assert_frame_equal(_forecast_part(clean), _forecast_part(dirty), check_exact=True)
    # the league's own interval scale was learnt along the way, from forecasts come true by each origin only
    last = clean.predictions.filter(pl.col("origin_date") == origin)
    assert (last["interval_scale"] != 1.0).all()
    assert (clean.predictions.filter(pl.col("origin_date") == origins[0])["interval_scale"] == 1.0).all()
    # the corrupted future is really there: the realised price the backtest scores against is 100x
    tail = pl.col("origin_date") == origin
    assert dirty.predictions.filter(tail)["actual_price"].to_numpy() == pytest.approx(
        100 * clean.predictions.filter(tail)["actual_price"].to_numpy())

    # and the check has teeth: a backtest that builds features from all the data sees the corruption
    def leaky_at(self, origin_day):
        from poe_pipeline.features import build_features
        from poe_pipeline.leagues import league_calendar

        calendar = league_calendar(self.prices)
        return build_features(self.prices, calendar), calendar

    monkeypatch.setattr(FeaturesAsOf, "at", leaky_at)
    one_clean = run_backtest(prices, "Sanctum", [origin], ["Divine Orb"], horizons=(1,))
    leaky = run_backtest(corrupted, "Sanctum", [origin], ["Divine Orb"], horizons=(1,))
    assert not _forecast_part(leaky).equals(_forecast_part(one_clean))


def test_refits_between_re_tunes_keep_the_tuning(monkeypatch):
    import poe_pipeline.training as training

    calls = []
    real_refit = training.refit_globals

    def spy(*args, **kwargs):  # a refit that keeps the tuning fits only the final models
        calls.append(bool(kwargs["warm"]))
        return real_refit(*args, **kwargs)

    monkeypatch.setattr(training, "refit_globals", spy)
    prices = real_prices()
    origins = backtest_origins(prices, "Sanctum")[:5]
    # a day adds far fewer than 5 % new pooled rows: the refits after the tuning keep the fitted models (a kept
    # refit is not a refit: re-tunes count the fitted ones)
    run = run_backtest(prices, "Sanctum", origins, ["Divine Orb"], refit_every=1, horizons=(1,), retune_every=2)
    assert calls == [False]
    assert run.refits == origins[:1] and run.kept_refits == origins[1:]
    assert run.predictions.height == 5 and run.predictions["refit_date"].to_list() == [origins[0]] * 5

    calls.clear()  # with any change enough, they refit the final models on the new rows
    import poe_pipeline.global_model as global_model

    monkeypatch.setattr(global_model, "REFIT_MIN_GROWTH", 0.0)
    run = run_backtest(prices, "Sanctum", origins, ["Divine Orb"], refit_every=1, horizons=(1,), retune_every=2)
    assert run.refits == origins and not run.kept_refits
    assert calls == [False, True, False, True, False]  # re-tune, refit, re-tune, ...
    assert run.predictions.height == 5
    with pytest.raises(ValueError, match="--retune-every 0: must be at least 1"):
        run_backtest(prices, "Sanctum", origins, ["Divine Orb"], retune_every=0)


def test_features_as_of_an_origin_end_on_it():
    prices = real_prices()
    builder = FeaturesAsOf(prices)
    origin = backtest_origins(prices, "Sanctum")[5]
    features, calendar = builder.at(origin)
    sanctum = features.filter(pl.col("league") == "Sanctum")
    assert sanctum["date"].max() == origin
    assert calendar.filter(pl.col("league") == "Sanctum")["end_date"].item() is None  # not known yet, live
    assert calendar.filter(pl.col("league") == "Kalandra")["end_date"].item() is not None
    # labels need the future: none is known past the origin
    assert sanctum.filter(pl.col("date") > origin - timedelta(days=7))["target_logret_7d"].null_count() == \
        sanctum.filter(pl.col("date") > origin - timedelta(days=7)).height


def test_winkler_score_by_hand():
    lo, hi = np.array([-0.1, -0.1, -0.1]), np.array([0.1, 0.1, 0.1])
    actual = np.array([0.0, 0.2, -0.15])
    # inside: the width; outside: width + 2/alpha x miss, alpha = 0.2
    assert winkler_score(lo, hi, actual, 0.8) == pytest.approx([0.2, 0.2 + 10 * 0.1, 0.2 + 10 * 0.05])


def test_backtest_command_writes_scores_and_strategy(tmp_path):
    history = tmp_path / "history"
    history.mkdir()
    for league in LEAGUES:
        shutil.copy(SAMPLE / f"{league}.currency.csv.gz", history)
    text = run_backtest_cli(history, "Sanctum", refit_every=7, profile="test", lake_root=tmp_path / "lake",
                            currencies="Divine Orb", max_origins=8, workers=1)
    out = tmp_path / "lake" / "backtests" / "league=Sanctum"
    p = pl.read_parquet(out / "predictions.parquet")
    assert p.columns[: len(CONTRACT_COLUMNS)] == CONTRACT_COLUMNS and "actual_price" in p.columns
    assert p.schema == pl.Schema(BACKTEST_SCHEMA)
    assert p["origin_date"].n_unique() == 8 and p.height == 24
    assert p["refit_date"].n_unique() == 2  # refits on the first and the eighth origin

    # actual prices are the real closes on origin + horizon
    prices = real_prices().filter((pl.col("league") == "Sanctum") & (pl.col("currency") == "Divine Orb"))
    for r in p.filter(pl.col("actual_price").is_not_null()).iter_rows(named=True):
        day = prices.filter(pl.col("date") == r["origin_date"] + timedelta(days=r["horizon_days"]))
        assert r["actual_price"] == pytest.approx(day["price_chaos"].item())
    assert (p["current_price"].is_between(100, 400)).all()  # Divine Orb, early Sanctum, in chaos

    summary = json.loads((out / "summary.json").read_text())
    assert (len(summary["refits"]), summary["kept_refits"]) == (2, [])  # every refit re-tunes by default
    assert "2 refits (0 more kept the models: too few new rows)" in text
    scores = pl.DataFrame(summary["scores"])
    assert scores["horizon_days"].to_list() == [1, 3, 7]
    assert (scores["n"] == 8).all() and scores["coverage"].is_between(0, 1).all()
    assert (scores["nominal"] == 0.8).all() and (scores["mean_winkler"] > 0).all()
    # persistence is the honest baseline: its error is recomputed here from the file itself
    h1 = p.filter(pl.col("horizon_days") == 1)
    persistence = np.mean(np.abs(np.log((h1["actual_price"] / h1["current_price"]).to_numpy())))
    assert scores.filter(pl.col("horizon_days") == 1)["persistence_log_mae"][0] == pytest.approx(persistence)

    strategy = summary["strategy"]
    assert strategy["decisions"] == 2 and strategy["chaos_total"] == 0.0
    weekly = pl.read_parquet(out / "strategy.parquet")
    basket = [float(p.filter((pl.col("origin_date") == d) & (pl.col("horizon_days") == 7))
                    .select(pl.col("actual_price") / pl.col("current_price") - 1).item())
              for d in weekly["origin_date"]]
    assert weekly["basket_return"].to_list() == pytest.approx(basket)  # one currency: the basket is its return
    assert "coverage" in text and "holding chaos" in text and str(out / "predictions.parquet") in text
    # by the eighth origin, seven one-day forecasts had come true: the summary says what they taught
    last = p.filter((pl.col("origin_date") == p["origin_date"].max()) & (pl.col("horizon_days") == 1)).row(
        0, named=True)
    assert last["point_shrink"] == 1 and last["interval_scale"] != 1  # the point shrink is measured, not applied
    assert f"1d: interval x{last['interval_scale']:.2f}" in text


def test_bad_arguments_name_the_fix(tmp_path):
    prices = real_prices()
    with pytest.raises(ValueError, match="Unknown league 'Foo'"):
        backtest_origins(prices, "Foo")
    with pytest.raises(ValueError, match="Unknown currencies in Sanctum: Divine Orbz"):
        run_backtest(prices, "Sanctum", backtest_origins(prices, "Sanctum")[:1], ["Divine Orbz"])
    with pytest.raises(ValueError, match="refit-every 0"):
        run_backtest(prices, "Sanctum", backtest_origins(prices, "Sanctum")[:1], ["Divine Orb"], refit_every=0)
    with pytest.raises(ValueError, match="no such directory"):
        run_backtest_cli(tmp_path / "nope", "Sanctum")

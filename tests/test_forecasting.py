"""Predictions on real data: the warehouse contract, calibrated intervals, each fallback, confidence, no champion."""

from __future__ import annotations

import math
from datetime import date, timedelta
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from conftest import SAMPLE
from poe_pipeline.features import FEATURE_COLUMNS, build_features, write_features
from poe_pipeline.forecasting import (
    BOOTSTRAP,
    CONFORMAL,
    CONTRACT_COLUMNS,
    FORECAST_GAPS_SCHEMA,
    LEAGUE_PRIOR_ROWS,
    LEFT_OUT_OF_RUN,
    PREDICTION_ERRORS_SQL,
    PREDICTIONS_SCHEMA,
    VOLATILITY,
    Calibration,
    Skip,
    confidence_score,
    forecast_gaps,
    league_adjustments,
    least_absolute_shrink,
    predict_league,
    prediction_interval,
    read_forecast_gaps,
    read_predictions,
    resolved_forecasts,
    write_forecast_gaps,
    write_predictions,
)
from poe_pipeline.lake import Lake, write_parquet_atomic
from poe_pipeline.leagues import league_calendar, training_leagues
from poe_pipeline.prices import daily_from_dump_rows, daily_prices_path, merge_daily_prices
from poe_pipeline.settings import get_profile
from poe_pipeline.sources.poe_ninja import read_dump
from poe_pipeline.tracking import ModelTracker, registered_model_name
from poe_pipeline.training import TrainRequest, train_currencies, train_globals
from poe_pipeline.warehouse import sync_views

LEAGUES = ("Sentinel", "Kalandra", "Sanctum")
MODELLED = "Awakened Sextant"
GLOBAL_ONLY = "Exalted Orb"  # no partition of its own
CONTRACT_TYPES = {
    "league": "VARCHAR", "currency": "VARCHAR", "origin_date": "DATE", "horizon_days": "INTEGER",
    "current_price": "DOUBLE", "predicted_price": "DOUBLE", "pred_lower": "DOUBLE", "pred_upper": "DOUBLE",
    "interval_level": "DOUBLE", "confidence": "DOUBLE", "model_version": "VARCHAR",
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A lake with three real leagues' prices and features, the global model of each horizon, and a partition
    champion per horizon for MODELLED (GLOBAL_ONLY has none: it is forecast by the global model alone)."""
    lake = Lake(tmp_path_factory.mktemp("forecast") / "lake")
    prices = merge_daily_prices(daily_from_dump_rows(
        pl.concat([read_dump(SAMPLE / f"{lg}.currency.csv.gz") for lg in LEAGUES])))
    for (league,), rows in prices.partition_by("league", as_dict=True).items():
        write_parquet_atomic(rows, daily_prices_path(lake, league))
    calendar = league_calendar(prices)
    features = build_features(prices, calendar)
    write_features(features, lake)
    globals_ = train_globals(lake, features, FEATURE_COLUMNS, (1, 3, 7), training_leagues(calendar, "Sanctum"),
                             "Sanctum", [MODELLED, GLOBAL_ONLY], get_profile("test"), {"dagster_run_id": "test"},
                             workers=1, progress=lambda _: None)
    assert all(g.result.trained and g.registration.promoted for g in globals_)
    parts = train_currencies(lake, [TrainRequest(MODELLED, h) for h in (1, 3, 7)], "Sanctum", "test",
                             {"dagster_run_id": "test"}, progress=lambda _: None)
    assert all(o.result.trained and o.registration.promoted for o in parts)
    return lake, prices, features, ModelTracker(lake)


def _views(lake: Lake) -> None:
    sync_views(lake)


def test_predictions_contract_in_duckdb_and_a_currency_without_partition_gets_the_global_forecast(world):
    lake, prices, _, tracker = world
    run = predict_league(lake, "Sanctum", [MODELLED, GLOBAL_ONLY, "Mirror of Calandra"], store=tracker)
    assert run.origin_date.isoformat() == "2023-04-04"  # the last day of Sanctum in the dump
    p = run.predictions.sort("currency", "horizon_days")
    assert p.select("currency", "horizon_days").rows() == [(c, h) for c in sorted([MODELLED, GLOBAL_ONLY])
                                                           for h in (1, 3, 7)]
    own = p.filter(pl.col("currency") == MODELLED)
    alone = p.filter(pl.col("currency") == GLOBAL_ONLY)
    assert (own["model_version"] == "1").all() and (alone["model_version"] == "global-v1").all()
    assert (own["global_model_version"] == "1").all() and (alone["global_model_version"] == "1").all()
    assert [(s.currency, s.horizon) for s in run.skipped] == [("Mirror of Calandra", h) for h in (1, 3, 7)]
    assert all("no price for Mirror of Calandra in Sanctum" in s.reason for s in run.skipped)

    write_predictions(lake, run.predictions)
    _views(lake)
    with duckdb.connect(str(lake.warehouse), read_only=True) as con:
        described = con.execute("DESCRIBE predictions").fetchall()
        rows = con.execute("SELECT currency, horizon_days, current_price, model_version FROM predictions "
                           "WHERE currency = ? ORDER BY horizon_days", [MODELLED]).fetchall()
        close = con.execute("SELECT price_chaos FROM daily_prices WHERE league = 'Sanctum' AND currency = ? "
                            "AND date = DATE '2023-04-04'", [MODELLED]).fetchone()[0]
    assert [(name, kind) for name, kind, *_ in described][: len(CONTRACT_COLUMNS)] == list(CONTRACT_TYPES.items())
    assert [r[1] for r in rows] == [1, 3, 7]
    assert all(r[2] == pytest.approx(close) for r in rows)  # the current price is the origin's real close


def test_rerunning_an_origin_replaces_its_file_and_keeps_other_currencies(world, tmp_path):
    lake, _, features, _ = world
    run = predict_league(lake, "Sanctum", [MODELLED], store=world[3])
    other = run.predictions.with_columns(pl.lit("Divine Orb").alias("currency"))  # a row set of another currency
    write_predictions(lake, pl.concat([run.predictions, other]))
    write_predictions(lake, run.predictions)  # a rerun restricted to one currency
    stored = read_predictions(lake, "Sanctum", run.origin_date)
    files = list((lake.root / "predictions" / "league=Sanctum").rglob("*.parquet"))
    assert len([f for f in files if "origin_date=2023-04-04" in str(f)]) == 1
    assert {MODELLED, "Divine Orb"} <= set(stored["currency"])
    assert (stored.group_by("currency").len()["len"] == 3).all()  # one row per horizon, nothing duplicated


def test_prediction_errors_view_joins_realised_prices(world):
    lake, prices, _, tracker = world
    run = predict_league(lake, "Sanctum", [MODELLED], origin=prices["date"].max() - timedelta(days=15),
                         store=tracker)
    write_predictions(lake, run.predictions)
    _views(lake)
    with duckdb.connect(str(lake.warehouse)) as con:
        con.execute(f"CREATE OR REPLACE TEMP VIEW prediction_errors AS {PREDICTION_ERRORS_SQL}")
        errors = con.sql("SELECT * FROM prediction_errors WHERE origin_date = ? ORDER BY horizon_days",
                         params=[run.origin_date]).pl()
    assert errors["horizon_days"].to_list() == [1, 3, 7]
    real = prices.filter((pl.col("league") == "Sanctum") & (pl.col("currency") == MODELLED))
    for r in errors.iter_rows(named=True):
        realised = real.filter(pl.col("date") == r["origin_date"] + timedelta(days=r["horizon_days"]))
        assert r["realized_price"] == pytest.approx(realised["price_chaos"].item())
        assert r["abs_log_error"] == pytest.approx(abs(math.log(r["realized_price"] / r["predicted_price"])))
        assert r["inside_interval"] == (r["pred_lower"] <= r["realized_price"] <= r["pred_upper"])


def test_intervals_contain_the_forecast_and_widen_with_the_horizon(world):
    lake, prices, _, tracker = world
    last = prices["date"].max()
    for days_back in (0, 9, 23, 41):
        run = predict_league(lake, "Sanctum", [MODELLED], origin=last - timedelta(days=days_back),
                             store=tracker)
        p = run.predictions.sort("horizon_days")
        assert p.height == 3
        assert (p["pred_lower"] < p["predicted_price"]).all() and (p["predicted_price"] < p["pred_upper"]).all()
        half = ((p["pred_upper"] / p["pred_lower"]).log() / 2).to_list()
        assert half[0] < half[1] < half[2], (run.origin_date, half)
        assert set(p["interval_method"]) == {CONFORMAL}
        assert (p["residual_count"] >= 15).all()  # out-of-fold residuals of its phase in the validation league
        assert ((p["confidence"] > 0) & (p["confidence"] < 1)).all()


def test_the_leagues_own_forecasts_that_came_true_scale_its_intervals():
    # 200 one-day forecasts whose errors were all twice their half-width, half of them already scaled by 2
    n = 200
    weight = n / (n + LEAGUE_PRIOR_ROWS)
    resolved = pl.DataFrame({
        "horizon_days": [1] * n, "predicted_logret": [0.01] * n, "actual_logret": [0.01 + 0.2] * n,
        "upper_logret": [0.01 + 0.1] * 100 + [0.01 + 0.2] * 100, "interval_scale": [1.0] * 100 + [2.0] * 100,
        "target_date": [date(2023, 1, 10)] * n,
    })
    wide = league_adjustments(resolved)[1]
    assert wide.resolved == wide.recent == n and wide.quantile == pytest.approx(2.0)
    assert wide.interval_scale == pytest.approx(2.0 ** weight)  # shrunk towards 1
    assert wide.point_shrink == 1.0  # the moves came in the forecast's direction, larger: never amplified
    assert league_adjustments(resolved.head(0)) == {}
    # errors inside their intervals narrow them; a file written before the column existed counts as scale 1
    calm = resolved.with_columns(pl.lit(0.01 + 0.05).alias("actual_logret")).drop("interval_scale")
    narrowed = league_adjustments(calm)[1]
    assert narrowed.quantile == pytest.approx(0.5)  # the 161st of 200 ratios: 100 of 0.25, then 100 of 0.5
    assert narrowed.interval_scale == pytest.approx(0.5 ** weight)


def test_the_interval_scale_follows_the_latest_week_of_forecasts_come_true():
    # 20 days of 30 one-day forecasts: calm for 17 days (errors half the half-width), then three times the half-width
    days = [date(2023, 1, 1) + timedelta(days=d) for d in range(20) for _ in range(30)]
    rough = [d >= date(2023, 1, 18) for d in days]
    resolved = pl.DataFrame({
        "horizon_days": [1] * 600, "target_date": days, "predicted_logret": [0.0] * 600,
        "actual_logret": [0.3 if r else 0.05 for r in rough], "upper_logret": [0.1] * 600,
    })
    adjustment = league_adjustments(resolved)[1]
    assert adjustment.resolved == 600 and adjustment.recent == 7 * 30  # targets of Jan 14-20
    assert adjustment.quantile == pytest.approx(3.0)  # 90 rough of 210; over all 20 days it would be 0.5 (510 calm)
    assert adjustment.interval_scale == pytest.approx(3.0 ** (210 / (210 + LEAGUE_PRIOR_ROWS)))


def test_a_league_where_the_models_keep_missing_moves_its_forecasts_towards_no_change():
    # the least absolute error multiplier: a weighted median of actual / model, clipped to [0, 1]
    assert least_absolute_shrink(np.array([0.1, 0.1, 0.1]), np.array([0.05, 0.04, 0.06])) == pytest.approx(0.5)
    assert least_absolute_shrink(np.array([0.1, -0.2]), np.array([-0.1, 0.2])) == 0.0  # always the wrong way
    assert least_absolute_shrink(np.array([0.0, 0.0]), np.array([0.3, -0.1])) == 1.0  # nothing to learn from
    # |model| weighs: the big forecast that came half true outweighs two small ones that came to nothing
    assert least_absolute_shrink(np.array([0.3, 0.01, 0.01]), np.array([0.15, 0.0, 0.0])) == pytest.approx(0.5)
    brute = np.linspace(0, 1, 10001)
    rng = np.random.default_rng(3)
    model, actual = rng.normal(0, 0.05, 300), rng.normal(0, 0.05, 300) + 0.3 * rng.normal(0, 0.05, 300)
    best = brute[np.argmin([np.abs(actual - b * model).sum() for b in brute])]
    assert least_absolute_shrink(model, actual) == pytest.approx(best, abs=1e-3)

    n = 90  # three-day forecasts: the models said +10 %, the price did not move
    resolved = pl.DataFrame({"horizon_days": [3] * n, "predicted_logret": [0.05] * n, "model_logret": [0.1] * n,
                             "actual_logret": [0.0] * n, "upper_logret": [0.15] * n,
                             "target_date": [date(2023, 1, 10)] * n})
    adjustment = league_adjustments(resolved, shrink_prior_rows=LEAGUE_PRIOR_ROWS)[3]
    assert adjustment.best_shrink == 0.0
    assert adjustment.point_shrink == pytest.approx(1 - n / (n + LEAGUE_PRIOR_ROWS))
    # by default the shrink is measured, not applied (it no longer earned its place on eight leagues)
    measured = league_adjustments(resolved)[3]
    assert measured.best_shrink == 0.0 and measured.point_shrink == 1.0


def test_only_forecasts_whose_day_has_come_and_was_observed_are_resolved():
    day = date(2023, 1, 10)
    predictions = pl.DataFrame({
        "league": ["L"] * 3, "currency": ["A", "A", "B"], "origin_date": [day - timedelta(days=3)] * 3,
        "horizon_days": [1, 7, 1], "current_price": [2.0, 2.0, 5.0],
    })
    prices = pl.DataFrame({"league": ["L", "L"], "currency": ["A", "A"],
                           "date": [day - timedelta(days=2), day + timedelta(days=4)], "price_chaos": [4.0, 9.0]})
    resolved = resolved_forecasts(predictions, prices, day)
    # A at 1 day came true (price doubled); A at 7 days is after the day; B's target day was never observed
    assert resolved.select("currency", "horizon_days").rows() == [("A", 1)]
    assert resolved["actual_logret"][0] == pytest.approx(math.log(2.0))


def test_a_league_whose_forecasts_missed_gets_wider_intervals(moved_lake, world):
    import shutil

    from poe_pipeline.forecasting import predictions_dir

    _, prices, _, _ = world
    shutil.rmtree(predictions_dir(moved_lake), ignore_errors=True)  # other tests stored some
    store = ModelTracker(moved_lake)
    last = prices["date"].max()
    plain = predict_league(moved_lake, "Sanctum", [MODELLED, GLOBAL_ONLY], store=store)
    assert plain.league_adjustments == {} and (plain.predictions["interval_scale"] == 1.0).all()
    assert (plain.predictions["predicted_logret"] == plain.predictions["model_logret"]).all()
    for back in range(8, 31):  # earlier forecasts, stored with intervals far too narrow for what came
        past = predict_league(moved_lake, "Sanctum", [MODELLED, GLOBAL_ONLY], origin=last - timedelta(days=back),
                              store=store).predictions
        write_predictions(moved_lake, past.with_columns(
            (pl.col("predicted_logret") + (pl.col("upper_logret") - pl.col("predicted_logret")) / 10)
            .alias("upper_logret")))
    widened = predict_league(moved_lake, "Sanctum", [MODELLED, GLOBAL_ONLY], store=store)
    assert set(widened.league_adjustments) == {1, 3, 7}
    for h, adjustment in widened.league_adjustments.items():
        assert adjustment.resolved >= 30 and adjustment.recent >= 14 and adjustment.quantile > 5, (h, adjustment)
        weight = adjustment.recent / (adjustment.recent + LEAGUE_PRIOR_ROWS)  # the latest week, two currencies
        assert adjustment.interval_scale == pytest.approx(adjustment.quantile ** weight) and weight > 0.1
    p = widened.predictions
    assert (p["point_shrink"] == 1.0).all() and (p["predicted_logret"] == p["model_logret"]).all()
    half = lambda p: (p["upper_logret"] - p["predicted_logret"]).to_numpy()  # noqa: E731
    one_day = pl.col("horizon_days") == 1
    assert half(widened.predictions.filter(one_day)) == pytest.approx(
        half(plain.predictions.filter(one_day)) * widened.league_adjustments[1].interval_scale)
    assert set(PREDICTIONS_SCHEMA) == set(read_predictions(moved_lake).columns)


@pytest.fixture(scope="module")
def real_residuals(world):
    """The 1-day partition's real out-of-fold residuals with the volatility of each residual's day."""
    from poe_pipeline.currency_model import RESIDUALS_FILE

    lake, _, features, tracker = world
    _, directory = tracker.champion(registered_model_name(MODELLED, 1))
    residuals = pl.read_parquet(directory / RESIDUALS_FILE)
    vols = features.filter(pl.col("currency") == MODELLED).select(
        "league", "date", pl.col("realized_vol_14").pow(2).add(pl.col("trend_slope_14").fill_null(0).pow(2))
        .sqrt().alias("vol"))
    joined = residuals.join(vols, on=["league", "date"], how="left")
    return joined["residual"].to_numpy(), joined["vol"].to_numpy()


@pytest.mark.parametrize(("size", "method"), [(20, CONFORMAL), (8, BOOTSTRAP), (2, VOLATILITY)])
def test_each_fallback_path(real_residuals, size, method):
    residuals, vols = real_residuals
    rng = np.random.default_rng(size)
    pick = rng.choice(len(residuals), size=size, replace=False)
    calibration = Calibration.from_arrays(residuals[pick], vols[pick])
    point = 0.013
    estimates = [prediction_interval(point, calibration, current_vol=0.02, horizon=h) for h in (1, 3, 7)]
    for e in estimates:
        assert e.method == method and e.residual_count == size
        assert e.lower < point < e.upper and math.isfinite(e.half_width)
    again = prediction_interval(point, calibration, current_vol=0.02, horizon=1)
    assert again == estimates[0]  # the bootstrap is seeded: reruns agree
    if method == VOLATILITY:
        # no residuals to learn from: a normal interval, 1.5x inflated, growing with sqrt(horizon)
        assert estimates[0].half_width == pytest.approx(1.5 * 1.2815516 * 0.02, rel=1e-6)
        assert estimates[2].half_width / estimates[0].half_width == pytest.approx(math.sqrt(7))
    else:
        # residual-based widths come from the residuals alone; they lie within the scaled residuals' range
        scaled = np.abs(calibration.scores) * 0.02
        assert scaled.min() <= estimates[0].half_width <= scaled.max()
    if method == CONFORMAL:  # the split-conformal rank: ceil(21 x 0.8) = 17th smallest of 20
        assert estimates[0].half_width == pytest.approx(np.sort(np.abs(calibration.scores))[16] * 0.02)


def test_conformal_intervals_cover_held_out_real_residuals_at_their_level(real_residuals):
    residuals, vols = real_residuals
    rng = np.random.default_rng(7)
    order = rng.permutation(len(residuals))
    calib, held = order[: len(order) // 2], order[len(order) // 2:]
    calibration = Calibration.from_arrays(residuals[calib], vols[calib])
    inside = []
    for i in held:
        e = prediction_interval(0.0, calibration, current_vol=vols[i], horizon=1, level=0.8)
        inside.append(e.lower <= residuals[i] <= e.upper)
    assert 0.7 <= np.mean(inside) <= 0.92, np.mean(inside)
    # and an 80 % interval is narrower than a 95 % one
    e80 = prediction_interval(0.0, calibration, 0.02, 1, 0.8)
    e95 = prediction_interval(0.0, calibration, 0.02, 1, 0.95)
    assert e80.half_width < e95.half_width


def test_a_wild_currency_gets_a_wider_interval_than_a_calm_one(real_residuals, world):
    residuals, vols = real_residuals
    features = world[2]
    last = features.filter((pl.col("league") == "Sanctum") & (pl.col("date") == pl.col("date").max()))
    vol = dict(zip(last["currency"], last["realized_vol_14"], strict=True))
    calm, wild = vol["Divine Orb"], vol["Orb of Annulment"]
    assert wild > 3 * calm  # real volatilities on Sanctum's last day
    calibration = Calibration.from_arrays(residuals, vols)
    a = prediction_interval(0.0, calibration, calm, 1)
    b = prediction_interval(0.0, calibration, wild, 1)
    assert b.half_width > 2 * a.half_width
    # above the floors, the width is proportional to the volatility
    lo, hi = np.nanquantile(vols, [0.4, 0.95])
    ratio = prediction_interval(0.0, calibration, hi, 1).half_width / prediction_interval(0.0, calibration, lo, 1)\
        .half_width
    assert ratio == pytest.approx(hi / lo)
    # and a flat series (no volatility at all) still gets an interval of a quarter of its usual width or more
    flat = prediction_interval(0.0, calibration, 0.0, 1)
    typical = prediction_interval(0.0, calibration, calibration.reference_vol, 1)
    assert flat.half_width == pytest.approx(typical.half_width / 4)


def test_confidence_penalties():
    base = dict(skill=0.1, r2=0.2, half_width=0.03)
    by_n = [confidence_score(**base, sample_size=n) for n in (3, 7, 20, 60, 500)]
    assert by_n == sorted(by_n) and len(set(by_n)) == 5
    assert by_n[0] / by_n[-1] == pytest.approx(0.3) and by_n[3] / by_n[-1] == pytest.approx(0.9)
    full = confidence_score(**base, sample_size=500)
    assert confidence_score(**base, sample_size=500, days_since_observed=7) == pytest.approx(full / math.e)
    assert confidence_score(0.3, 0.3, 0.03, 500) > full > confidence_score(-0.3, -0.3, 0.03, 500)
    assert confidence_score(0.1, 0.2, 0.30, 500) < full  # a wide interval is less useful
    assert 0.0 <= confidence_score(None, None, 5.0, 0, days_since_observed=14) <= confidence_score(**base,
                                                                                                 sample_size=0)


def test_a_broken_champion_is_skipped_with_its_reason(world, tmp_path):
    lake, _, _, tracker = world
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "currency_model.json").write_text("{not json")

    class BrokenAt3Days:
        def champion(self, name):
            return ("9", broken) if name == registered_model_name(MODELLED, 3) else tracker.champion(name)

        def version_dir(self, name, version):
            return tracker.version_dir(name, version)

    run = predict_league(lake, "Sanctum", [MODELLED], store=BrokenAt3Days())
    assert sorted(run.predictions["horizon_days"].to_list()) == [1, 7]
    assert len(run.skipped) == 1 and "failed to load" in run.skipped[0].reason and str(broken) in run.skipped[0].reason


def test_unknown_league_names_the_fix(world):
    lake = world[0]
    with pytest.raises(ValueError, match="Unknown league 'Foo'"):
        predict_league(lake, "Foo", [MODELLED], store=world[3])
    assert Path(lake.features).is_dir()


def test_a_champion_loaded_with_mlflow_forecasts_what_the_predictions_asset_wrote(world, monkeypatch):
    """An ML engineer's one line: ``mlflow.pyfunc.load_model("models:/<name>@champion").predict(features rows)``
    gives the predicted prices the pipeline wrote (the partition goes through its global model version)."""
    import mlflow

    lake, _, features, tracker = world
    run = predict_league(lake, "Sanctum", [MODELLED], store=tracker)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.uri)
    rows = features.filter((pl.col("league") == "Sanctum") & (pl.col("currency") == MODELLED)
                           & (pl.col("date") == run.origin_date))
    for h in (1, 3, 7):
        model = mlflow.pyfunc.load_model(f"models:/{registered_model_name(MODELLED, h)}@champion")
        out = model.predict(rows.to_pandas())
        written = run.predictions.filter(pl.col("horizon_days") == h)
        assert out["predicted_price"].to_numpy() == pytest.approx(written["predicted_price"].to_numpy(), rel=1e-6)
    # the signature declares the integer features as doubles (ints are still taken, as above): logging a model
    # does not warn once per model that integer columns cannot hold a missing value
    inputs = {c.name: c.type.name for c in model.metadata.get_input_schema().inputs}
    assert inputs["league_day"] == inputs["day_of_week"] == inputs["price_chaos"] == "double"


@pytest.fixture
def moved_lake(world, tmp_path, monkeypatch):
    """A copy of the world's lake at another path, as after ``mv data_lake elsewhere``: MLflow's records still
    name the old place, and every model file must be read from the new one. Fresh model cache."""
    import shutil

    from poe_pipeline import forecasting

    monkeypatch.setattr(forecasting, "DEFAULT_CACHE", forecasting.ModelCache())
    lake = Lake(tmp_path / "moved")
    shutil.copytree(world[0].root, lake.root)
    return lake


def test_a_moved_lake_reads_its_models_where_they_are_now(moved_lake):
    run = predict_league(moved_lake, "Sanctum", [MODELLED, GLOBAL_ONLY], store=ModelTracker(moved_lake))
    assert run.predictions.height == 6 and not run.skipped


def _assert_3d_refused_and_alerted(run, lake, file_name: str) -> None:
    """The damaged 3d global model is refused by its checksums, the other horizons forecast, and the predictions
    asset turns the skips into one alert (stored in the lake, posted to the webhook when one is set)."""
    import dagster as dg

    from poe_pipeline.assets.forecasts import _alert_broken_models
    from poe_pipeline.monitoring import read_alerts
    from poe_pipeline.resources import LakeResource, MonitoringResource

    assert sorted(set(run.predictions["horizon_days"].to_list())) == [1, 7]
    assert {(s.currency, s.horizon) for s in run.skipped} == {(MODELLED, 3), (GLOBAL_ONLY, 3)}
    assert all(file_name in s.reason and "checksums" in s.reason for s in run.skipped)
    _alert_broken_models(dg.build_asset_context(), run, LakeResource(root=str(lake.root)), MonitoringResource())
    (alert,) = read_alerts(lake)
    assert alert["kind"] == "model_load_failure" and alert["details"]["models"] == ["global model poe-global-3d"]


def test_a_truncated_model_file_is_refused_and_the_other_horizons_forecast(moved_lake, world):
    tracker = ModelTracker(moved_lake)
    _, directory = tracker.champion("poe-global-3d")
    assert directory.is_relative_to(moved_lake.root)  # the copy's files, not the original's
    model_file = next(directory / f for f in ("lightgbm.txt", "xgboost.ubj", "random_forest.joblib")
                      if (directory / f).exists())  # the models the ensemble weights
    model_file.write_bytes(model_file.read_bytes()[:1000])  # cut short, as by a full disk
    run = predict_league(moved_lake, "Sanctum", [MODELLED, GLOBAL_ONLY], store=tracker)
    _assert_3d_refused_and_alerted(run, moved_lake, model_file.name)
    _, original = world[3].champion("poe-global-3d")  # the lake it was copied from is untouched
    assert (original / model_file.name).stat().st_size > 1000


def test_a_registered_version_pointing_outside_the_lake_is_never_loaded(world, tmp_path):
    """A pickle is code: a model version whose source lies outside the lake's artifact root is refused, even when
    its recorded checksums match the planted files."""
    from poe_pipeline.tracking import CHECKSUMS_TAG, UntrustedModel, checksums

    tracker = world[3]
    planted = tmp_path / "elsewhere" / "artifacts" / "model"
    planted.mkdir(parents=True)
    (planted / "random_forest.joblib").write_bytes(b"a pickle that would run code")
    version = tracker.client.create_model_version(
        "poe-global-7d", source=planted.parents[1].as_uri(),
        tags={CHECKSUMS_TAG: __import__("json").dumps(checksums(planted))})
    with pytest.raises(UntrustedModel, match="outside the lake's artifact root"):
        tracker.version_dir("poe-global-7d", version.version)


# --- speed without a change of behaviour: one registry query, a per-process cache, verified checksums kept --------


def _rows(run) -> pl.DataFrame:
    return run.predictions.drop("created_at")


class OneByOne:
    """The registry read as before the batching: MLflow's client, one ``get_model_version_by_alias`` per model."""

    uri = "one lookup per model"

    def __init__(self, tracker: ModelTracker):
        self.tracker = tracker

    def champion(self, name):
        version = self.tracker.champion_version(name)
        return None if version is None else (str(version.version), self.tracker.verified(name, version))

    def version_dir(self, name, version):
        return self.tracker.verified(name, self.tracker.client.get_model_version(name, str(version)))


def test_one_registry_query_and_the_cache_forecast_what_one_lookup_per_model_did(world, monkeypatch):
    from poe_pipeline import forecasting, tracking

    lake, _, _, tracker = world
    currencies = [MODELLED, GLOBAL_ONLY, "Mirror of Calandra"]
    forecasting.clear_caches()
    before = predict_league(lake, "Sanctum", currencies, store=OneByOne(tracker))
    queries = []
    query = tracking._query_versions
    monkeypatch.setattr(tracking, "_query_versions", lambda *a: queries.append(a[1]) or query(*a))
    forecasting.clear_caches()
    cold = predict_league(lake, "Sanctum", currencies, store=tracker)
    warm = predict_league(lake, "Sanctum", currencies, store=tracker)
    assert before.predictions.height == 6
    assert_frame_equal(_rows(cold), _rows(before), check_exact=True)
    assert_frame_equal(_rows(warm), _rows(before), check_exact=True)
    assert cold.skipped == warm.skipped == before.skipped
    assert len(queries) == 2 and len(queries[0]) == 3 + 3 * len(currencies)  # one query per forecast, every name


def test_the_registry_query_agrees_with_mlflow(world):
    tracker = world[3]
    names = [f"poe-global-{h}d" for h in (1, 3, 7)] + [registered_model_name(c, h) for c in (MODELLED, GLOBAL_ONLY)
                                                       for h in (1, 3, 7)]
    found = tracker.champion_versions(names)
    for name in names:
        mlflow_version = tracker.champion_version(name)
        if mlflow_version is None:
            assert name not in found
            continue
        mine = found[name]
        assert (mine.version, mine.source) == (str(mlflow_version.version), mlflow_version.source)
        assert mine.tags["poe.checksums"] == mlflow_version.tags["poe.checksums"]
        assert tracker.version_dir(name, mine.version) == tracker.champion(name)[1]
    assert set(found) == set(names[:6])  # the global models and MODELLED's partitions; GLOBAL_ONLY has none
    with pytest.raises(LookupError, match="not found"):
        tracker.version_dir("poe-global-1d", "999")


def test_vectorised_scales_and_cached_quantiles_are_the_scalar_ones(real_residuals):
    from poe_pipeline.forecasting import (
        bootstrap_quantile,
        conformal_quantile,
        volatility_scale,
        volatility_scales,
    )

    residuals, vols = real_residuals
    odd = np.array([np.nan, -0.1, 0.0, np.inf, 1e-9, 0.004, 0.3])
    for values in (vols, odd):
        for reference in (float(np.nanmedian(vols)), float("nan"), None, 0.0):
            expected = np.array([volatility_scale(v, reference) for v in values])
            assert np.array_equal(volatility_scales(values, reference), expected)
    phases = np.array(["early", "mid", "late"])[np.arange(len(residuals)) % 3]
    calibration = Calibration.from_arrays(residuals, vols, phases)
    for phase in (None, "early", "mid", "late"):
        for level in (0.5, 0.8, 0.95):
            scale = volatility_scale(0.02, calibration.reference_vol)
            old = conformal_quantile(np.abs(calibration.for_phase(phase)), level) * scale
            assert prediction_interval(0.0, calibration, 0.02, 1, level, phase=phase).half_width == old
    small = Calibration.from_arrays(residuals[:9], vols[:9])
    old = bootstrap_quantile(np.abs(small.for_phase(None)), 0.8, seed=3) * volatility_scale(0.02, small.reference_vol)
    assert prediction_interval(0.0, small, 0.02, 1, 0.8, seed=3).half_width == old


def _new_version(tracker: ModelTracker, name: str) -> str:
    """A new registered version of ``name`` with the champion's files, made champion (as a promotion does)."""
    from poe_pipeline.tracking import CHAMPION, CHECKSUMS_TAG

    current = tracker.champion_version(name)
    version = tracker.client.create_model_version(name, source=current.source,
                                                  tags={CHECKSUMS_TAG: current.tags[CHECKSUMS_TAG]})
    tracker.client.set_registered_model_alias(name, CHAMPION, version.version)
    return str(version.version)


def test_a_new_champion_is_picked_up_by_a_warm_cache(moved_lake):
    from poe_pipeline import forecasting

    tracker = ModelTracker(moved_lake)
    first = predict_league(moved_lake, "Sanctum", [MODELLED, GLOBAL_ONLY], store=tracker)
    assert set(first.predictions["model_version"]) == {"1", "global-v1"}
    partition = _new_version(tracker, registered_model_name(MODELLED, 3))
    global_7d = _new_version(tracker, "poe-global-7d")
    assert partition != "1" and global_7d != "1"
    again = predict_league(moved_lake, "Sanctum", [MODELLED, GLOBAL_ONLY], store=tracker)
    versions = {(r["currency"], r["horizon_days"]): (r["model_version"], r["global_model_version"])
                for r in again.predictions.iter_rows(named=True)}
    assert versions == {
        (MODELLED, 1): ("1", "1"), (MODELLED, 3): (partition, "1"),
        (MODELLED, 7): ("1", "1"),  # a partition forecasts through the global version it was built on
        (GLOBAL_ONLY, 1): ("global-v1", "1"), (GLOBAL_ONLY, 3): ("global-v1", "1"),
        (GLOBAL_ONLY, 7): (f"global-v{global_7d}", global_7d),
    }
    same_files = ["predicted_price", "pred_lower", "pred_upper", "confidence"]
    assert_frame_equal(again.predictions.select(same_files), first.predictions.select(same_files), check_exact=True)
    # the replaced 3d partition is forgotten; global 7d v1 stays while MODELLED's 7d partition forecasts through it
    assert forecasting.DEFAULT_CACHE.held() == {
        *{(registered_model_name(MODELLED, h), v) for h, v in ((1, "1"), (3, partition), (7, "1"))},
        ("poe-global-1d", "1"), ("poe-global-3d", "1"), ("poe-global-7d", "1"), ("poe-global-7d", global_7d)}


def test_a_warm_cache_forgets_the_global_versions_no_kept_model_forecasts_through():
    from types import SimpleNamespace

    from poe_pipeline.forecasting import ModelCache

    cache = ModelCache()
    cache._globals = {("lake", "poe-global-7d", v): SimpleNamespace() for v in ("1", "2", "3")}
    cache._globals[("other lake", "poe-global-7d", "1")] = SimpleNamespace()
    cache._partitions = {("lake", "poe-divine-orb-7d", "4"): SimpleNamespace(horizon=7, global_version="2")}
    cache.forget_superseded({("lake", "poe-global-7d", "3")})
    assert cache.held() == {("poe-global-7d", "3"), ("poe-global-7d", "2"), ("poe-global-7d", "1"),
                            ("poe-divine-orb-7d", "4")}  # v2 through the partition, v1 of the other lake
    assert ("lake", "poe-global-7d", "1") not in cache._globals
    cache.forget_superseded({("lake", "poe-divine-orb-7d", "5"), ("lake", "poe-global-7d", "3")})
    assert sorted(k for k in cache._globals if k[0] == "lake") == [("lake", "poe-global-7d", "3")]
    assert not cache._partitions


def test_a_model_file_changed_after_a_warm_forecast_is_refused(moved_lake, monkeypatch):
    """Verified checksums are kept per process only while no file changed: a file rewritten in place with its size
    and modification time restored is still hashed again, and refused; so is a missing one."""
    import os

    from poe_pipeline import tracking

    hashed = []
    real_checksums = tracking.checksums
    monkeypatch.setattr(tracking, "checksums", lambda d: hashed.append(d) or real_checksums(d))
    tracker = ModelTracker(moved_lake)
    currencies = [MODELLED, GLOBAL_ONLY]
    monkeypatch.setattr(tracking, "_RECENT_S", 1e9)  # every file "changed just now": never trusted from the cache
    predict_league(moved_lake, "Sanctum", currencies, store=tracker)
    predict_league(moved_lake, "Sanctum", currencies, store=tracker)
    assert len(hashed) == 2 * 6  # 3 global models and 3 partitions, hashed by each forecast
    monkeypatch.setattr(tracking, "_RECENT_S", 0.0)
    hashed.clear()
    first = predict_league(moved_lake, "Sanctum", currencies, store=tracker)
    warm = predict_league(moved_lake, "Sanctum", currencies, store=tracker)
    assert len(hashed) == 6 and warm.predictions.height == 6  # the second forecast hashed nothing
    assert_frame_equal(_rows(warm), _rows(first), check_exact=True)

    _, directory = tracker.champion("poe-global-3d")
    model_file = next(directory / f for f in ("lightgbm.txt", "xgboost.ubj", "random_forest.joblib")
                      if (directory / f).exists())
    before = model_file.stat()
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    model_file.write_bytes(bytes(data))
    os.utime(model_file, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the old modification time
    run = predict_league(moved_lake, "Sanctum", currencies, store=tracker)
    _assert_3d_refused_and_alerted(run, moved_lake, model_file.name)

    _, partition = tracker.champion(registered_model_name(MODELLED, 7))
    (partition / "currency_model.json").unlink()
    run = predict_league(moved_lake, "Sanctum", currencies, store=tracker)
    assert {(s.currency, s.horizon) for s in run.skipped} == {(MODELLED, 3), (GLOBAL_ONLY, 3), (MODELLED, 7)}
    (missing,) = [s for s in run.skipped if s.horizon == 7]
    assert "currency_model.json" in missing.reason and "checksums" in missing.reason


def test_new_features_give_new_origin_rows_in_a_warm_process(moved_lake, monkeypatch):
    from poe_pipeline import tracking
    from poe_pipeline.features import feature_path

    monkeypatch.setattr(tracking, "_RECENT_S", 0.0)
    tracker = ModelTracker(moved_lake)
    first = predict_league(moved_lake, "Sanctum", [MODELLED], store=tracker)
    path = feature_path(moved_lake, "Sanctum")
    shorter = pl.read_parquet(path).filter(pl.col("date") < first.origin_date)
    write_parquet_atomic(shorter, path)
    again = predict_league(moved_lake, "Sanctum", [MODELLED], store=tracker)
    assert again.origin_date == shorter["date"].max() < first.origin_date


def test_forecasting_from_the_local_registry_never_imports_mlflow(world):
    """A cold start pays for the model libraries, not for importing MLflow and its SQL store, nor Dagster."""
    import os
    import subprocess
    import sys

    code = ("import sys; from poe_pipeline.forecasting import predict_league; from poe_pipeline.lake import Lake; "
            "from poe_pipeline.tracking import ModelTracker; lake = Lake(sys.argv[1]); "
            f"run = predict_league(lake, 'Sanctum', [{MODELLED!r}, {GLOBAL_ONLY!r}], store=ModelTracker(lake)); "
            "assert run.predictions.height == 6, run.skipped; "
            "print(sorted(m for m in ('mlflow', 'dagster') if m in sys.modules))")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code, str(world[0].root)], capture_output=True, text=True,
                         env=env, timeout=300, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_a_league_s_launch_week_calibrates_only_the_launch_week_s_intervals():
    from poe_pipeline.forecasting import interval_phase

    # one currency's residuals over three leagues' first 30 days: wild in the launch week (days 0-6), calm after
    days = [(league, date(2023, 1, 1) + timedelta(days=d), d) for league in ("A", "B", "C") for d in range(30)]
    rng = np.random.default_rng(7)
    residuals = pl.DataFrame({
        "league": [lg for lg, _, _ in days], "date": [t for _, t, _ in days],
        "residual": [rng.normal(0, 0.5 if d < 7 else 0.02) for _, _, d in days]})
    history = pl.DataFrame({
        "league": [lg for lg, _, _ in days], "currency": "Chaos", "date": [t for _, t, _ in days],
        "league_day": [d for _, _, d in days], "realized_vol_14": 0.02, "trend_slope_14": 0.0})
    calibration = Calibration.from_residual_frame(residuals, history.drop("currency"))
    assert [interval_phase(d) for d in (0, 6, 7, 20, 21, 56)] == ["launch", "launch", "early", "early", "mid", "late"]
    launch = prediction_interval(0.0, calibration, 0.02, 1, 0.8, phase=interval_phase(3)).half_width
    day_10 = prediction_interval(0.0, calibration, 0.02, 1, 0.8, phase=interval_phase(10)).half_width
    # days 7-20 hold 42 calm residuals: their 80 % quantile, not one stretched by the launch week's
    assert day_10 < 0.04 < 0.3 < launch


def test_every_pair_of_the_most_liquid_currencies_without_a_forecast_says_why(tmp_path):
    """The league's 30 most liquid currencies are promised a forecast at every horizon from league day 7: each pair
    that has none is listed with the first reason that applies; a skipped pair of any other currency too."""
    universe = pl.DataFrame({
        "currency": ["Divine Orb", "Orb of Alteration", "Chromatic Orb", "Regal Orb", "Vaal Orb", "Mirror Shard",
                     "Orb of Fusing"],
        "eligible": [True, True, True, False, True, True, True],
        "reason": ["eligible: one of the 30 most liquid currencies of the league"] * 3
        + ["3 days in Sanctum (needs 7)", "eligible", "eligible", "eligible"],
        "liquidity_rank": [1, 2, 3, 4, 31, 40, 41],
    }, schema_overrides={"liquidity_rank": pl.UInt32})
    stored = pl.DataFrame({"currency": ["Divine Orb"] * 3 + ["Orb of Alteration"] * 2 + ["Vaal Orb"] * 2
                           + ["Mirror Shard"] * 3, "horizon_days": [1, 3, 7, 1, 3, 3, 7, 1, 3, 7]},
                          schema_overrides={"horizon_days": pl.Int32})
    skipped = [Skip("Orb of Alteration", 7, "champion poe-orb-of-alteration-7d failed to load: truncated"),
               Skip("Vaal Orb", 1, "no price for Vaal Orb in Sanctum on 2023-04-04 or the 14 days before"),
               Skip("Hinekora's Lock", 7, "no champion model poe-global-7d: train global_models first")]
    chosen = ["Divine Orb", "Orb of Alteration", "Vaal Orb", "Mirror Shard"]  # a run's --currencies
    gaps = forecast_gaps(stored, skipped, universe, chosen, "Sanctum", date(2023, 4, 4), horizons=(1, 3, 7))
    assert gaps.schema == FORECAST_GAPS_SCHEMA
    by_pair = {(r["currency"], r["horizon_days"]): r["reason"] for r in gaps.iter_rows(named=True)}
    assert by_pair == {
        ("Orb of Alteration", 7): "champion poe-orb-of-alteration-7d failed to load: truncated",
        **{("Chromatic Orb", h): LEFT_OUT_OF_RUN for h in (1, 3, 7)},
        **{("Regal Orb", h): "not eligible: 3 days in Sanctum (needs 7) (view currency_universe)" for h in (1, 3, 7)},
        ("Vaal Orb", 1): "no price for Vaal Orb in Sanctum on 2023-04-04 or the 14 days before",
        ("Hinekora's Lock", 7): "no champion model poe-global-7d: train global_models first",
        **{("Hinekora's Lock", h): "not eligible: not seen in Sanctum (view currency_universe)" for h in (1, 3)},
    }  # Divine Orb and Mirror Shard are forecast; Orb of Fusing is neither among the 30 nor chosen
    assert gaps["liquidity_rank"].to_list() == [2, 3, 3, 3, 4, 4, 4, 31, None, None, None]  # the most liquid first
    lake = Lake(tmp_path)
    assert read_forecast_gaps(lake, "Sanctum", date(2023, 4, 4)) is None  # not recorded
    write_forecast_gaps(lake, gaps, "Sanctum", date(2023, 4, 4))
    assert_frame_equal(read_forecast_gaps(lake, "Sanctum", date(2023, 4, 4)), gaps)
    nothing = forecast_gaps(stored.clear(), [], universe.head(1), ["Divine Orb"], "Sanctum", date(2023, 4, 4))
    assert nothing["reason"].to_list() == ["no forecast stored for this origin: see the predictions asset's log"] * 3

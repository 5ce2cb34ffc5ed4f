"""The global model and its currency partitions on a small real slice: walk-forward league folds, nested scores,
warm refits, partial pooling, MLflow registration and promotion."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from conftest import SAMPLE
from poe_pipeline.currency_model import (
    HOLDOUT_SCOPE,
    MIN_OWN_ROWS,
    PRIOR_ROWS,
    TUNING_FOLDS_SCOPE,
    best_scale,
    pooled_scale,
    train_currency,
)
from poe_pipeline.features import FEATURE_COLUMNS, build_features
from poe_pipeline.global_model import OOF_FILE, GlobalValidation, liquid_by_league, pooled_rows, train_global
from poe_pipeline.leagues import league_calendar, training_leagues
from poe_pipeline.modeling import (
    ANCHOR_INPUT,
    Ensemble,
    ModelData,
    anchor,
    forest_predict,
    hash_rows,
    league_folds,
    model_inputs,
    validation_weights,
)
from poe_pipeline.names import slug
from poe_pipeline.prices import daily_from_dump_rows, merge_daily_prices
from poe_pipeline.settings import get_profile
from poe_pipeline.sources.poe_ninja import read_dump
from poe_pipeline.tracking import ModelTracker, global_model_name, registered_model_name

LEAGUES = ("Archnemesis", "Sentinel", "Kalandra", "Sanctum")
PROFILE = get_profile("test")
FORECAST = ["Divine Orb", "Orb of Fusing", "Chromatic Orb", "Fracturing Orb", "Awakened Sextant"]


@pytest.fixture(scope="module")
def real():
    prices = merge_daily_prices(daily_from_dump_rows(
        pl.concat([read_dump(SAMPLE / f"{lg}.currency.csv.gz") for lg in LEAGUES])))
    calendar = league_calendar(prices)
    order = training_leagues(calendar, "Sanctum")
    features = build_features(prices, calendar)
    return features, order, pooled_rows(features, order, "Sanctum", FORECAST, pool_size=30)


@pytest.fixture(scope="module")
def global_3d(real, tmp_path_factory):
    _, order, rows = real
    return train_global(rows, FEATURE_COLUMNS, 3, order, "Sanctum", PROFILE, tmp_path_factory.mktemp("global") / "3d")


def test_the_pool_is_each_past_leagues_most_liquid_plus_the_forecast_currencies(real):
    features, order, rows = real
    pools = liquid_by_league(features, order[:-1], 30)
    assert set(pools) == {"Archnemesis", "Sentinel", "Kalandra"} and all(len(p) == 30 for p in pools.values())
    in_pool = rows.filter(pl.col("in_pool"))
    for league, currencies in pools.items():
        assert set(in_pool.filter(pl.col("league") == league)["currency"]) == set(currencies)
    assert set(in_pool.filter(pl.col("league") == "Sanctum")["currency"]) == set(FORECAST)
    # a forecast currency outside a past league's pool is there only to be predicted out of fold
    extra = rows.filter(~pl.col("in_pool"))
    assert extra.height > 0 and set(extra["currency"]) <= set(FORECAST)


def test_the_pooled_rows_of_a_scan_are_those_of_the_frame(real, tmp_path):
    features, order, rows = real
    features.write_parquet(tmp_path / "features.parquet")
    query = pooled_rows(pl.scan_parquet(tmp_path / "features.parquet"), order, "Sanctum", FORECAST, pool_size=30)
    assert isinstance(query, pl.LazyFrame)
    keys = ["league", "currency", "date"]
    assert_frame_equal(query.collect().sort(keys), rows.sort(keys))


@pytest.mark.parametrize("horizon", [1, 7])
@pytest.mark.parametrize("n_folds", [1, 2, 5])
def test_league_folds_never_train_on_or_after_validation(real, horizon, n_folds):
    _, order, rows = real
    data = ModelData.from_rows(rows, FEATURE_COLUMNS, horizon, order)
    in_pool = rows.join(data.keys().with_row_index("_i"), on=["league", "currency", "date"]).sort("_i")["in_pool"]
    folds = league_folds(data, n_folds, exclude={"Sanctum"}, train_mask=in_pool.to_numpy(),
                         extra_mask=~in_pool.to_numpy())
    assert 1 <= len(folds) <= min(n_folds, 2)  # Archnemesis has no earlier league to train on
    for fold in folds:
        league = fold.name.removeprefix("league:")
        assert set(data.leagues[fold.valid]) == set(data.leagues[fold.extra]) == {league}
        assert data.dates[fold.train].max() < data.dates[fold.valid].min()
        assert in_pool.to_numpy()[fold.train].all() and not in_pool.to_numpy()[fold.extra].any()
        assert set(fold.inner_train) | set(fold.inner_valid) == set(fold.train)


def test_the_global_model_scores_a_holdout_league_that_tuning_never_saw(global_3d, real):
    r = global_3d
    assert r.trained and r.folds == ["league:Sentinel", "league:Kalandra"]
    assert set(r.metrics) == {"tuning", "holdout"}
    holdout = r.metrics["holdout"]
    assert holdout["persistence"]["skill"] == 0.0 and np.isfinite(holdout["ensemble"]["skill"])
    assert r.skill == holdout["ensemble"]["skill"]
    assert sum(r.weights.values()) == pytest.approx(1.0) and set(r.weights) == {"lightgbm", "xgboost",
                                                                                "random_forest"}
    oof = pl.read_parquet(f"{r.artifact_dir}/{OOF_FILE}")
    assert set(oof.filter(pl.col("holdout"))["league"]) == {"Kalandra"}
    assert oof.filter(pl.col("holdout") & pl.col("in_pool")).height == holdout["ensemble"]["n"]
    # the forecast currencies have out-of-fold rows even where a league's pool left them out
    assert oof.filter(~pl.col("in_pool"))["currency"].n_unique() > 0
    # the saved ensemble loads and forecasts plausible returns beyond the reversion to the 3-day median (these
    # rows hold a one-day glitch of the Divine Orb, 4.2 -> 2.2 -> 3.9 in log chaos, so the reversion itself is large)
    features, _, _ = real
    rows = features.filter(pl.col("currency") == "Divine Orb").tail(5)
    pred = Ensemble(r.artifact_dir).predict(rows)
    reversion = (rows["log_price_roll_median_3"] - rows["log_price"]).to_numpy()
    assert pred.shape == (5,) and np.all(np.abs(pred - reversion) < 1.0)


def test_the_models_learn_the_move_beyond_a_reversion_to_the_3_day_median(global_3d, real, tmp_path):
    features, order, rows = real
    data = ModelData.from_rows(rows, FEATURE_COLUMNS, 3, order)
    expected = (rows.filter(pl.col("target_logret_3d").is_not_null())
                .sort(pl.col("league").replace_strict({lg: i for i, lg in enumerate(order)}), "date", "currency")
                .select(pl.col("log_price_roll_median_3") - pl.col("log_price")).to_series().fill_null(0.0).to_numpy())
    np.testing.assert_allclose(data.base, expected, atol=1e-5)  # the inputs are float32
    np.testing.assert_array_equal(data.label, data.y - data.base)
    # a saved ensemble adds the anchor to each model's prediction; one saved before the anchor (no "anchor" in its
    # ensemble.json) adds nothing, so its forecasts stay what they were
    sample = features.filter(pl.col("currency") == "Orb of Fusing").tail(20)
    inputs, _ = model_inputs(sample, [])
    anchored = Ensemble(global_3d.artifact_dir)
    assert anchored.anchored and anchored.meta["anchor"] == ANCHOR_INPUT
    X = inputs.select(anchored.feature_names).cast(pl.Float32).to_numpy()
    older = tmp_path / "older"
    shutil.copytree(global_3d.artifact_dir, older)
    meta = json.loads((older / "ensemble.json").read_text())
    del meta["anchor"]
    (older / "ensemble.json").write_text(json.dumps(meta))
    unanchored = Ensemble(older)
    assert not unanchored.anchored
    np.testing.assert_allclose(anchored.predict(sample), unanchored.predict(sample) + anchor(X, anchored.feature_names))


def test_same_data_same_seed_same_global_model(global_3d, real, tmp_path):
    _, order, rows = real
    again = train_global(rows, FEATURE_COLUMNS, 3, order, "Sanctum", PROFILE, tmp_path / "again")
    assert (again.metrics, again.params, again.weights) == (global_3d.metrics, global_3d.params, global_3d.weights)


def test_the_parallel_jobs_train_the_same_global_model_as_one_process(global_3d, real, tmp_path, monkeypatch):
    """``train_globals`` splits a horizon into one job per model kind, one that combines them and a final fit per
    weighted kind, on 2 worker processes: the same tuning, weights, scores and forecasts as ``train_global`` in one
    process. The parent never builds the matrices (the workers hold them)."""
    from poe_pipeline import training
    from poe_pipeline.training import GlobalSpec, _global_results, _worker_pool

    def no_matrices_here(*args, **kwargs):
        raise AssertionError("the parent built a horizon's matrices")

    monkeypatch.setattr(training, "global_data", no_matrices_here)  # the spawned workers import their own
    _, order, rows = real
    rows.write_parquet(tmp_path / "rows.parquet")
    spec = GlobalSpec(tmp_path / "rows.parquet", list(FEATURE_COLUMNS), 3, order, "Sanctum", PROFILE, 42)
    with _worker_pool(2) as pool:
        (split,) = list(_global_results([spec], {3: tmp_path / "3d"}, pool, workers=2))
    assert (split.params, split.rounds, split.weights, split.metrics, split.folds) == (
        global_3d.params, global_3d.rounds, global_3d.weights, global_3d.metrics, global_3d.folds)
    assert split.data_window == global_3d.data_window
    assert pl.read_parquet(f"{split.artifact_dir}/{OOF_FILE}").equals(
        pl.read_parquet(f"{global_3d.artifact_dir}/{OOF_FILE}"))
    divine = real[0].filter(pl.col("currency") == "Divine Orb").tail(5)
    np.testing.assert_allclose(Ensemble(split.artifact_dir).predict(divine),
                               Ensemble(global_3d.artifact_dir).predict(divine))


def test_too_little_history_is_skipped_with_its_reason(real, tmp_path):
    _, order, rows = real
    out = tmp_path / "tiny"
    result = train_global(rows.head(500), FEATURE_COLUMNS, 1, order, "Sanctum", PROFILE, out)
    assert not result.trained and "labelled rows to pool at 1d" in result.reason
    assert not out.exists()


def test_a_warm_refit_keeps_the_validation_and_refits_on_new_rows(global_3d, real, tmp_path):
    _, order, rows = real
    validation = GlobalValidation.read(global_3d.artifact_dir)
    earlier = rows.filter(pl.col("date") <= rows["date"].max() - pl.duration(days=14))
    warm = train_global(earlier, FEATURE_COLUMNS, 3, order, "Sanctum", PROFILE, tmp_path / "w", warm=validation)
    assert warm.trained and warm.data_window["warm_refit"]
    assert (warm.params, warm.rounds, warm.weights, warm.metrics, warm.folds) == (
        global_3d.params, global_3d.rounds, global_3d.weights, global_3d.metrics, global_3d.folds)
    assert warm.data_window["rows"] < global_3d.data_window["rows"]
    assert warm.data_window["data_hash"] != global_3d.data_window["data_hash"]


def test_the_pruner_compares_a_step_only_with_the_same_step_of_completed_trials():
    import optuna

    from poe_pipeline.modeling import FOLD_STEPS, StepMedianPruner

    study = optuna.create_study(pruner=StepMedianPruner(n_startup_trials=3))
    for values in ({0: 0.30, 1: 0.20, FOLD_STEPS - 1: 0.50}, {0: 0.31, FOLD_STEPS - 1: 0.52},
                   {0: 0.32, 1: 0.25, FOLD_STEPS - 1: 0.51}):
        trial = study.ask()
        for step, value in values.items():
            trial.report(value, step)
        study.tell(trial, values[FOLD_STEPS - 1])
    trial = study.ask()
    trial.report(0.305, 0)  # below the median of 0.30, 0.31, 0.32
    assert not trial.should_prune()
    # at step 1 the trial that stopped early at step 0 carries 0.31 forward: median of 0.20, 0.31, 0.25 is 0.25
    trial.report(0.26, 1)
    assert trial.should_prune()
    # the fold's error is another quantity: compared only with the completed trials' fold errors
    other = study.ask()
    other.report(0.505, FOLD_STEPS - 1)
    assert not other.should_prune()
    other.report(0.515, FOLD_STEPS - 1 + FOLD_STEPS)  # a step no completed trial reached: never pruned there
    assert not other.should_prune()


def test_pruning_inside_fits_stops_losing_trials_and_stays_deterministic():
    from poe_pipeline.modeling import Fold, fold_data, tune
    from poe_pipeline.settings import Profile

    rng = np.random.default_rng(3)
    n = 6000
    X = rng.normal(size=(n, 6)).astype(np.float32)
    y = 0.05 * X[:, 0] - 0.03 * X[:, 1] + rng.normal(0, 0.05, n)
    leagues = np.repeat(["A", "B", "C"], n // 3)
    data = ModelData(1, [f"x{i}" for i in range(6)], X, y, np.ones(n), leagues, np.array(["c"] * n),
                     np.zeros(n, dtype="datetime64[D]"), ["A", "B", "C"])
    idx = np.arange(n)
    folds = [Fold(f"league:{lg}", idx[: k * 2000], idx[k * 2000:(k + 1) * 2000], idx[: k * 2000 - 400],
                  idx[k * 2000 - 400: k * 2000]) for k, lg in ((1, "B"), (2, "C"))]
    profile = Profile("t", optuna_trials=12, cv_folds=3, early_stopping_rounds=10)
    first = tune("lightgbm", data, fold_data(data, folds, kinds=("lightgbm",)), profile, seed=5,
                 prune_inside_fits=True)
    again = tune("lightgbm", data, fold_data(data, folds, kinds=("lightgbm",)), profile, seed=5,
                 prune_inside_fits=True)
    assert first.trials == 12 and 0 < first.pruned < 12
    assert (first.params, first.rounds, first.pruned, first.boosting_rounds) == (
        again.params, again.rounds, again.pruned, again.boosting_rounds)
    forest = tune("random_forest", data, fold_data(data, folds, kinds=()), Profile("t", 60, 3, 10), seed=5,
                  prune_inside_fits=True)
    assert forest.trials == 6 and forest.boosting_rounds < forest.trials * 2 * 40  # some forests stopped early
    # off (the default): a trial stops only between folds, and a forest grows all its trees
    whole = tune("random_forest", data, fold_data(data, folds, kinds=()), Profile("t", 60, 3, 10), seed=5)
    assert whole.boosting_rounds % 40 == 0


def test_hashing_rows_block_by_block_gives_the_digest_of_the_whole_copy():
    """Champions record these digests: hashing without copying the matrix must not change them."""
    import hashlib

    rng = np.random.default_rng(3)
    matrix = np.asfortranarray(rng.random((40_000, 7), dtype=np.float32))  # as Polars' to_numpy gives it
    rows = np.flatnonzero(rng.random(40_000) > 0.3)
    for picked, copy in ((None, matrix), (rows, matrix[rows])):
        digest = hashlib.sha256()
        hash_rows(digest, matrix, picked)
        assert digest.hexdigest() == hashlib.sha256(np.ascontiguousarray(copy).tobytes()).hexdigest()


def test_ensemble_weights_minimise_validation_error():
    rng = np.random.default_rng(1)
    y = rng.normal(0, 0.05, 500)
    good, noisy = y + rng.normal(0, 0.01, 500), rng.normal(0, 0.05, 500)
    weights = validation_weights(y, {"lightgbm": good, "xgboost": noisy, "random_forest": np.zeros(500)})
    assert weights["lightgbm"] >= 0.8 and weights["xgboost"] == 0.0 and sum(weights.values()) == pytest.approx(1)
    assert validation_weights(y[:10], {"lightgbm": good[:10], "xgboost": noisy[:10],
                                       "random_forest": y[:10]}) == {"lightgbm": 0.5, "xgboost": 0.3,
                                                                     "random_forest": 0.2}


# --- the partitions --------------------------------------------------------------------------------------------


def test_partial_pooling_of_the_scale():
    rng = np.random.default_rng(2)
    g = rng.normal(0, 0.05, 2000)
    y = 0.5 * g + rng.normal(0, 0.01, 2000)  # the pooled rows want half the global forecast
    assert best_scale(y, g) == pytest.approx(0.5, abs=0.05)
    own_g = rng.normal(0, 0.05, 600)
    own_y = 1.0 * own_g  # this currency's rows want all of it
    scale, own, n = pooled_scale(y, g, own_y, own_g)
    assert own == pytest.approx(1.0) and n == 600
    assert scale == pytest.approx((600 * own + PRIOR_ROWS * best_scale(y, g)) / (600 + PRIOR_ROWS))
    few, _, _ = pooled_scale(y, g, own_y[: MIN_OWN_ROWS - 1], own_g[: MIN_OWN_ROWS - 1])
    assert few == pytest.approx(best_scale(y, g))  # too few rows of its own: the pooled scale


def test_a_partition_specialises_the_global_model_on_its_own_rows(global_3d, tmp_path):
    oof = pl.read_parquet(f"{global_3d.artifact_dir}/{OOF_FILE}")
    divine = train_currency("Divine Orb", 3, oof, global_model_name(3), "7", tmp_path / "divine")
    assert divine.trained and divine.global_version == "7" and divine.own_rows >= MIN_OWN_ROWS
    assert divine.metrics_scope == HOLDOUT_SCOPE
    holdout_rows = oof.filter(pl.col("holdout") & (pl.col("currency") == "Divine Orb")).height
    assert divine.metrics["specialised"]["n"] == holdout_rows
    assert divine.metrics["persistence"]["mae_logret"] == pytest.approx(
        oof.filter(pl.col("holdout") & (pl.col("currency") == "Divine Orb"))["actual_logret"].abs().mean())
    # Fracturing Orbs arrived in Sanctum: no out-of-fold row of their own, the pooled scale, and it says so
    new = train_currency("Fracturing Orb", 3, oof, global_model_name(3), "7", tmp_path / "fracturing")
    assert new.trained and new.own_rows == 0 and new.scale == new.pooled_scale
    assert "at a lower confidence" in new.reason and new.metrics_scope == "no rows of its own"
    # rows of its own only in the folds the global model was tuned on: scored there, and named in sample
    tuned_on = oof.filter(~(pl.col("holdout") & (pl.col("currency") == "Divine Orb")))
    older = train_currency("Divine Orb", 3, tuned_on, global_model_name(3), "7", tmp_path / "older")
    assert older.metrics_scope == TUNING_FOLDS_SCOPE and older.metrics["specialised"]["n"] > 0


# --- MLflow --------------------------------------------------------------------------------------------------


def _example(real) -> pl.DataFrame:
    return real[0].filter(pl.col("league") == "Sanctum").tail(5)


def test_promotion_refused_for_a_worse_model_and_for_poisoned_metrics(global_3d, real, lake, tmp_path):
    tracker = ModelTracker(lake)
    first = tracker.log_global(global_3d, {"dagster_run_id": "test"}, example=_example(real))
    assert first.promoted and first.reason == "first version"
    holdout = global_3d.metrics["holdout"]
    worse = dataclasses.replace(global_3d, metrics={**global_3d.metrics, "holdout": {
        **holdout, "ensemble": {**holdout["ensemble"], "mae_logret": global_3d.validation_mae * 1.5}}})
    second = tracker.log_global(worse, {"dagster_run_id": "test"}, example=_example(real))
    assert not second.promoted and "worse than champion v1" in second.reason
    # a poisoned price upstream: the MAE is absurd and the skill NaN; never promoted, even on changed folds
    poisoned = dataclasses.replace(global_3d, folds=["league:Other"], metrics={**global_3d.metrics, "holdout": {
        **holdout, "ensemble": {**holdout["ensemble"], "mae_logret": 1e36, "skill": float("nan")}}})
    third = tracker.log_global(poisoned, {"dagster_run_id": "test"}, example=_example(real))
    assert not third.promoted and "not sane" in third.reason
    version, path = tracker.champion(global_model_name(3))
    assert version == "1" and (path / "ensemble.json").exists()
    run = tracker.client.get_run(second.run_id)
    assert run.data.tags["kind"] == "global" and run.data.tags["promoted"] == "false"
    assert "holdout.ensemble.mae_logret" in run.data.metrics
    assert registered_model_name("Divine Orb", 1) == "poe-divine-orb-1d" and global_model_name(1) == "poe-global-1d"


def test_a_new_currency_follows_each_new_global_model_but_a_validated_champion_stays(global_3d, real, lake,
                                                                                     tmp_path):
    """A currency new to the market has no rows of its own to compare versions on: each retrain's partition, built
    on the newer global champion, replaces the last one. A champion that was validated stays until a newer version
    is validated too."""
    tracker = ModelTracker(lake)
    oof = pl.read_parquet(f"{global_3d.artifact_dir}/{OOF_FILE}")

    def partition(currency: str, global_version: str):
        result = train_currency(currency, 3, oof, global_model_name(3), global_version,
                                tmp_path / f"{slug(currency)}-{global_version}")
        return result, tracker.log_currency(result, {}, example=_example(real))

    assert tracker.log_global(global_3d, {}, example=_example(real)).version == "1"
    new, first = partition("Fracturing Orb", "1")
    assert new.own_rows == 0 and first.promoted and first.reason == "first version (no validation rows)"
    assert tracker.log_global(global_3d, {}, example=_example(real)).promoted  # global v2
    _, second = partition("Fracturing Orb", "2")
    assert second.promoted and "no validation rows, like champion v1" in second.reason
    run = tracker.client.get_run(tracker.champion_version(registered_model_name("Fracturing Orb", 3)).run_id)
    assert run.data.tags["global_model_version"] == "2"
    divine, validated = partition("Divine Orb", "2")
    assert validated.promoted and divine.own_rows > 0
    unvalidated = dataclasses.replace(divine, metrics={})
    refused = tracker.log_currency(unvalidated, {}, example=_example(real))
    assert not refused.promoted and refused.reason == "no validation rows; champion v1 stays"
    # once the new currency has rows of its own, its first validated version replaces the unvalidated champion
    grown = tracker.log_currency(dataclasses.replace(divine, currency="Fracturing Orb"), {}, example=_example(real))
    assert grown.promoted and grown.reason == "champion v2 had no validation rows"


def test_a_broken_model_never_becomes_champion(global_3d, real, lake, tmp_path):
    tracker = ModelTracker(lake)
    assert tracker.log_global(global_3d, {}, example=_example(real)).promoted
    broken_dir = tmp_path / "broken"
    shutil.copytree(global_3d.artifact_dir, broken_dir)
    (broken_dir / "xgboost.ubj").write_bytes(b"not a model")
    broken = dataclasses.replace(global_3d, artifact_dir=str(broken_dir))
    with pytest.raises(Exception):  # noqa: B017 - whatever the loader raises, the alias must not move
        tracker.log_global(broken, {}, example=_example(real))
    version, path = tracker.champion(global_model_name(3))
    assert version == "1"
    Ensemble(path)


def test_the_fast_forest_prediction_is_the_forests_own(real):
    from poe_pipeline.modeling import _fit_forest, _rf_params

    _, order, rows = real
    data = ModelData.from_rows(rows.filter(pl.col("league") == "Kalandra"), FEATURE_COLUMNS, 1, order)
    forest = _fit_forest(_rf_params(None, {"max_depth": 6, "min_samples_leaf": 50, "max_features": 0.3}),
                         data.X, data.y, data.weight, 20)
    np.testing.assert_allclose(forest_predict(forest, data.X[:40]), forest.predict(data.X[:40]), rtol=1e-6,
                               atol=1e-9)


def test_the_champion_loads_as_an_mlflow_pyfunc_and_forecasts_like_the_pipeline(global_3d, real, lake, monkeypatch):
    """What an ML engineer does with a registered model: load it by alias, feed it rows of the features view."""
    import mlflow

    tracker = ModelTracker(lake)
    tracker.log_global(global_3d, {}, example=_example(real))
    rows = real[0].filter(pl.col("currency") == "Divine Orb").tail(4)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.uri)
    model = mlflow.pyfunc.load_model(f"models:/{global_model_name(3)}@champion")
    out = model.predict(rows.to_pandas())
    expected = Ensemble(global_3d.artifact_dir).predict(rows)
    np.testing.assert_allclose(out["predicted_logret"].to_numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(out["predicted_price"].to_numpy(), rows["price_chaos"].to_numpy() * np.exp(expected),
                               rtol=1e-6)
    assert model.metadata.signature is not None and "price_chaos" in model.metadata.signature.inputs.input_names()


def test_the_global_matrices_from_a_scan_are_the_pooled_rows_in_model_order(real, tmp_path):
    """Workers scan the pooled rows' file; the matrices must be those of the rows themselves, row for row."""
    from poe_pipeline.global_model import global_data

    _, order, rows = real
    data, in_pool = global_data(rows, FEATURE_COLUMNS, 7, order)
    rows.write_parquet(tmp_path / "pooled.parquet")
    scanned, scanned_pool = global_data(pl.scan_parquet(tmp_path / "pooled.parquet"), FEATURE_COLUMNS, 7, order)
    assert np.array_equal(data.X, scanned.X, equal_nan=True) and np.array_equal(in_pool, scanned_pool)
    assert np.array_equal(data.y, scanned.y) and np.array_equal(data.dates, scanned.dates)
    # each matrix row is its (league, currency, date) row of the pool: flag, target and a relative input
    keys = data.keys().with_row_index("_i")
    joined = keys.join(rows, on=["league", "currency", "date"], how="left").sort("_i")
    assert joined.height == data.rows == rows.filter(pl.col("target_logret_7d").is_not_null()).height
    assert np.array_equal(in_pool, joined["in_pool"].to_numpy())
    assert np.array_equal(data.y, joined["target_logret_7d"].to_numpy())
    lag = data.feature_names.index("logret_lag_7")
    expected = (joined["log_price"] - joined["log_price_lag_7"]).cast(pl.Float32).to_numpy()
    assert np.array_equal(data.X[:, lag], expected, equal_nan=True)
    leagues = [order.index(lg) for lg in data.leagues]
    assert leagues == sorted(leagues) and data.X.dtype == np.float32


# --- tuning once a league ---------------------------------------------------------------------------------------


def test_fixed_parameters_on_unchanged_rows_give_the_tuned_validation_again(global_3d, real):
    """The weekly retrain's cheap path: the champion's parameters forecast the folds again without a search. On
    the same rows that is the tuning's own validation: weights, scores and out-of-fold rows."""
    from poe_pipeline.global_model import combine_validation, global_data, validate_kind

    _, order, rows = real
    champion = GlobalValidation.read(global_3d.artifact_dir)
    data, in_pool = global_data(rows, FEATURE_COLUMNS, 3, order)
    parts = {k: validate_kind(k, data, in_pool, "Sanctum", PROFILE, 42, fixed_params=champion.params[k])
             for k in champion.params}
    again = combine_validation(data, in_pool, "Sanctum", PROFILE, parts, 42)
    assert all(p.tuned.trials == 1 for p in parts.values())
    assert (again.params, again.rounds, again.weights, again.metrics, again.folds) == (
        champion.params, champion.rounds, champion.weights, champion.metrics, champion.folds)
    assert again.oof.equals(champion.oof) and again.inputs == champion.inputs


def test_what_a_retrain_keeps_of_its_champion(global_3d, real):
    from poe_pipeline.global_model import global_data, reuse_of, tuning_inputs

    features, order, rows = real
    champion = GlobalValidation.read(global_3d.artifact_dir)
    data, in_pool = global_data(rows, FEATURE_COLUMNS, 3, order)
    same = tuning_inputs(data, in_pool, "Sanctum", PROFILE, 42)
    assert reuse_of(champion, same)[0] == "validation"
    # a week later: more rows of the current league only
    later = rows.filter((pl.col("league") != "Sanctum") | (pl.col("date") <= rows["date"].max() - pl.duration(days=7)))
    assert reuse_of(champion, tuning_inputs(*global_data(later, FEATURE_COLUMNS, 3, order), "Sanctum", PROFILE,
                                            42))[0] == "validation"
    # a currency joined the forecast: its past-league rows are new to the folds
    joined = pooled_rows(features, order, "Sanctum", [*FORECAST, "Annulment Shard"], pool_size=30)
    keep, why = reuse_of(champion, tuning_inputs(*global_data(joined, FEATURE_COLUMNS, 3, order), "Sanctum",
                                                 PROFILE, 42))
    assert (keep, why) == ("params", "the same past leagues and profile, but their rows changed")
    assert reuse_of(champion, tuning_inputs(data, in_pool, "Sanctum", get_profile("dev"), 42)) == (
        "", "profile changed")
    assert reuse_of(champion, {**same, "past_leagues": [*same["past_leagues"], "Sanctum"]})[0] == ""
    assert reuse_of(None, same) == ("", "no champion to start from")
    assert reuse_of(dataclasses.replace(champion, inputs={}), same)[0] == ""


def test_a_weekly_retrain_keeps_the_champions_tuning_and_says_so(real, lake, monkeypatch):
    """Through ``train_globals``, as the weekly schedule runs it: the first retrain tunes; the next, where a
    currency joined the forecast, keeps the champion's parameters; the one after, with nothing changed at all, keeps
    the champion as it is, and so does one whose current league changed by a week (too few rows to refit); with
    rows enough, it keeps the whole validation and refits the final models. Each model is registered and promoted
    on the same folds and rows."""
    import poe_pipeline.global_model as global_model
    from poe_pipeline.training import train_globals

    features, order, _ = real
    said: list[str] = []

    def train(currencies: list[str], rows: pl.DataFrame = features):
        said.clear()
        (outcome,) = train_globals(lake, rows, FEATURE_COLUMNS, [3], order, "Sanctum", currencies, PROFILE,
                                   {"dagster_run_id": "test"}, workers=1, progress=said.append)
        return outcome

    def retrain(currencies: list[str], rows: pl.DataFrame = features):
        outcome = train(currencies, rows)
        assert outcome.registration.promoted, outcome.registration.reason
        return outcome.result

    tuned = retrain(FORECAST)
    assert any("tuning with Optuna (no champion to start from)" in s for s in said)
    assert tuned.data_window["tuning"] == "tuned"
    kept_params = retrain([*FORECAST, "Annulment Shard"])
    assert any("keeps the tuned parameters of champion v1" in s for s in said)
    assert kept_params.data_window["tuning"].startswith("parameters of poe-global-3d v1 kept")
    assert all(t["trials"] == 1 for t in kept_params.tuning.values())
    assert (kept_params.params, kept_params.weights, kept_params.metrics) == (tuned.params, tuned.weights,
                                                                              tuned.metrics)
    _, champion = ModelTracker(lake).champion(global_model_name(3))
    oof = pl.read_parquet(champion / OOF_FILE)
    assert "Annulment Shard" in set(oof.filter(pl.col("league") != "Sanctum")["currency"])  # forecast out of fold
    as_it_is = train([*FORECAST, "Annulment Shard"])
    assert (as_it_is.kept, as_it_is.registration, as_it_is.result.trained) == ("2", None, False)
    assert as_it_is.result.reason == "champion v2 kept as it is: it was fitted on exactly these rows"
    assert said == [f"global 3d: {as_it_is.result.reason}"]
    assert ModelTracker(lake).champion(global_model_name(3))[0] == "2"
    assert len(lake.parquet_files(lake.model_metrics)) == 2  # a kept champion is not a training: no file, no row
    assert pl.read_parquet(lake.parquet_files(lake.model_metrics)).height == 2

    # the current league a week shorter (a week longer works alike): the same past leagues, a few other rows
    week_earlier = features.filter((pl.col("league") != "Sanctum")
                                   | (pl.col("date") <= features["date"].max() - pl.duration(days=7)))
    too_few = train([*FORECAST, "Annulment Shard"], week_earlier)
    assert (too_few.kept, too_few.registration, too_few.result.trained) == ("2", None, False)
    assert re.fullmatch(r"champion v2 kept as it is: its tuning inputs are unchanged and its pooled rows changed "
                        r"-\d\.\d% since its fit \(a refit needs 5%\)", too_few.result.reason), too_few.result.reason
    monkeypatch.setattr(global_model, "REFIT_MIN_GROWTH", 0.0)  # as if a few weeks of the league had come in
    kept_all = retrain([*FORECAST, "Annulment Shard"], week_earlier)
    assert any("keeps the tuning, weights and out-of-fold forecasts of champion v2" in s for s in said)
    assert kept_all.data_window["tuning"].startswith("validation of poe-global-3d v2 kept")
    assert (kept_all.metrics, kept_all.data_window["oof_rows"]) == (kept_params.metrics, oof.height)

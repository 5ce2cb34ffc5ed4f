"""Models on real data: walk-forward folds, skips, reproducibility, MLflow registration and promotion."""

from __future__ import annotations

import dataclasses
import shutil
from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from conftest import SAMPLE
from poe_pipeline.features import FEATURE_COLUMNS, build_features
from poe_pipeline.leagues import league_calendar, training_leagues
from poe_pipeline.modeling import (
    POOL_WEIGHT,
    Ensemble,
    Validation,
    similar_currencies,
    train_partition,
    training_set,
    walk_forward_folds,
)
from poe_pipeline.prices import daily_from_dump_rows, merge_daily_prices
from poe_pipeline.settings import get_profile
from poe_pipeline.sources.poe_ninja import read_dump
from poe_pipeline.tracking import ModelTracker, registered_model_name

LEAGUES = ("Archnemesis", "Sentinel", "Kalandra", "Sanctum")
PROFILE = get_profile("test")


@pytest.fixture(scope="module")
def real():
    prices = merge_daily_prices(daily_from_dump_rows(
        pl.concat([read_dump(SAMPLE / f"{lg}.currency.csv.gz") for lg in LEAGUES])))
    calendar = league_calendar(prices)
    return build_features(prices, calendar), training_leagues(calendar, "Sanctum")


@pytest.mark.parametrize("horizon", [1, 3, 7])
@pytest.mark.parametrize("currency", ["Divine Orb", "Orb of Annulment", "Awakened Sextant"])
@pytest.mark.parametrize("n_folds", [2, 5])
def test_walk_forward_never_trains_on_or_after_validation(real, currency, horizon, n_folds):
    features, order = real
    ts = training_set(features, FEATURE_COLUMNS, currency, horizon, order)
    folds = walk_forward_folds(ts, "Sanctum", n_folds)
    assert 1 <= len(folds) <= n_folds
    assert folds[-1].name.startswith("current:Sanctum")  # the current league is validated on its later days
    for fold in folds:
        first_valid = ts.dates[fold.valid].min()
        assert ts.dates[fold.train].max() < first_valid
        # and no training target is realised inside the validation window (embargo of `horizon` days)
        assert (ts.dates[fold.train] + np.timedelta64(horizon, "D")).max() < first_valid
        assert set(fold.inner_train) | set(fold.inner_valid) == set(fold.train)
        assert not set(fold.train) & set(fold.valid)


def test_too_little_data_is_skipped_with_reason(real, tmp_path):
    features, order = real
    out = tmp_path / "fracturing"
    result = train_partition(features, FEATURE_COLUMNS, "Fracturing Orb", 1, order, "Sanctum", PROFILE, out)
    assert not result.trained
    assert "labelled rows for Fracturing Orb at 1d (at least 120 are needed)" in result.reason
    assert not out.exists()  # nothing fitted, nothing written


def test_same_data_same_seed_same_metrics(real, tmp_path):
    features, order = real
    a = train_partition(features, FEATURE_COLUMNS, "Orb of Annulment", 3, order, "Sanctum", PROFILE, tmp_path / "a")
    b = train_partition(features, FEATURE_COLUMNS, "Orb of Annulment", 3, order, "Sanctum", PROFILE, tmp_path / "b")
    assert a.trained and a.metrics == b.metrics and a.params == b.params and a.weights == b.weights
    assert a.metrics["persistence"]["skill"] == 0.0
    assert set(a.weights) == {"lightgbm", "xgboost", "random_forest"}
    assert sum(a.weights.values()) == pytest.approx(1.0)
    # the saved ensemble loads and forecasts a plausible return
    ens = Ensemble(tmp_path / "a")
    rows = features.filter(pl.col("currency") == "Orb of Annulment").tail(5)
    pred = ens.predict(rows)
    assert pred.shape == (5,) and np.all(np.abs(pred) < 1.0)


@pytest.fixture(scope="module")
def trained_divine(real, tmp_path_factory):
    features, order = real
    out = tmp_path_factory.mktemp("divine")
    return train_partition(features, FEATURE_COLUMNS, "Divine Orb", 1, order, "Sanctum", PROFILE, out)


def test_a_warm_refit_keeps_the_validation_and_refits_on_new_rows(real, trained_divine, tmp_path):
    features, order = real
    validation = Validation.of(trained_divine)
    earlier = features.filter(pl.col("date") <= features["date"].max() - timedelta(days=7))
    warm = train_partition(earlier, FEATURE_COLUMNS, "Divine Orb", 1, order, "Sanctum", PROFILE, tmp_path / "w",
                           warm=validation)
    assert warm.trained and warm.data_window["warm_refit"]
    # tuning and validation are reused as they were ...
    assert (warm.params, warm.rounds, warm.weights, warm.shrink, warm.metrics, warm.folds) == (
        trained_divine.params, trained_divine.rounds, trained_divine.weights, trained_divine.shrink,
        trained_divine.metrics, trained_divine.folds)
    assert pl.read_parquet(tmp_path / "w" / "residuals.parquet").equals(validation.residuals)
    # ... while the models are fitted again, on the rows given (a week fewer than the cold fit saw)
    assert warm.data_window["rows"] < trained_divine.data_window["rows"]
    assert warm.data_window["data_hash"] != trained_divine.data_window["data_hash"]
    rows = features.filter(pl.col("currency") == "Divine Orb").tail(3)
    refitted, cold = Ensemble(tmp_path / "w"), Ensemble(trained_divine.artifact_dir)
    refitted.shrink = cold.shrink = 1.0  # compare the models, not a shrink that may be 0
    assert not np.allclose(refitted.predict(rows), cold.predict(rows))


def test_promotion_refused_for_a_worse_model(trained_divine, lake):
    tracker = ModelTracker(lake)
    first = tracker.log_training(trained_divine, {"dagster_run_id": "test"})
    assert first.promoted and first.reason == "first version"
    worse = dataclasses.replace(trained_divine, metrics={
        **trained_divine.metrics, "ensemble": {**trained_divine.metrics["ensemble"],
                                               "mae_logret": trained_divine.validation_mae * 1.5}})
    second = tracker.log_training(worse, {"dagster_run_id": "test"})
    assert not second.promoted and "worse than champion v1" in second.reason
    version, path = tracker.champion_dir("Divine Orb", 1)
    assert version == "1" and (path / "ensemble.json").exists()
    same = tracker.log_training(trained_divine, {"dagster_run_id": "test"})
    assert same.promoted and tracker.champion_dir("Divine Orb", 1)[0] == same.version == "3"
    run = tracker.client.get_run(second.run_id)
    assert run.data.tags["currency"] == "Divine Orb" and run.data.tags["promoted"] == "false"
    assert "ensemble.mae_logret" in run.data.metrics and "persistence.mae_logret" in run.data.metrics
    assert registered_model_name("Divine Orb", 1) == "poe-divine-orb-1d"


def test_a_broken_model_never_becomes_champion(trained_divine, lake, tmp_path):
    tracker = ModelTracker(lake)
    assert tracker.log_training(trained_divine, {}).promoted
    broken_dir = tmp_path / "broken"
    shutil.copytree(trained_divine.artifact_dir, broken_dir)
    (broken_dir / "xgboost.ubj").write_bytes(b"not a model")
    broken = dataclasses.replace(trained_divine, artifact_dir=str(broken_dir))
    with pytest.raises(Exception):  # noqa: B017 - whatever the loader raises, the alias must not move
        tracker.log_training(broken, {})
    version, path = tracker.champion_dir("Divine Orb", 1)
    assert version == "1"
    Ensemble(Path(path))


def test_pooling_similar_currencies_validates_on_the_partition_currency_only(real, tmp_path):
    features, order = real
    pool = similar_currencies(features, "Orb of Annulment", k=3)
    assert len(pool) == 3 and "Orb of Annulment" not in pool
    ts = training_set(features, FEATURE_COLUMNS, "Orb of Annulment", 3, order, pool)
    assert 0 < ts.target_rows < ts.rows
    assert set(ts.weight[~ts.is_target]) == {POOL_WEIGHT} and set(ts.weight[ts.is_target]) == {1.0}
    for fold in walk_forward_folds(ts, "Sanctum", 2):
        assert ts.is_target[fold.valid].all()  # metrics are the partition's own
        assert (~ts.is_target[fold.train]).any()  # pooled rows help training
    result = train_partition(features, FEATURE_COLUMNS, "Orb of Annulment", 3, order, "Sanctum", PROFILE,
                             tmp_path / "pooled", pool=pool)
    alone = train_partition(features, FEATURE_COLUMNS, "Orb of Annulment", 3, order, "Sanctum", PROFILE,
                            tmp_path / "alone")
    assert result.data_window["rows"] == alone.data_window["rows"] and result.data_window["pooled_rows"] > 0
    assert result.metrics["persistence"] == alone.metrics["persistence"]  # the same validation rows


def test_the_fast_forest_prediction_is_the_forests_own(trained_divine, real):
    from poe_pipeline.modeling import forest_predict, model_inputs

    features, _ = real
    ens = Ensemble(trained_divine.artifact_dir)
    inputs, _ = model_inputs(features.filter(pl.col("currency") == "Divine Orb").tail(40), [])
    X = inputs.select(ens.feature_names).cast(pl.Float32).to_numpy()
    np.testing.assert_allclose(forest_predict(ens.random_forest, X), ens.random_forest.predict(X), rtol=1e-6,
                               atol=1e-9)
    assert np.allclose(ens.predict(features.filter(pl.col("currency") == "Divine Orb").tail(40)),
                       ens.predict_inputs(inputs))

"""Training many (currency, horizon) partitions in one go: processes across partitions, one thread per model.

Workers only train and write artifacts to a staging folder; the parent process does every MLflow write, one
after another, so the SQLite stores never see two writers ("database is locked" cannot happen by design).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from poe_pipeline.lake import Lake, write_parquet_atomic
from poe_pipeline.modeling import PartitionResult, limit_threads, train_partition
from poe_pipeline.names import slug
from poe_pipeline.settings import Profile
from poe_pipeline.tracking import ModelTracker, Registration

HORIZON_KEYS = {"1d": 1, "3d": 3, "7d": 7}


@dataclass(frozen=True)
class TrainRequest:
    currency: str
    horizon: int

    @property
    def partition_key(self) -> str:
        return f"{self.currency}|{self.horizon}d"


@dataclass
class TrainOutcome:
    request: TrainRequest
    result: PartitionResult
    registration: Registration | None


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)


def _train_one(args: tuple) -> PartitionResult:
    rows, feature_columns, request, league_order, current_league, profile, out_dir, seed = args
    return train_partition(rows, feature_columns, request.currency, request.horizon, league_order, current_league,
                           profile, out_dir, seed)


def _results(jobs: list[tuple], workers: int) -> Iterator[tuple[TrainRequest, PartitionResult]]:
    """Results as they complete: in-process for one worker, else a pool of fresh (spawned) processes."""
    if workers == 1:
        for job in jobs:
            yield job[2], _train_one(job)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                             initializer=limit_threads) as pool:
        futures = {pool.submit(_train_one, job): job[2] for job in jobs}
        for future in as_completed(futures):
            yield futures[future], future.result()


def train_many(
    lake: Lake,
    features: pl.DataFrame,
    feature_columns: list[str],
    requests: Iterable[TrainRequest],
    league_order: list[str],
    current_league: str,
    profile: Profile,
    tags: dict[str, str],
    workers: int | None = None,
    seed: int = 42,
    progress: Callable[[str], None] = print,
) -> list[TrainOutcome]:
    """Train, log and register every request. Returns one outcome per request, in completion order."""
    requests = list(requests)
    workers = min(workers or default_workers(), max(1, len(requests)))
    staging = lake.root / "models" / "staging" / datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    tracker = ModelTracker(lake)
    parent = tracker.start_parent_run(f"retrain-{current_league}-{profile.name}",
                                      {**tags, "kind": "retrain", "league": current_league, "profile": profile.name})
    by_currency = {c: g for (c,), g in features.filter(pl.col("currency").is_in({r.currency for r in requests}))
                   .partition_by("currency", as_dict=True).items()}
    empty = features.head(0)
    jobs = [(by_currency.get(r.currency, empty), feature_columns, r, league_order, current_league, profile,
             staging / f"{slug(r.currency)}-{r.horizon}d", seed) for r in requests]
    outcomes: list[TrainOutcome] = []
    failed = False
    try:
        for done, (request, result) in enumerate(_results(jobs, workers), 1):
            registration = None
            run_tags = {**tags, "league": current_league, "profile": profile.name,
                        "partition_key": request.partition_key}
            if result.trained:
                registration = tracker.log_training(result, run_tags, parent_run_id=parent)
                ens = result.metrics.get("ensemble", {})
                note = (f"skill {ens.get('skill', float('nan')):+.3f}, MAE {ens.get('mae_logret', 0):.4f}, "
                        f"{'promoted' if registration.promoted else 'kept, not promoted'}")
            else:
                note = f"skipped: {result.reason}"
            progress(f"[{done}/{len(jobs)}] {request.partition_key}: {note} ({result.seconds:.1f}s)")
            outcomes.append(TrainOutcome(request, result, registration))
    except BaseException:
        failed = True
        raise
    finally:
        tracker.end_run(parent, failed=failed)
        shutil.rmtree(staging, ignore_errors=True)  # MLflow holds the copies
    write_model_metrics(lake, outcomes, tags.get("dagster_run_id", parent), current_league, profile.name)
    return outcomes


MODEL_METRICS_SCHEMA = {
    "trained_at": pl.Datetime("us", "UTC"), "run_id": pl.Utf8, "league": pl.Utf8, "currency": pl.Utf8,
    "horizon_days": pl.Int32, "profile": pl.Utf8, "trained": pl.Boolean, "reason": pl.Utf8,
    "model_name": pl.Utf8, "model_version": pl.Utf8, "promoted": pl.Boolean, "promotion_reason": pl.Utf8,
    "mlflow_run_id": pl.Utf8, "rows": pl.Int64, "oof_rows": pl.Int64, "folds": pl.Utf8,
    "ensemble_mae_logret": pl.Float64, "persistence_mae_logret": pl.Float64, "ensemble_skill": pl.Float64,
    "ensemble_mape_price": pl.Float64, "ensemble_directional_accuracy": pl.Float64, "ensemble_r2": pl.Float64,
    "lightgbm_mae_logret": pl.Float64, "xgboost_mae_logret": pl.Float64, "random_forest_mae_logret": pl.Float64,
    "weight_lightgbm": pl.Float64, "weight_xgboost": pl.Float64, "weight_random_forest": pl.Float64,
    "shrink": pl.Float64, "train_seconds": pl.Float64,
}


def write_model_metrics(lake: Lake, outcomes: list[TrainOutcome], run_id: str, league: str, profile: str) -> Path:
    """One row per partition training, appended as one file per run (``model_metrics`` in the warehouse)."""
    now = datetime.now(UTC)
    rows = []
    for o in outcomes:
        r, reg = o.result, o.registration
        m = r.metrics
        rows.append({
            "trained_at": now, "run_id": run_id, "league": league, "currency": r.currency,
            "horizon_days": r.horizon, "profile": profile, "trained": r.trained, "reason": r.reason,
            "model_name": reg.model_name if reg else None, "model_version": reg.version if reg else None,
            "promoted": reg.promoted if reg else False, "promotion_reason": reg.reason if reg else r.reason,
            "mlflow_run_id": reg.run_id if reg else None, "rows": r.data_window.get("rows"),
            "oof_rows": r.data_window.get("oof_rows"), "folds": r.fold_signature,
            "ensemble_mae_logret": m.get("ensemble", {}).get("mae_logret"),
            "persistence_mae_logret": m.get("persistence", {}).get("mae_logret"),
            "ensemble_skill": m.get("ensemble", {}).get("skill"),
            "ensemble_mape_price": m.get("ensemble", {}).get("mape_price"),
            "ensemble_directional_accuracy": m.get("ensemble", {}).get("directional_accuracy"),
            "ensemble_r2": m.get("ensemble", {}).get("r2"),
            **{f"{k}_mae_logret": m.get(k, {}).get("mae_logret") for k in ("lightgbm", "xgboost", "random_forest")},
            **{f"weight_{k}": r.weights.get(k) for k in ("lightgbm", "xgboost", "random_forest")},
            "shrink": r.shrink if r.trained else None, "train_seconds": r.seconds,
        })
    frame = pl.DataFrame(rows, schema=MODEL_METRICS_SCHEMA)
    path = lake.root / "model_metrics" / f"{now.strftime('%Y%m%dT%H%M%S%f')}-{slug(run_id)[:36]}.parquet"
    return write_parquet_atomic(frame, path)


def load_training_features(lake: Lake, currencies: Iterable[str]) -> pl.DataFrame:
    """The feature rows of these currencies in every league, read lazily so other currencies never load."""
    files = lake.parquet_files(lake.features)
    if not files:
        raise FileNotFoundError(f"No features under {lake.features}: materialize `features` first")
    return pl.scan_parquet(files, hive_partitioning=False).filter(pl.col("currency").is_in(list(currencies))).collect()

"""Training the global models and their currency partitions, logged and registered in MLflow.

The global models (one per horizon) are the heavy part: they train in parallel processes, one thread per model, as
finer jobs than a horizon so that 2 cores stay busy to the end: one job per (horizon, model kind) tunes that kind and
forecasts the holdout (``global_model.validate_kind``); once a horizon's three kinds are in, one job weighs them
and one job per weighted kind fits its final model. Final fits go first, then the longest validations. The results
are those of ``train_global`` in one process (each kind's tuning is seeded alone). Only the workers build a horizon's
matrices (checking a champion's rows is a job too), so the parent stays small beside them. Partitions are light (a
scale and a calibration on the global model's out-of-fold forecasts) and train in the parent.
Workers only train and write artifacts to a staging folder; the parent process does every MLflow write, one after
another, so the SQLite stores never see two writers ("database is locked" cannot happen by design).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl

from poe_pipeline.currency_model import HOLDOUT_SCOPE, CurrencyResult, train_currency
from poe_pipeline.global_model import (
    OOF_FILE,
    REFIT_MIN_GROWTH,
    GlobalResult,
    GlobalValidation,
    KindValidation,
    combine_validation,
    finish_global,
    global_data,
    pooled_rows,
    refit_due,
    reuse_of,
    rows_window,
    skip_reason,
    tuning_inputs,
    validate_kind,
)
from poe_pipeline.lake import Lake, write_parquet_atomic
from poe_pipeline.modeling import MODEL_KINDS, blend_importance, fit_model, limit_threads
from poe_pipeline.names import slug
from poe_pipeline.settings import Profile
from poe_pipeline.tracking import ModelTracker, Registration, global_model_name

HORIZON_KEYS = {"1d": 1, "3d": 3, "7d": 7}


@dataclass(frozen=True)
class TrainRequest:
    currency: str
    horizon: int

    @property
    def partition_key(self) -> str:
        return f"{self.currency}|{self.horizon}d"


@dataclass
class GlobalOutcome:
    horizon: int
    result: GlobalResult
    registration: Registration | None
    kept: str = ""  # the champion version kept as it is (``result.reason`` says why); "" when trained or skipped


@dataclass
class TrainOutcome:
    request: TrainRequest
    result: CurrencyResult
    registration: Registration | None


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class GlobalSpec:
    """What a global training job needs besides its kind: the pooled rows (a Parquet file in the staging folder,
    read once per worker and horizon) and the training choices."""

    rows_path: Path
    feature_columns: list[str]
    horizon: int
    league_order: list[str]
    current_league: str
    profile: Profile
    seed: int


_DATA: dict[tuple[str, int], tuple] = {}  # a worker's matrices of its latest (rows file, horizon)


def _global_data(spec: GlobalSpec) -> tuple:
    key = (str(spec.rows_path), spec.horizon)
    if key not in _DATA:
        _DATA.clear()
        _DATA[key] = global_data(pl.scan_parquet(spec.rows_path), spec.feature_columns, spec.horizon,
                                 spec.league_order)  # scanned: only the model's columns are read
    return _DATA[key]


def _validate_job(spec: GlobalSpec, kind: str, fixed_params: dict | None = None) -> tuple[str, KindValidation | str]:
    """A worker's job: one kind's validation (``fixed_params``: without a search), or the reason the horizon cannot
    be trained."""
    data, in_pool = _global_data(spec)
    if reason := skip_reason(in_pool, spec.horizon):
        return "skip", reason
    return "validated", validate_kind(kind, data, in_pool, spec.current_league, spec.profile, spec.seed,
                                      fixed_params=fixed_params)


def _fit_job(spec: GlobalSpec, kind: str, params: dict, rounds: int, out_dir: Path) -> tuple[str, tuple]:
    """A worker's job: one final model, saved in ``out_dir``; its normalised gain, seconds, the ``rows_window`` of
    the rows it was fitted on and the input names."""
    started = time.perf_counter()
    data, in_pool = _global_data(spec)
    gain = fit_model(kind, data, params, rounds, out_dir, index=np.flatnonzero(in_pool))
    return "fitted", (gain, time.perf_counter() - started, rows_window(data, in_pool, spec.league_order),
                      data.feature_names)


def _combine_job(spec: GlobalSpec, parts: dict[str, KindValidation]) -> tuple[str, GlobalValidation]:
    """A worker's job: the ensemble's validation from its kinds' parts. In a worker, so that the parent never holds
    a horizon's matrices beside two workers that hold theirs."""
    data, in_pool = _global_data(spec)
    return "combined", combine_validation(data, in_pool, spec.current_league, spec.profile, parts, spec.seed)


def _fingerprint_job(spec: GlobalSpec) -> tuple[str, tuple[str, dict, str, int]]:
    """A worker's job: (why the horizon cannot be trained, or ""; its ``tuning_inputs``; the hash of its rows; its
    labelled pooled rows)."""
    data, in_pool = _global_data(spec)
    if reason := skip_reason(in_pool, spec.horizon):
        return "fingerprint", (reason, {}, "", 0)
    return "fingerprint", ("", tuning_inputs(data, in_pool, spec.current_league, spec.profile, spec.seed),
                           data.data_hash(), int(in_pool.sum()))


def _release_freed_memory() -> None:
    """glibc keeps the buffers that numpy, LightGBM and XGBoost free in its heap for reuse, so a worker would hold
    its largest job's memory for the rest of the retrain (about 220 MB more on the 1-day model's jobs, measured):
    hand the free pages back. Not on a C library without ``malloc_trim``."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
except OSError:
    _LIBC = None


def _job(fn: Callable, *args):
    """Run one job in a worker, then give back what it freed."""
    try:
        return fn(*args)
    finally:
        _release_freed_memory()


_EXPECTED_COST = {"xgboost": 0, "lightgbm": 1, "random_forest": 2}  # the slowest validations first


class _Inline:
    """The executor of one worker: each job runs in this process when it is submitted."""

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:
            future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        _DATA.clear()


Executor = ProcessPoolExecutor | _Inline


@contextmanager
def _worker_pool(workers: int) -> Iterator[Executor]:
    """Fresh (spawned) worker processes, or this process for one worker; shut down (queued jobs cancelled) on exit."""
    pool = _Inline() if workers == 1 else ProcessPoolExecutor(
        max_workers=workers, mp_context=mp.get_context("spawn"), initializer=limit_threads)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _global_results(specs: list[GlobalSpec], out_dirs: dict[int, Path], pool: Executor, workers: int,
                    warm: dict[int, GlobalValidation] | None = None,
                    fixed: dict[int, GlobalValidation] | None = None) -> Iterator[GlobalResult]:
    """Each horizon's result as soon as its final models are fitted: (horizon, kind) validation jobs, a job that
    combines a horizon's kinds, then a final fit per weighted kind, on ``pool``. At most ``workers`` jobs are in
    flight, so the next job is chosen when a worker frees up: final fits first. A horizon in ``warm`` keeps that
    validation (tuning, weights, out-of-fold rows): only its final fits run. One in ``fixed`` validates with that
    validation's parameters, without a search. Every job that needs a horizon's matrices runs in a worker."""
    by_h = {s.horizon: s for s in specs}
    warm = {h: v for h, v in (warm or {}).items() if h in by_h}
    fixed = {h: v for h, v in (fixed or {}).items() if h in by_h and h not in warm}
    queue: list[tuple[int, int, Callable, tuple, str]] = [  # (priority, order, job, args, what it is)
        (1 + _EXPECTED_COST[kind], i, _validate_job,
         (by_h[h], kind, fixed[h].params.get(kind) if h in fixed else None), kind)
        for i, (kind, h) in enumerate((k, h) for k in sorted(MODEL_KINDS, key=_EXPECTED_COST.get) for h in by_h
                                      if h not in warm)
    ]
    queue += [(0, len(queue) + i, _fit_job, (by_h[h], k, v.params[k], v.rounds[k], out_dirs[h]), k)
              for i, (h, v) in enumerate(warm.items()) for k in MODEL_KINDS if v.weights.get(k, 0) > 0]
    parts: dict[int, dict[str, KindValidation]] = {h: {} for h in by_h}
    validations: dict[int, GlobalValidation] = dict(warm)
    gains: dict[int, dict[str, np.ndarray]] = {h: {} for h in by_h}
    seconds: dict[int, float] = dict.fromkeys(by_h, 0.0)
    skipped: set[int] = set()
    running: dict[Future, tuple[int, str]] = {}
    order = len(queue)
    while queue or running:
        queue.sort(key=lambda job: job[:2])
        while queue and len(running) < workers:
            _, _, fn, args, what = queue.pop(0)
            running[pool.submit(_job, fn, *args)] = (args[0].horizon, what)
        done, _ = wait(list(running), return_when=FIRST_COMPLETED)
        for future in sorted(done, key=lambda f: running[f]):
            h, kind = running.pop(future)
            stage, payload = future.result()
            spec = by_h[h]
            if stage == "skip":
                if h not in skipped:
                    skipped.add(h)
                    yield GlobalResult(h, trained=False, reason=payload)
                continue
            if stage == "validated":
                parts[h][kind] = payload
                seconds[h] += payload.seconds
                if len(parts[h]) == len(MODEL_KINDS):
                    order += 1
                    queue.append((0, order, _combine_job, (spec, parts[h]), "ensemble"))
                continue
            if stage == "combined":
                validations[h] = payload
                if h in fixed:
                    validations[h].reused = fixed[h].reused
                for k in MODEL_KINDS:
                    if validations[h].weights.get(k, 0) > 0:
                        order += 1
                        queue.append((0, order, _fit_job, (spec, k, validations[h].params[k],
                                                           validations[h].rounds[k], out_dirs[h]), k))
                continue
            gains[h][kind], fit_s, window, names = payload
            seconds[h] += fit_s
            checked = validations[h]
            if len(gains[h]) < sum(1 for k in MODEL_KINDS if checked.weights.get(k, 0) > 0):
                continue
            result = GlobalResult(h, trained=False, feature_names=names)
            importance = blend_importance(names, checked.weights, gains[h])
            yield finish_global(result, window, checked, importance, out_dirs[h], h in warm, seconds[h])


def refit_globals(rows: pl.DataFrame, feature_columns: list[str], horizons: Iterable[int], league_order: list[str],
                  current_league: str, profile: Profile, workdir: Path, warm: dict[int, GlobalValidation],
                  workers: int = 1, seed: int = 42) -> list[GlobalResult]:
    """The global model of each horizon, without MLflow, into ``workdir/global-<h>d``: the horizons in ``warm``
    only refit their final models on ``rows``, the others are tuned and validated first; each (horizon, kind) is a
    job, so two cores share three horizons."""
    workdir.mkdir(parents=True, exist_ok=True)
    rows_path = write_parquet_atomic(rows, workdir / "pooled_rows.parquet")
    specs = [GlobalSpec(rows_path, list(feature_columns), h, list(league_order), current_league, profile, seed)
             for h in horizons]
    out_dirs = {s.horizon: workdir / f"global-{s.horizon}d" for s in specs}
    with _worker_pool(workers) as pool:
        return list(_global_results(specs, out_dirs, pool, workers, warm))


def _reusable(tracker: ModelTracker, specs: list[GlobalSpec], pool: Executor, progress: Callable[[str], None],
              ) -> tuple[dict[int, GlobalValidation], dict[int, GlobalValidation], dict[int, tuple[str, str]]]:
    """(horizon -> champion validation kept whole, horizon -> champion whose tuned parameters are kept,
    horizon -> (champion version kept as it is, why)): tuning on the same past leagues gives the same answer, so a
    weekly retrain does not repeat it; and a champion fitted on the same rows, or on rows that changed too little
    (``refit_due``), is not fitted again. The rows are fingerprinted on ``pool``, each horizon as one job."""
    champions: dict[int, tuple[str, GlobalValidation | None]] = {}
    for spec in specs:
        try:
            found = tracker.champion(global_model_name(spec.horizon))
            champions[spec.horizon] = (found[0], GlobalValidation.read(found[1])) if found else ("", None)
        except Exception as exc:  # a damaged or untrusted champion: tune from scratch, the forecasts alert on it
            progress(f"global {spec.horizon}d: tuning with Optuna (its champion cannot be read: {exc})")
    # only a champion with recorded inputs can be compared with today's rows: else no matrices to build
    by_h = {s.horizon: s for s in specs}
    fingerprints = {h: pool.submit(_job, _fingerprint_job, by_h[h]) for h, (_, champion) in champions.items()
                    if champion is not None and champion.inputs}
    warm: dict[int, GlobalValidation] = {}
    fixed: dict[int, GlobalValidation] = {}
    kept: dict[int, tuple[str, str]] = {}
    for h, (version, champion) in champions.items():
        name = global_model_name(h)
        inputs, rows_hash, rows_now = {}, "", 0
        if h in fingerprints:
            reason, inputs, rows_hash, rows_now = fingerprints[h].result()[1]
            if reason:
                continue  # the horizon's job says why
        keep, why = reuse_of(champion, inputs)
        if keep == "validation" and champion.fitted_hash == rows_hash:
            kept[h] = (version, f"champion v{version} kept as it is: it was fitted on exactly these rows")
            progress(f"global {h}d: {kept[h][1]}")
        elif keep == "validation" and not (due := refit_due(champion.fitted_rows, rows_now))[0]:
            kept[h] = (version, f"champion v{version} kept as it is: its tuning inputs are unchanged and its pooled "
                                f"rows changed {due[1]:+.1%} since its fit (a refit needs {REFIT_MIN_GROWTH:.0%})")
            progress(f"global {h}d: {kept[h][1]}")
        elif keep == "validation":
            champion.reused = f"validation of {name} v{version} kept: {why}"
            warm[h] = champion
            progress(f"global {h}d: keeps the tuning, weights and out-of-fold forecasts of champion "
                     f"v{version} ({why}); only the final models are fitted")
        elif keep == "params":
            champion.reused = f"parameters of {name} v{version} kept: {why}"
            fixed[h] = champion
            progress(f"global {h}d: keeps the tuned parameters of champion v{version} ({why}); the "
                     "folds are forecast again without a search")
        else:
            progress(f"global {h}d: tuning with Optuna ({why})")
    return warm, fixed, kept


def _staging(lake: Lake) -> Path:
    return lake.models_staging / datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")


def train_globals(
    lake: Lake,
    features: pl.DataFrame | pl.LazyFrame,
    feature_columns: list[str],
    horizons: Iterable[int],
    league_order: list[str],
    current_league: str,
    currencies: list[str],
    profile: Profile,
    tags: dict[str, str],
    workers: int | None = None,
    seed: int = 42,
    progress: Callable[[str], None] = print,
    retune: bool = False,
) -> list[GlobalOutcome]:
    """Train, log and register the global model of each horizon; ``currencies`` are the ones being forecast now.
    What a horizon keeps of its champion's validation is ``global_model.reuse_of``'s choice (``retune``: nothing).
    ``features``: a scan (``scan_training_features``) keeps every league's features out of this process's memory
    for the whole retrain; the pooled rows are written to a file that the workers scan."""
    horizons = list(horizons)
    workers = min(workers or default_workers(), max(1, len(horizons) * len(MODEL_KINDS)))
    staging = _staging(lake)
    tracker = ModelTracker(lake)
    parent = tracker.start_parent_run(f"global-{current_league}-{profile.name}",
                                      {**tags, "kind": "retrain-global", "league": current_league,
                                       "profile": profile.name})
    staging.mkdir(parents=True, exist_ok=True)
    rows_path = write_parquet_atomic(pooled_rows(features, league_order, current_league, currencies),
                                     staging / "pooled_rows.parquet")
    specs = [GlobalSpec(rows_path, list(feature_columns), h, list(league_order), current_league, profile, seed)
             for h in horizons]
    example = _example_rows(features.lazy().filter(pl.col("league") == current_league).collect())
    outcomes: list[GlobalOutcome] = []
    failed = False
    try:
        with _worker_pool(workers) as pool:
            out_dirs = {h: staging / f"global-{h}d" for h in horizons}
            warm, fixed, kept = ({}, {}, {}) if retune else _reusable(tracker, specs, pool, progress)
            outcomes += [GlobalOutcome(h, GlobalResult(h, trained=False, reason=why), None, kept=version)
                         for h, (version, why) in kept.items()]
            specs = [s for s in specs if s.horizon not in kept]
            for done, result in enumerate(_global_results(specs, out_dirs, pool, workers, warm, fixed), 1):
                registration = None
                if result.trained:
                    registration = tracker.log_global(result, {**tags, "league": current_league,
                                                               "profile": profile.name,
                                                               "partition_key": f"{result.horizon}d"}, parent,
                                                      example=example)
                    note = (f"holdout skill {result.skill:+.3f}, MAE {result.validation_mae:.4f}, "
                            f"{'promoted' if registration.promoted else 'kept, not promoted'} ({registration.reason})")
                else:
                    note = f"skipped: {result.reason}"
                progress(f"[{done}/{len(specs)}] global {result.horizon}d: {note} ({result.seconds:.1f}s)")
                outcomes.append(GlobalOutcome(result.horizon, result, registration))
    except BaseException:
        failed = True
        raise
    finally:
        tracker.end_run(parent, failed=failed)
        shutil.rmtree(staging, ignore_errors=True)  # MLflow holds the copies
    write_model_metrics(lake, [], outcomes, tags.get("dagster_run_id", parent), current_league, profile.name)
    return outcomes


def train_currencies(
    lake: Lake,
    requests: Iterable[TrainRequest],
    current_league: str,
    profile_name: str,
    tags: dict[str, str],
    progress: Callable[[str], None] = print,
) -> list[TrainOutcome]:
    """Specialise the global champion of each horizon to each requested currency; log and register each."""
    requests = list(requests)
    tracker = ModelTracker(lake)
    staging = _staging(lake)
    latest = latest_feature_rows(lake, current_league)
    parent = tracker.start_parent_run(f"currencies-{current_league}-{profile_name}",
                                      {**tags, "kind": "retrain-currencies", "league": current_league,
                                       "profile": profile_name})
    outcomes: list[TrainOutcome] = []
    failed = False
    try:
        for horizon in sorted({r.horizon for r in requests}):
            name = global_model_name(horizon)
            champion = tracker.champion(name)
            todo = [r for r in requests if r.horizon == horizon]
            if champion is None:
                for r in todo:
                    result = CurrencyResult(r.currency, horizon, trained=False,
                                            reason=f"no champion {name}: train global_models first")
                    outcomes.append(TrainOutcome(r, result, None))
                    progress(f"{r.partition_key}: skipped: {result.reason}")
                continue
            version, directory = champion
            oof = pl.read_parquet(directory / OOF_FILE)
            for r in todo:
                result = train_currency(r.currency, horizon, oof, name, version,
                                        staging / f"{slug(r.currency)}-{horizon}d")
                own = latest.filter(pl.col("currency") == r.currency)
                registration = tracker.log_currency(result, {**tags, "league": current_league,
                                                             "profile": profile_name,
                                                             "partition_key": r.partition_key}, parent,
                                                    example=own if own.height else _example_rows(latest))
                progress(f"[{len(outcomes) + 1}/{len(requests)}] {r.partition_key}: skill {result.skill:+.3f} "
                         f"(scale {result.scale:.2f}, {result.own_rows} own rows), "
                         f"{'promoted' if registration.promoted else 'kept, not promoted'}")
                outcomes.append(TrainOutcome(r, result, registration))
    except BaseException:
        failed = True
        raise
    finally:
        tracker.end_run(parent, failed=failed)
        shutil.rmtree(staging, ignore_errors=True)
    write_model_metrics(lake, outcomes, [], tags.get("dagster_run_id", parent), current_league, profile_name)
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
    "scale": pl.Float64, "train_seconds": pl.Float64,
    "kind": pl.Utf8, "global_model_version": pl.Utf8, "metrics_scope": pl.Utf8, "global_mae_logret": pl.Float64,
}


def _registration_fields(reg: Registration | None, reason: str) -> dict:
    return {"model_name": reg.model_name if reg else None, "model_version": reg.version if reg else None,
            "promoted": reg.promoted if reg else False, "promotion_reason": reg.reason if reg else reason,
            "mlflow_run_id": reg.run_id if reg else None}


def write_model_metrics(lake: Lake, outcomes: list[TrainOutcome], globals_: list[GlobalOutcome], run_id: str,
                        league: str, profile: str) -> Path | None:
    """One row per training (a global model or a partition), appended as one file per run (``model_metrics``).

    The skill is out of sample for every choice made in training: a global model's is on its holdout league, which
    tuning and weights never saw; a partition's on its currency's rows of that league, with its scale chosen on the
    other leagues (``metrics_scope`` says which rows)."""
    now = datetime.now(UTC)
    rows = []
    for g in globals_:
        if g.kept:  # not a training: the champion's own row says what it was trained on
            continue
        r = g.result
        m = r.metrics.get("holdout", {})
        rows.append({
            "trained_at": now, "run_id": run_id, "league": league, "currency": None, "horizon_days": r.horizon,
            "profile": profile, "trained": r.trained, "reason": r.reason, **_registration_fields(g.registration,
                                                                                                 r.reason),
            "rows": r.data_window.get("rows"), "oof_rows": r.data_window.get("oof_rows"), "folds": r.fold_signature,
            "ensemble_mae_logret": m.get("ensemble", {}).get("mae_logret"),
            "persistence_mae_logret": m.get("persistence", {}).get("mae_logret"),
            "ensemble_skill": m.get("ensemble", {}).get("skill"),
            "ensemble_mape_price": m.get("ensemble", {}).get("mape_price"),
            "ensemble_directional_accuracy": m.get("ensemble", {}).get("directional_accuracy"),
            "ensemble_r2": m.get("ensemble", {}).get("r2"),
            **{f"{k}_mae_logret": m.get(k, {}).get("mae_logret") for k in ("lightgbm", "xgboost", "random_forest")},
            **{f"weight_{k}": r.weights.get(k) for k in ("lightgbm", "xgboost", "random_forest")},
            "scale": None, "train_seconds": r.seconds, "kind": "global", "global_model_version": None,
            "metrics_scope": HOLDOUT_SCOPE if m else "", "global_mae_logret": None,
        })
    for o in outcomes:
        r, m = o.result, o.result.metrics
        rows.append({
            "trained_at": now, "run_id": run_id, "league": league, "currency": r.currency,
            "horizon_days": r.horizon, "profile": profile, "trained": r.trained, "reason": r.reason,
            **_registration_fields(o.registration, r.reason),
            "rows": r.own_rows, "oof_rows": r.own_rows, "folds": r.fold_signature,
            "ensemble_mae_logret": m.get("specialised", {}).get("mae_logret"),
            "persistence_mae_logret": m.get("persistence", {}).get("mae_logret"),
            "ensemble_skill": m.get("specialised", {}).get("skill"),
            "ensemble_mape_price": m.get("specialised", {}).get("mape_price"),
            "ensemble_directional_accuracy": m.get("specialised", {}).get("directional_accuracy"),
            "ensemble_r2": m.get("specialised", {}).get("r2"),
            "lightgbm_mae_logret": None, "xgboost_mae_logret": None, "random_forest_mae_logret": None,
            "weight_lightgbm": None, "weight_xgboost": None, "weight_random_forest": None,
            "scale": r.scale if r.trained else None, "train_seconds": r.seconds, "kind": "currency",
            "global_model_version": r.global_version or None, "metrics_scope": r.metrics_scope,
            "global_mae_logret": m.get("global", {}).get("mae_logret"),
        })
    if not rows:  # every global champion kept as it is: no training to record
        return None
    frame = pl.DataFrame(rows, schema=MODEL_METRICS_SCHEMA)
    path = lake.model_metrics / f"{now.strftime('%Y%m%dT%H%M%S%f')}-{slug(run_id)[:36]}.parquet"
    return write_parquet_atomic(frame, path)


def _example_rows(rows: pl.DataFrame, n: int = 5) -> pl.DataFrame:
    """A few real rows of the newest day: the input example of a logged model."""
    if rows.height == 0:
        return rows
    return rows.filter(pl.col("date") == rows["date"].max()).sort("currency").head(n)


def latest_feature_rows(lake: Lake, league: str) -> pl.DataFrame:
    """The league's feature rows on its newest day (empty when it has none)."""
    files = [p for p in lake.parquet_files(lake.features) if p.parent.name == f"league={league}"]
    if not files:
        return pl.DataFrame()
    scan = pl.scan_parquet(files, hive_partitioning=False)
    return scan.filter(pl.col("date") == pl.col("date").max()).collect()


def scan_training_features(lake: Lake) -> pl.LazyFrame:
    """A scan of every stored feature row."""
    files = lake.parquet_files(lake.features)
    if not files:
        raise FileNotFoundError(f"No features under {lake.features}: materialize `features` first")
    return pl.scan_parquet(files, hive_partitioning=False)

"""One forecasting ensemble per (currency, horizon): LightGBM, XGBoost and a RandomForest.

- **Target.** The log-return over the horizon; the price forecast is ``price x exp(return)``.
- **Data.** The currency's rows from every past non-event league plus the current league, where the target is
  known. Training drops ``is_outlier`` days; inference never does.
- **Walk-forward validation, never shuffled.** League folds train on the leagues before league k and validate on
  league k. When the current league has enough labelled days, a last fold validates on its later days and trains
  on everything before them, less an embargo of ``horizon`` days so that no training target is realised inside the
  validation window. The last ``cv_folds`` folds are used.
- **Tuning.** Optuna with a seeded TPE sampler and a median pruner that sees the running fold error. LightGBM is
  the primary model and gets the whole trial budget; XGBoost half; the small RandomForest space a tenth. Early
  stopping uses an inner hold-out, the last league of each training fold, never the validation fold.
- **Ensemble.** Weights are inverse out-of-fold MAE, normalised; 0.5 / 0.3 / 0.2 when there are fewer than
  ``MIN_OOF_ROWS`` out-of-fold rows. The ensemble's return is then shrunk towards persistence (0) by a factor
  ``shrink`` in [0, 1] chosen on the out-of-fold predictions: a model with no skill becomes "no change".
  The reported ensemble metrics use a cross-fitted shrink (chosen on the other folds), so they stay honest.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import joblib
import lightgbm as lgb
import numpy as np
import optuna
import polars as pl
import xgboost as xgb
from sklearn.ensemble import RandomForestRegressor

from poe_pipeline.settings import Profile

MODEL_KINDS = ("lightgbm", "xgboost", "random_forest")
FALLBACK_WEIGHTS = {"lightgbm": 0.5, "xgboost": 0.3, "random_forest": 0.2}
MIN_TRAIN_ROWS = 120  # below this a currency is skipped: a model on a handful of days is noise
MIN_OOF_ROWS = 30  # fewer out-of-fold rows than this: fallback weights
MIN_CURRENT_FOLD_DAYS = 14  # labelled days the current league needs on each side of its own fold
MIN_FOLD_TRAIN_ROWS = 60
POOL_WEIGHT = 0.3  # a pooled row of a similar currency counts this much of one of the partition's own
DIRECTION_THRESHOLD = math.log(1.01)  # directional accuracy counts only moves of at least 1 %
SHRINK_GRID = np.linspace(0.0, 1.0, 21)
ARTIFACT_FILES = {"lightgbm": "lightgbm.txt", "xgboost": "xgboost.ubj", "random_forest": "random_forest.joblib"}

optuna.logging.set_verbosity(optuna.logging.WARNING)
# LightGBM warns when a validation Dataset shares bins with its reference, which is the point of building it once.
warnings.filterwarnings("ignore", message="Overriding the parameters from Reference Dataset", module="lightgbm")
warnings.filterwarnings("ignore", message="Ignoring params argument", module="lightgbm")


class SkipTraining(Exception):
    """A partition that cannot be trained honestly; the message is the reason shown to users."""


@dataclass
class TrainingSet:
    currency: str
    horizon: int
    feature_names: list[str]
    X: np.ndarray
    y: np.ndarray
    leagues: np.ndarray
    dates: np.ndarray  # datetime64[D]
    league_order: list[str]  # chronological
    is_target: np.ndarray  # rows of the partition's own currency (pooled rows of similar currencies are False)
    weight: np.ndarray

    @property
    def rows(self) -> int:
        return len(self.y)

    @property
    def target_rows(self) -> int:
        return int(self.is_target.sum())

    def data_hash(self) -> str:
        digest = hashlib.sha256(np.ascontiguousarray(self.X).tobytes())
        digest.update(self.y.tobytes())
        digest.update(",".join(self.feature_names).encode())
        return digest.hexdigest()[:16]


@dataclass
class Fold:
    name: str
    train: np.ndarray  # indices
    valid: np.ndarray
    inner_train: np.ndarray  # early stopping split of ``train``
    inner_valid: np.ndarray


def target_column(horizon: int) -> str:
    return f"target_logret_{horizon}d"


# Price levels differ by orders of magnitude across currencies and leagues (the Divine Orb went from 10 to 200 chaos
# in 3.19), so trees that split on a level do not generalise. Models see levels only relative to today's price.
_LEVEL_STATS = ("mean", "min", "max", "median")
_LEVEL_WINDOWS = (3, 5, 7, 14)
_LAGS = (1, 2, 3, 5, 7, 14)
# Left out: levels, the unknown-live league end, a rank whose meaning shifts each league, volume (null in dumps).
EXCLUDED_INPUTS = {
    "log_price", "ema_12", "ema_26", "log_price_rel_divine", "league_recency_rank", "league_progress",
    "days_to_league_end", "volume",
    *(f"log_price_lag_{k}" for k in _LAGS),
    *(f"log_price_roll_{s}_{w}" for s in (*_LEVEL_STATS,) for w in (1, *_LEVEL_WINDOWS)),
}


def model_inputs(rows: pl.DataFrame, feature_columns: list[str]) -> tuple[pl.DataFrame, list[str]]:
    """The model's input columns: stationary features, plus today's price relative to its lags and windows."""
    relative = {
        **{f"logret_lag_{k}": pl.col("log_price") - pl.col(f"log_price_lag_{k}") for k in _LAGS},
        **{f"log_price_vs_{s}_{w}": pl.col("log_price") - pl.col(f"log_price_roll_{s}_{w}")
           for s in _LEVEL_STATS for w in _LEVEL_WINDOWS},
        "log_price_vs_ema_12": pl.col("log_price") - pl.col("ema_12"),
        "log_price_vs_ema_26": pl.col("log_price") - pl.col("ema_26"),
    }
    kept = [c for c in feature_columns if c not in EXCLUDED_INPUTS]
    names = kept + list(relative)
    return rows.with_columns(**relative), names


def training_set(
    rows: pl.DataFrame,
    feature_columns: list[str],
    currency: str,
    horizon: int,
    league_order: list[str],
    pool: list[str] | None = None,
    pool_weight: float = POOL_WEIGHT,
) -> TrainingSet:
    """Rows of ``currency`` (and of the ``pool`` of similar currencies, down-weighted) in ``league_order``
    (chronological, non-event) with a known target and no outlier."""
    target = target_column(horizon)
    members = [currency, *(pool or [])]
    rows, feature_names = model_inputs(rows.filter(pl.col("currency").is_in(members)), feature_columns)
    data = (
        rows.filter(
            pl.col("league").is_in(league_order)
            & pl.col(target).is_not_null()
            & ~pl.col("is_outlier").fill_null(False)
        )
        .with_columns(pl.col("league").replace_strict({lg: i for i, lg in enumerate(league_order)}).alias("_order"))
        .sort("_order", "date", "currency")
    )
    is_target = (data["currency"] == currency).to_numpy()
    return TrainingSet(
        currency=currency,
        horizon=horizon,
        feature_names=list(feature_names),
        X=data.select(feature_names).cast(pl.Float32).to_numpy(),
        y=data[target].to_numpy().astype(np.float64),
        leagues=data["league"].to_numpy(),
        dates=data["date"].to_numpy().astype("datetime64[D]"),
        league_order=list(league_order),
        is_target=is_target,
        weight=np.where(is_target, 1.0, pool_weight),
    )


def _inner_split(ts: TrainingSet, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Early-stopping hold-out inside a training fold: its last league, or its last 20 % of days."""
    leagues = [lg for lg in ts.league_order if lg in set(ts.leagues[train])]
    if len(leagues) >= 2:
        last = train[ts.leagues[train] == leagues[-1]]
        if 20 <= len(last) <= len(train) // 2:
            return train[ts.leagues[train] != leagues[-1]], last
    cut = int(len(train) * 0.8)
    return train[:cut], train[cut:]


def walk_forward_folds(ts: TrainingSet, current_league: str, n_folds: int) -> list[Fold]:
    """League folds, then a within-league fold of the current league; the last ``n_folds`` of them."""
    idx = np.arange(ts.rows)
    folds: list[Fold] = []
    for k, league in enumerate(ts.league_order):
        if league == current_league:
            continue
        train = idx[np.isin(ts.leagues, ts.league_order[:k])]
        valid = idx[(ts.leagues == league) & ts.is_target]
        if ts.is_target[train].sum() >= MIN_FOLD_TRAIN_ROWS and len(valid) >= 10:
            folds.append(Fold(f"league:{league}", train, valid, *_inner_split(ts, train)))
    in_current = ts.leagues == current_league
    current = idx[in_current & ts.is_target]
    if len(current) >= 2 * MIN_CURRENT_FOLD_DAYS:
        days = np.unique(ts.dates[current])
        cut = days[len(days) // 2]
        valid = current[ts.dates[current] >= cut]
        embargo = cut - np.timedelta64(ts.horizon, "D")
        earlier = idx[np.isin(ts.leagues, ts.league_order[: ts.league_order.index(current_league)])]
        train = np.concatenate([earlier, idx[in_current & (ts.dates < embargo)]])
        if ts.is_target[train].sum() >= MIN_FOLD_TRAIN_ROWS:
            folds.append(Fold(f"current:{current_league}>={cut}", train, valid, *_inner_split(ts, train)))
    return folds[-n_folds:] if n_folds > 0 else []


# --- the three models -------------------------------------------------------------------------------------------


def _lgb_params(trial: optuna.Trial | None, params: dict | None = None) -> dict:
    if params is None:
        assert trial is not None
        params = {
            "num_leaves": trial.suggest_int("num_leaves", 20, 150),
            "learning_rate": trial.suggest_float("learning_rate", 0.01, 0.3, log=True),
            "feature_fraction": trial.suggest_float("feature_fraction", 0.5, 1.0),
            "bagging_fraction": trial.suggest_float("bagging_fraction", 0.5, 1.0),
            "min_child_samples": trial.suggest_int("min_child_samples", 10, 100),
            "reg_alpha": trial.suggest_float("reg_alpha", 0.0, 2.0),
            "reg_lambda": trial.suggest_float("reg_lambda", 0.0, 2.0),
        }
    return {
        **params,
        "objective": "huber",  # robust to the league-start jumps that survive the outlier filter
        "alpha": 0.1,
        "bagging_freq": 1,
        "num_threads": 1,
        "verbosity": -1,
        "seed": 7,
        "deterministic": True,
        "force_col_wise": True,
    }


def _xgb_params(trial: optuna.Trial | None, params: dict | None = None) -> dict:
    if params is None:
        assert trial is not None
        params = {
            "max_depth": trial.suggest_int("max_depth", 3, 10),
            "learning_rate": trial.suggest_float("learning_rate", 0.01, 0.3, log=True),
            "subsample": trial.suggest_float("subsample", 0.6, 1.0),
            "colsample_bytree": trial.suggest_float("colsample_bytree", 0.6, 1.0),
            "n_estimators": trial.suggest_int("n_estimators", 100, 500),
            "reg_alpha": trial.suggest_float("reg_alpha", 0.0, 2.0),
            "reg_lambda": trial.suggest_float("reg_lambda", 0.0, 2.0),
        }
    return {**params, "objective": "reg:pseudohubererror", "huber_slope": 0.1, "nthread": 1, "seed": 7,
            "tree_method": "hist", "verbosity": 0}


def _rf_params(trial: optuna.Trial | None, params: dict | None = None) -> dict:
    if params is None:
        assert trial is not None
        params = {
            "max_depth": trial.suggest_categorical("max_depth", [4, 6, 10]),
            "min_samples_leaf": trial.suggest_categorical("min_samples_leaf", [5, 20, 50]),
            "max_features": trial.suggest_categorical("max_features", [0.2, 0.4]),
        }
    # It was 70 % of a partition's CPU with 80 trees on 70 % samples; averaging saturates well before that.
    return {**params, "n_estimators": 50, "max_samples": 0.5, "n_jobs": 1, "random_state": 7}


@dataclass
class FoldData:
    """Per-fold matrices, built once and reused by every trial (LightGBM Datasets included)."""

    fold: Fold
    lgb_train: lgb.Dataset
    lgb_inner_valid: lgb.Dataset
    xgb_train: xgb.DMatrix
    xgb_inner_valid: xgb.DMatrix
    xgb_valid: xgb.DMatrix


def _fold_data(ts: TrainingSet, folds: list[Fold]) -> list[FoldData]:
    out = []
    for f in folds:
        it, iv = f.inner_train, f.inner_valid
        lgb_train = lgb.Dataset(ts.X[it], ts.y[it], weight=ts.weight[it], feature_name=ts.feature_names,
                                free_raw_data=False, params={"verbosity": -1, "max_bin": 63})
        lgb_valid = lgb.Dataset(ts.X[iv], ts.y[iv], weight=ts.weight[iv], reference=lgb_train, free_raw_data=False)
        out.append(FoldData(
            f, lgb_train.construct(), lgb_valid.construct(),
            xgb.DMatrix(ts.X[it], ts.y[it], weight=ts.weight[it], nthread=1),
            xgb.DMatrix(ts.X[iv], ts.y[iv], weight=ts.weight[iv], nthread=1),
            xgb.DMatrix(ts.X[f.valid], nthread=1),
        ))
    return out


def _fit_lgb(params: dict, train: lgb.Dataset, valid: lgb.Dataset | None, rounds: int, early: int) -> lgb.Booster:
    callbacks = [lgb.early_stopping(early, verbose=False)] if valid is not None else []
    return lgb.train(params, train, num_boost_round=rounds, valid_sets=[valid] if valid is not None else None,
                     callbacks=callbacks)


def _fit_xgb(params: dict, train: xgb.DMatrix, valid: xgb.DMatrix | None, early: int) -> xgb.Booster:
    p = {k: v for k, v in params.items() if k != "n_estimators"}
    return xgb.train(p, train, num_boost_round=params["n_estimators"],
                     evals=[(valid, "valid")] if valid is not None else (),
                     early_stopping_rounds=early if valid is not None else None, verbose_eval=False)


def _predict_xgb(model: xgb.Booster, data: xgb.DMatrix) -> np.ndarray:
    best = getattr(model, "best_iteration", None)
    rng = (0, best + 1) if best is not None else (0, 0)
    return model.predict(data, iteration_range=rng)


def _fold_predict(kind: str, params: dict, fd: FoldData, ts: TrainingSet, early: int) -> tuple[np.ndarray, int]:
    """Fit on a fold's training rows, predict its validation rows; also the boosting rounds used."""
    f = fd.fold
    if kind == "lightgbm":
        model = _fit_lgb(params, fd.lgb_train, fd.lgb_inner_valid, 1000, early)
        return model.predict(ts.X[f.valid], num_iteration=model.best_iteration), model.best_iteration or 1000
    if kind == "xgboost":
        model = _fit_xgb(params, fd.xgb_train, fd.xgb_inner_valid, early)
        return _predict_xgb(model, fd.xgb_valid), (model.best_iteration or params["n_estimators"] - 1) + 1
    rf = RandomForestRegressor(**params).fit(ts.X[f.train], _clip_target(ts.y[f.train]),
                                             sample_weight=ts.weight[f.train])
    return rf.predict(ts.X[f.valid]), params["n_estimators"]


def _clip_target(y: np.ndarray) -> np.ndarray:
    """Squared-error forests chase league-start jumps; clip their training target to its 1-99 % range."""
    lo, hi = np.quantile(y, [0.01, 0.99])
    return np.clip(y, lo, hi)


PARAM_BUILDERS: dict[str, Callable] = {"lightgbm": _lgb_params, "xgboost": _xgb_params, "random_forest": _rf_params}
TRIAL_SHARE = {"lightgbm": 1.0, "xgboost": 0.5, "random_forest": 0.1}


@dataclass
class Tuned:
    kind: str
    params: dict
    rounds: int
    oof: np.ndarray  # out-of-fold predictions, aligned with ``oof_index``
    trials: int


def tune(kind: str, ts: TrainingSet, fold_data: list[FoldData], profile: Profile, seed: int) -> Tuned:
    """Optuna over the model's space; objective: mean validation MAE across folds (pruned fold by fold)."""
    build = PARAM_BUILDERS[kind]
    n_trials = max(1, round(profile.optuna_trials * TRIAL_SHARE[kind]))
    early = profile.early_stopping_rounds

    fold_outputs: dict[int, tuple[list[np.ndarray], list[int]]] = {}  # trial -> its fold predictions and rounds

    def objective(trial: optuna.Trial) -> float:
        params = build(trial)
        errors, preds, rounds = [], [], []
        for step, fd in enumerate(fold_data):
            pred, used = _fold_predict(kind, params, fd, ts, early)
            preds.append(pred)
            rounds.append(used)
            errors.append(float(np.mean(np.abs(ts.y[fd.fold.valid] - pred))))
            trial.report(float(np.mean(errors)), step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        fold_outputs[trial.number] = (preds, rounds)
        return float(np.mean(errors))

    study = optuna.create_study(
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, n_trials)),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0),
    )
    study.optimize(objective, n_trials=n_trials)
    # the best trial ran every fold (a pruned trial is never best): its predictions are the out-of-fold ones
    preds, rounds = fold_outputs[study.best_trial.number]
    return Tuned(kind, dict(study.best_params), int(np.median(rounds)), np.concatenate(preds), len(study.trials))


# --- metrics ----------------------------------------------------------------------------------------------------


def forecast_metrics(y: np.ndarray, pred: np.ndarray, persistence_mae: float | None = None) -> dict[str, float]:
    """MAE of log-return, MAPE of the price, directional accuracy on >= 1 % moves, R2, skill."""
    if len(y) == 0:
        return {}
    err = y - pred
    mae = float(np.mean(np.abs(err)))
    mape = float(np.mean(np.abs(np.exp(pred - y) - 1.0)))  # |P_hat - P| / P with P = P0 e^y, P_hat = P0 e^pred
    moved = np.abs(y) >= DIRECTION_THRESHOLD
    direction = float(np.mean(np.sign(pred[moved]) == np.sign(y[moved]))) if moved.any() else float("nan")
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(err**2)) / ss_tot if ss_tot > 0 else float("nan")
    out = {"mae_logret": mae, "mape_price": mape, "directional_accuracy": direction, "r2": r2, "n": float(len(y))}
    if persistence_mae is not None:
        out["skill"] = 1.0 - mae / persistence_mae if persistence_mae > 0 else 0.0
    return out


def _best_shrink(y: np.ndarray, pred: np.ndarray) -> float:
    maes = [np.mean(np.abs(y - a * pred)) for a in SHRINK_GRID]
    return float(SHRINK_GRID[int(np.argmin(maes))])


def cross_fitted_shrink(y: np.ndarray, pred: np.ndarray, fold_ids: np.ndarray) -> np.ndarray:
    """Each fold's predictions shrunk by the factor the other folds chose (the fold itself never votes)."""
    out = np.empty_like(pred)
    folds = np.unique(fold_ids)
    for f in folds:
        mask = fold_ids == f
        others = ~mask
        a = _best_shrink(y[others], pred[others]) if others.any() else 1.0
        out[mask] = a * pred[mask]
    return out


# --- training one partition -------------------------------------------------------------------------------------


@dataclass
class PartitionResult:
    currency: str
    horizon: int
    trained: bool
    reason: str = ""
    weights: dict[str, float] = field(default_factory=dict)
    shrink: float = 1.0
    params: dict[str, dict] = field(default_factory=dict)
    rounds: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # per model, "ensemble", "persistence"
    folds: list[str] = field(default_factory=list)
    data_window: dict = field(default_factory=dict)
    feature_names: list[str] = field(default_factory=list)
    feature_importance: dict[str, float] = field(default_factory=dict)
    artifact_dir: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def validation_mae(self) -> float:
        return self.metrics.get("ensemble", {}).get("mae_logret", float("nan"))

    @property
    def fold_signature(self) -> str:
        return "|".join(self.folds)


@dataclass
class Validation:
    """What tuning and walk-forward validation decided for a partition; a warm refit reuses it as it is."""

    params: dict[str, dict]
    rounds: dict[str, int]
    weights: dict[str, float]
    shrink: float
    metrics: dict[str, dict[str, float]]
    folds: list[str]
    residuals: pl.DataFrame  # league, date, actual_logret, residual (cross-fitted), fold

    @classmethod
    def of(cls, result: PartitionResult) -> Validation:
        """The validation behind a trained result (its residuals are read from the artifact folder)."""
        return cls(result.params, result.rounds, result.weights, result.shrink, result.metrics, result.folds,
                   pl.read_parquet(Path(result.artifact_dir) / "residuals.parquet"))


DEFAULT_PARAMS = {
    "lightgbm": {"num_leaves": 31, "learning_rate": 0.05, "feature_fraction": 0.8, "bagging_fraction": 0.8,
                 "min_child_samples": 30, "reg_alpha": 0.0, "reg_lambda": 1.0},
    "xgboost": {"max_depth": 4, "learning_rate": 0.05, "subsample": 0.8, "colsample_bytree": 0.8,
                "n_estimators": 200, "reg_alpha": 0.0, "reg_lambda": 1.0},
    "random_forest": {"max_depth": 6, "min_samples_leaf": 20, "max_features": 0.4},
}


def validate(ts: TrainingSet, current_league: str, profile: Profile, seed: int) -> Validation:
    """Tune each model on the walk-forward folds, then weigh the ensemble and choose its shrink out of fold."""
    folds = walk_forward_folds(ts, current_league, profile.cv_folds)
    fold_data = _fold_data(ts, folds)
    oof_index = np.concatenate([f.valid for f in folds]) if folds else np.array([], dtype=int)
    fold_ids = np.concatenate([np.full(len(f.valid), i) for i, f in enumerate(folds)]) if folds else oof_index
    y_oof = ts.y[oof_index]

    tuned: dict[str, Tuned] = {}
    for kind in MODEL_KINDS:
        if folds:
            tuned[kind] = tune(kind, ts, fold_data, profile, seed)
        else:  # nothing to validate on: default parameters, no tuning
            tuned[kind] = Tuned(kind, DEFAULT_PARAMS[kind], 200, np.array([]), 0)

    persistence_mae = float(np.mean(np.abs(y_oof))) if len(y_oof) else float("nan")
    model_mae = {k: float(np.mean(np.abs(y_oof - t.oof))) if len(y_oof) else float("nan") for k, t in tuned.items()}
    if len(y_oof) >= MIN_OOF_ROWS:
        inverse = {k: 1.0 / max(m, 1e-9) for k, m in model_mae.items()}
        weights = {k: v / sum(inverse.values()) for k, v in inverse.items()}
    else:
        weights = dict(FALLBACK_WEIGHTS)

    metrics: dict[str, dict[str, float]] = {"persistence": forecast_metrics(y_oof, np.zeros_like(y_oof),
                                                                           persistence_mae)}
    for kind, t in tuned.items():
        metrics[kind] = forecast_metrics(y_oof, t.oof, persistence_mae)
    if len(y_oof):
        blend = sum(weights[k] * tuned[k].oof for k in MODEL_KINDS)
        shrink = _best_shrink(y_oof, blend)
        honest = cross_fitted_shrink(y_oof, blend, fold_ids)
        metrics["ensemble"] = forecast_metrics(y_oof, honest, persistence_mae)
        metrics["ensemble_unshrunk"] = forecast_metrics(y_oof, blend, persistence_mae)
        residuals = y_oof - honest
    else:
        shrink, residuals = 0.0, np.array([])  # unvalidated: forecast "no change" and say so
    return Validation(
        params={k: t.params for k, t in tuned.items()}, rounds={k: t.rounds for k, t in tuned.items()},
        weights=weights, shrink=shrink, metrics=metrics, folds=[f.name for f in folds],
        residuals=pl.DataFrame({"league": ts.leagues[oof_index], "date": ts.dates[oof_index],
                                "actual_logret": y_oof, "residual": residuals, "fold": fold_ids.astype(np.int32)}),
    )


def train_partition(
    rows: pl.DataFrame,
    feature_names: list[str],
    currency: str,
    horizon: int,
    league_order: list[str],
    current_league: str,
    profile: Profile,
    out_dir: Path,
    seed: int = 42,
    pool: list[str] | None = None,
    warm: Validation | None = None,
) -> PartitionResult:
    """Tune, validate and fit the ensemble of one (currency, horizon); write its artifacts to ``out_dir``.

    ``pool``: similar currencies whose rows join the training data at ``POOL_WEIGHT``; validation and metrics
    use the partition's own currency only. ``warm``: an earlier validation of this partition; its
    hyperparameters, weights, shrink and residuals are kept and only the final models are refitted on ``rows``
    (a cheap refit between full re-tunes).
    """
    started = time.perf_counter()
    ts = training_set(rows, feature_names, currency, horizon, league_order, pool)
    result = PartitionResult(currency, horizon, trained=False, feature_names=ts.feature_names)
    if ts.target_rows < MIN_TRAIN_ROWS:
        result.reason = (f"only {ts.target_rows} labelled rows for {currency} at {horizon}d "
                         f"(at least {MIN_TRAIN_ROWS} are needed)")
        return result
    if current_league not in set(ts.leagues[ts.is_target]):
        result.reason = f"{currency} has no labelled rows in the current league {current_league}"
        return result
    checked = warm if warm is not None else validate(ts, current_league, profile, seed)

    # Final models on every row, with the rounds that early stopping chose on the folds.
    out_dir.mkdir(parents=True, exist_ok=True)
    lgb_model = lgb.train(_lgb_params(None, checked.params["lightgbm"]),
                          lgb.Dataset(ts.X, ts.y, weight=ts.weight, feature_name=ts.feature_names,
                                      params={"max_bin": 63}),
                          num_boost_round=max(checked.rounds["lightgbm"], 10))
    lgb_model.save_model(str(out_dir / ARTIFACT_FILES["lightgbm"]))
    xgb_params = _xgb_params(None, checked.params["xgboost"]) | {"n_estimators": max(checked.rounds["xgboost"], 10)}
    xgb_model = _fit_xgb(xgb_params, xgb.DMatrix(ts.X, ts.y, weight=ts.weight, nthread=1,
                                                 feature_names=ts.feature_names), None, 0)
    xgb_model.save_model(str(out_dir / ARTIFACT_FILES["xgboost"]))
    rf = RandomForestRegressor(**_rf_params(None, checked.params["random_forest"])).fit(
        ts.X, _clip_target(ts.y), sample_weight=ts.weight)
    joblib.dump(rf, out_dir / ARTIFACT_FILES["random_forest"], compress=3)

    gain = lgb_model.feature_importance(importance_type="gain")
    total = float(gain.sum()) or 1.0
    importance = dict(sorted(((n, float(g) / total) for n, g in zip(ts.feature_names, gain, strict=True)),
                             key=lambda kv: -kv[1]))
    result.trained = True
    result.weights = checked.weights
    result.shrink = checked.shrink
    result.params = checked.params
    result.rounds = checked.rounds
    result.metrics = checked.metrics
    result.folds = checked.folds
    result.data_window = {
        "first_date": str(ts.dates.min()), "last_date": str(ts.dates.max()), "rows": ts.target_rows,
        "pooled_rows": ts.rows - ts.target_rows, "pool": ",".join(pool or []),
        "leagues": sorted(set(ts.leagues.tolist()), key=ts.league_order.index), "data_hash": ts.data_hash(),
        "oof_rows": checked.residuals.height, "warm_refit": warm is not None,
    }
    result.feature_importance = importance
    result.artifact_dir = str(out_dir)
    checked.residuals.write_parquet(out_dir / "residuals.parquet")
    result.seconds = time.perf_counter() - started
    (out_dir / "ensemble.json").write_text(json.dumps(result.as_dict(), indent=1, default=str))
    return result


# --- loading a trained ensemble ---------------------------------------------------------------------------------


class Ensemble:
    """A trained ensemble loaded from its artifact folder (native formats plus ``ensemble.json``)."""

    def __init__(self, directory: Path):
        directory = Path(directory)
        self.directory = directory
        self.meta = json.loads((directory / "ensemble.json").read_text())
        self.feature_names: list[str] = self.meta["feature_names"]
        self.weights: dict[str, float] = self.meta["weights"]
        self.shrink: float = float(self.meta["shrink"])
        self.lightgbm = lgb.Booster(model_file=str(directory / ARTIFACT_FILES["lightgbm"]), params={"num_threads": 1})
        self.xgboost = xgb.Booster(params={"nthread": 1})
        self.xgboost.load_model(str(directory / ARTIFACT_FILES["xgboost"]))
        # joblib: 20x faster to load than skops for a forest; these files come only from our own training runs.
        self.random_forest = joblib.load(directory / ARTIFACT_FILES["random_forest"])

    def residuals(self) -> pl.DataFrame:
        return pl.read_parquet(self.directory / "residuals.parquet")

    def predict(self, rows: pl.DataFrame) -> np.ndarray:
        """Predicted log-returns for feature rows (columns ``feature_names``)."""
        return self.predict_inputs(model_inputs(rows, [])[0])

    def predict_inputs(self, inputs: pl.DataFrame) -> np.ndarray:
        """``predict`` for rows that already went through ``model_inputs`` (once for every horizon)."""
        X = inputs.select(self.feature_names).cast(pl.Float32).to_numpy()
        parts = {
            "lightgbm": self.lightgbm.predict(X),
            "xgboost": self.xgboost.predict(xgb.DMatrix(X, nthread=1, feature_names=self.feature_names)),
            "random_forest": forest_predict(self.random_forest, X),
        }
        return self.shrink * sum(self.weights[k] * parts[k] for k in MODEL_KINDS)


def forest_predict(forest: RandomForestRegressor, X: np.ndarray) -> np.ndarray:
    """The forest's prediction, the mean of its trees', without the per-tree joblib dispatch of
    ``forest.predict`` (about 0.7 ms a tree: 35 ms for one row, most of a forecast's time)."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    return np.mean([tree.predict(X, check_input=False) for tree in forest.estimators_], axis=0)


def limit_threads() -> None:
    """One thread per model: processes, not threads, give the parallelism (never oversubscribe 2 cores)."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"


def similar_currencies(rows: pl.DataFrame, currency: str, k: int, min_overlap: int = 60) -> list[str]:
    """The ``k`` currencies whose daily (winsorized) log-returns correlate most with ``currency``'s.

    Correlation is over the (league, date) days both were observed in ``rows``; pass only data up to the
    forecast origin and this stays leak-free.
    """
    if k <= 0:
        return []
    returns = rows.filter(~pl.col("is_imputed")).select("league", "date", "currency", "logret_1d_winsorized")
    mine = returns.filter(pl.col("currency") == currency).select(
        "league", "date", pl.col("logret_1d_winsorized").alias("mine"))
    scored = (
        returns.filter(pl.col("currency") != currency)
        .join(mine, on=["league", "date"])
        .drop_nulls()
        .group_by("currency")
        .agg(pl.corr("logret_1d_winsorized", "mine").alias("corr"), pl.len().alias("n"))
        .filter((pl.col("n") >= min_overlap) & pl.col("corr").is_finite())
        .sort(["corr", "currency"], descending=[True, False])
    )
    return scored.head(k)["currency"].to_list()

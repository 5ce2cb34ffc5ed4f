"""The models' shared machinery: inputs, the three model kinds, walk-forward tuning and the saved ensemble.

Two kinds of model are built on it (the assets ``global_models`` and ``currency_models``):

- ``global_model``: one ensemble per horizon, pooled over many currencies and every past league;
- ``currency_model``: one per (currency, horizon), the global model specialised to that currency.

- **Target.** The log-return over the horizon; the price forecast is ``price x exp(return)``.
- **Loss.** The metric is the mean absolute log error, so every model fits an L1 loss: LightGBM ``l1``, XGBoost
  ``reg:absoluteerror``; the RandomForest (squared error only, at a usable speed) fits targets clipped to their
  1-99 % range. Outlier days stay in training: what follows a jump is exactly what a forecaster must learn.
- **Walk-forward, never shuffled.** A fold validates on one league and trains on the leagues before it; early
  stopping uses the last of those leagues, never the validation league.
- **Tuning.** Optuna with a seeded TPE sampler and a fixed trial count; the measured default is always the first
  trial. LightGBM gets the profile's whole trial budget, XGBoost half, the small RandomForest space a tenth. A
  median pruner stops a trial after a fold whose running error is worse than the completed trials'. Pruning inside
  a fit (``StepMedianPruner``: every ``CHECK_EVERY`` boosting rounds, every 10 trees of a forest) is there but off
  (``PRUNE_INSIDE_FITS``): it halved tuning's time and lost holdout skill where it was measured. Each fold's
  LightGBM Dataset and XGBoost DMatrix are built once (``fold_data``) and reused by every trial of every model.
- **Ensemble.** Weights minimise the blend's validation MAE over a grid of the simplex (``FALLBACK_WEIGHTS`` with
  too few rows).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
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
MIN_OOF_ROWS = 30  # fewer validation rows than this: fallback weights
DIRECTION_THRESHOLD = math.log(1.01)  # directional accuracy counts only moves of at least 1 %
ARTIFACT_FILES = {"lightgbm": "lightgbm.txt", "xgboost": "xgboost.ubj", "random_forest": "random_forest.joblib"}
META_FILE = "ensemble.json"
MAX_ROUNDS = 1000
CHECK_EVERY = 25  # boosting rounds between two reports to the pruner
FOLD_STEPS = MAX_ROUNDS // CHECK_EVERY + 1  # a fold's pruning steps: its boosting checkpoints, then its error
FOREST_CHECK = 10  # trees between two reports of a tuning forest to the pruner

optuna.logging.set_verbosity(optuna.logging.WARNING)
# LightGBM warns when a validation Dataset shares bins with its reference, which is the point of building it once.
warnings.filterwarnings("ignore", message="Overriding the parameters from Reference Dataset", module="lightgbm")
warnings.filterwarnings("ignore", message="Ignoring params argument", module="lightgbm")


class SkipTraining(Exception):
    """A model that cannot be trained honestly; the message is the reason shown to users."""


def target_column(horizon: int) -> str:
    return f"target_logret_{horizon}d"


# --- inputs -----------------------------------------------------------------------------------------------------

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


# The models learn what a day's move adds to a reversion towards the median of the last 3 days' prices (the anchor):
# trees approximate a continuous reversion in coarse steps, so it is given to them and they learn the rest.
ANCHOR_INPUT = "log_price_vs_median_3"


def anchor(X: np.ndarray, feature_names: list[str]) -> np.ndarray:
    """Each row's anchor forecast, the log-return back to the median of the last 3 days (0 where unknown)."""
    if ANCHOR_INPUT not in feature_names:
        return np.zeros(len(X))
    a = -X[:, feature_names.index(ANCHOR_INPUT)].astype(np.float64)
    return np.where(np.isfinite(a), a, 0.0)


def model_inputs(rows: pl.DataFrame | pl.LazyFrame, feature_columns: list[str],
                 ) -> tuple[pl.DataFrame | pl.LazyFrame, list[str]]:
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


def hash_rows(digest, matrix: np.ndarray, rows: np.ndarray | None = None, block: int = 16_384) -> None:
    """Feed ``matrix[rows]`` (every row by default) to ``digest`` as C-ordered bytes, a block of rows at a time: the
    digest of ``np.ascontiguousarray(matrix[rows]).tobytes()`` without two copies of the matrix."""
    n = len(matrix) if rows is None else len(rows)
    for start in range(0, n, block):
        part = matrix[start:start + block] if rows is None else matrix[rows[start:start + block]]
        digest.update(np.ascontiguousarray(part))


@dataclass
class ModelData:
    """Rows with a known target as model matrices, in league order (chronological) then date and currency."""

    horizon: int
    feature_names: list[str]
    X: np.ndarray  # float32
    y: np.ndarray
    weight: np.ndarray
    leagues: np.ndarray
    currencies: np.ndarray
    dates: np.ndarray  # datetime64[D]
    league_order: list[str]

    @property
    def rows(self) -> int:
        return len(self.y)

    @functools.cached_property
    def base(self) -> np.ndarray:
        """The anchor forecast of each row; the models add their prediction to it."""
        return anchor(self.X, self.feature_names)

    @functools.cached_property
    def label(self) -> np.ndarray:
        """What the models learn: the target beyond the anchor."""
        return self.y - self.base

    def data_hash(self) -> str:
        digest = hashlib.sha256()
        hash_rows(digest, self.X)
        digest.update(self.y.tobytes())
        digest.update(",".join(self.feature_names).encode())
        return digest.hexdigest()[:16]

    def keys(self, index: np.ndarray | None = None) -> pl.DataFrame:
        idx = slice(None) if index is None else index
        return pl.DataFrame({"league": self.leagues[idx], "currency": self.currencies[idx],
                             "date": self.dates[idx]})

    @classmethod
    def from_rows(cls, rows: pl.DataFrame, feature_columns: list[str], horizon: int,
                  league_order: list[str]) -> ModelData:
        frame, names = model_frame(rows, feature_columns, horizon, league_order)
        return cls.from_frame(frame, names, horizon, league_order)

    @classmethod
    def from_frame(cls, frame: pl.DataFrame, names: list[str], horizon: int, league_order: list[str]) -> ModelData:
        """From ``model_frame``'s output."""
        return cls(
            horizon=horizon,
            feature_names=list(names),
            X=frame.select(names).to_numpy(),
            y=frame[target_column(horizon)].to_numpy().astype(np.float64),
            weight=np.ones(frame.height),
            leagues=frame["league"].to_numpy(),
            currencies=frame["currency"].to_numpy(),
            dates=frame["date"].to_numpy().astype("datetime64[D]"),
            league_order=list(league_order),
        )


def model_frame(rows: pl.DataFrame | pl.LazyFrame, feature_columns: list[str], horizon: int, league_order: list[str],
                keep: Iterable[str] = ()) -> tuple[pl.DataFrame, list[str]]:
    """The rows of ``league_order`` with a known target, in model order (league order, then date and currency): the
    inputs as Float32, the target, the keys and the ``keep`` columns; and the input names. Lazy, so that only these
    columns are read and copied, narrowed before the sort."""
    target = target_column(horizon)
    inputs, names = model_inputs(rows.lazy(), feature_columns)
    order = pl.col("league").replace_strict({lg: i for i, lg in enumerate(league_order)}, return_dtype=pl.Int32)
    frame = (
        inputs.filter(pl.col("league").is_in(league_order) & pl.col(target).is_not_null())
        .select(pl.col(names).cast(pl.Float32), target, "league", "currency", "date",
                *keep, order.alias("_order"))
        .sort("_order", "date", "currency")
        .collect()
    )
    return frame, names


# --- folds ------------------------------------------------------------------------------------------------------


@dataclass
class Fold:
    name: str
    train: np.ndarray  # indices
    valid: np.ndarray  # scored
    inner_train: np.ndarray  # early-stopping split of ``train``
    inner_valid: np.ndarray
    extra: np.ndarray = field(default_factory=lambda: np.array([], dtype=int))  # predicted, never scored

    @property
    def predicted(self) -> np.ndarray:
        return np.concatenate([self.valid, self.extra])


def _inner_split(data: ModelData, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Early-stopping hold-out inside a training fold: its last league, or its last 20 % of rows."""
    leagues = [lg for lg in data.league_order if lg in set(data.leagues[train])]
    if len(leagues) >= 2:
        last = train[data.leagues[train] == leagues[-1]]
        if 20 <= len(last) <= len(train) // 2:
            return train[data.leagues[train] != leagues[-1]], last
    cut = int(len(train) * 0.8)
    return train[:cut], train[cut:]


def league_folds(data: ModelData, n_folds: int, exclude: Iterable[str] = (), train_mask: np.ndarray | None = None,
                 extra_mask: np.ndarray | None = None, min_train_rows: int = 200,
                 min_valid_rows: int = 30) -> list[Fold]:
    """The last ``n_folds`` league folds: validate on the rows of league k where ``train_mask``, train on those of
    the leagues before k; rows of league k where only ``extra_mask`` holds are predicted but never scored. Leagues
    in ``exclude`` (the current one) are never validated on."""
    idx = np.arange(data.rows)
    trainable = np.ones(data.rows, dtype=bool) if train_mask is None else train_mask
    extra = np.zeros(data.rows, dtype=bool) if extra_mask is None else extra_mask & ~trainable
    folds: list[Fold] = []
    for k, league in enumerate(data.league_order):
        if league in set(exclude):
            continue
        train = idx[np.isin(data.leagues, data.league_order[:k]) & trainable]
        in_league = data.leagues == league
        valid = idx[in_league & trainable]
        if len(train) >= min_train_rows and len(valid) >= min_valid_rows:
            folds.append(Fold(f"league:{league}", train, valid, *_inner_split(data, train), idx[in_league & extra]))
    return folds[-n_folds:] if n_folds > 0 else []


# --- the three models -------------------------------------------------------------------------------------------

DEFAULT_PARAMS = {
    # measured on a walk-forward over five development leagues (Heist..Archnemesis): smaller, more regularised
    # trees than LightGBM's defaults forecast better than "no change" on pooled data
    "lightgbm": {"num_leaves": 15, "min_data_in_leaf": 300, "learning_rate": 0.05, "feature_fraction": 0.8,
                 "bagging_fraction": 0.8, "lambda_l2": 1.0},
    "xgboost": {"max_depth": 4, "min_child_weight": 100.0, "learning_rate": 0.05, "subsample": 0.8,
                "colsample_bytree": 0.8, "reg_lambda": 1.0},
    "random_forest": {"max_depth": 10, "min_samples_leaf": 200, "max_features": 0.3},
}
DEFAULT_ROUNDS = {"lightgbm": 400, "xgboost": 400, "random_forest": 40}
MIN_PATIENCE = 50  # early stopping on an L1 loss is noisy: never stop after fewer rounds without progress
MAX_BIN = 63  # histogram bins of both boosted models (a bin index fits in one byte)


def _lgb_params(trial: optuna.Trial | None, params: dict | None = None) -> dict:
    if params is None:
        assert trial is not None
        params = {
            "num_leaves": trial.suggest_int("num_leaves", 7, 63, log=True),
            "min_data_in_leaf": trial.suggest_int("min_data_in_leaf", 50, 2000, log=True),
            "learning_rate": trial.suggest_float("learning_rate", 0.02, 0.2, log=True),
            "feature_fraction": trial.suggest_float("feature_fraction", 0.4, 1.0),
            "bagging_fraction": trial.suggest_float("bagging_fraction", 0.5, 1.0),
            "lambda_l2": trial.suggest_float("lambda_l2", 0.0, 10.0),
        }
    return {**params, "objective": "l1", "bagging_freq": 1, "num_threads": 1, "verbosity": -1, "seed": 7,
            "deterministic": True, "force_col_wise": True}


def _xgb_params(trial: optuna.Trial | None, params: dict | None = None) -> dict:
    if params is None:
        assert trial is not None
        params = {
            "max_depth": trial.suggest_int("max_depth", 3, 8),
            "min_child_weight": trial.suggest_float("min_child_weight", 10.0, 1000.0, log=True),
            "learning_rate": trial.suggest_float("learning_rate", 0.02, 0.2, log=True),
            "subsample": trial.suggest_float("subsample", 0.5, 1.0),
            "colsample_bytree": trial.suggest_float("colsample_bytree", 0.4, 1.0),
            "reg_lambda": trial.suggest_float("reg_lambda", 0.0, 10.0),
        }
    return {**params, "objective": "reg:absoluteerror", "tree_method": "hist", "max_bin": MAX_BIN, "nthread": 1,
            "seed": 7, "verbosity": 0}


def _rf_params(trial: optuna.Trial | None, params: dict | None = None) -> dict:
    if params is None:
        assert trial is not None
        params = {
            "max_depth": trial.suggest_categorical("max_depth", [6, 10, 14]),
            "min_samples_leaf": trial.suggest_categorical("min_samples_leaf", [50, 200, 800]),
            "max_features": trial.suggest_categorical("max_features", [0.2, 0.3, 0.5]),
        }
    # averaging saturates well before 40 trees; 15 % of the rows per tree keeps pooled data fast (a tree on 30 %
    # took 0.37 s, and the forest was 60 % of a global model's training time)
    return {**params, "max_samples": 0.15, "n_jobs": 1, "random_state": 7}


PARAM_BUILDERS: dict[str, Callable] = {"lightgbm": _lgb_params, "xgboost": _xgb_params, "random_forest": _rf_params}
TRIAL_SHARE = {"lightgbm": 1.0, "xgboost": 0.5, "random_forest": 0.1}


def _clip_target(y: np.ndarray) -> np.ndarray:
    """Squared-error forests chase jumps; they fit targets clipped to the 1-99 % range instead."""
    lo, hi = np.quantile(y, [0.01, 0.99])
    return np.clip(y, lo, hi)


@dataclass
class FoldData:
    """Per-fold matrices, built once and reused by every trial; only the boosted models' (``kinds``) are built."""

    fold: Fold
    lgb_train: lgb.Dataset | None = None
    lgb_inner_valid: lgb.Dataset | None = None
    xgb_train: xgb.DMatrix | None = None
    xgb_inner_valid: xgb.DMatrix | None = None
    xgb_valid: xgb.DMatrix | None = None


def xgb_training_matrix(X: np.ndarray, y: np.ndarray, weight: np.ndarray,
                        feature_names: list[str] | None = None) -> xgb.QuantileDMatrix:
    """XGBoost's training rows, already binned as ``hist`` bins them."""
    return xgb.QuantileDMatrix(X, y, weight=weight, nthread=1, max_bin=MAX_BIN, feature_names=feature_names)


def fold_data(data: ModelData, folds: list[Fold], kinds: Iterable[str] = MODEL_KINDS) -> list[FoldData]:
    kinds = set(kinds)
    out = []
    for f in folds:
        it, iv = f.inner_train, f.inner_valid
        fd = FoldData(f)
        if "lightgbm" in kinds:
            # only the bins are kept: no trial changes a parameter that would need the raw rows to rebin them
            lgb_train = lgb.Dataset(data.X[it], data.label[it], weight=data.weight[it], feature_name=data.feature_names,
                                    params={"verbosity": -1, "max_bin": MAX_BIN})
            lgb_valid = lgb.Dataset(data.X[iv], data.label[iv], weight=data.weight[iv], reference=lgb_train)
            fd.lgb_train, fd.lgb_inner_valid = lgb_train.construct(), lgb_valid.construct()
        if "xgboost" in kinds:
            # the training rows quantised once (one byte a value) instead of DMatrix's value and index per entry
            # plus the bins it builds at the first fit: the same trees, a fraction of the memory. The early-stopping
            # rows stay a DMatrix: evaluating on quantised rows was 30 % slower.
            fd.xgb_train = xgb_training_matrix(data.X[it], data.label[it], data.weight[it])
            fd.xgb_inner_valid = xgb.DMatrix(data.X[iv], data.label[iv], weight=data.weight[iv], nthread=1)
            fd.xgb_valid = xgb.DMatrix(data.X[f.predicted], nthread=1)
        out.append(fd)
    return out


class StepMedianPruner(optuna.pruners.BasePruner):
    """Prunes a trial whose value at its latest step is worse than the median of the completed trials' values at
    that step (once ``n_startup_trials`` have completed).

    Unlike Optuna's ``MedianPruner`` it compares a step only with the same step: the steps of a fold are its boosting
    checkpoints (the best early-stopping error so far, comparable across trials at the same round of the same fold)
    and then the running mean validation error after the fold, which are different quantities. A completed trial
    that stopped early within a fold carries its last checkpoint of that fold forward. Deterministic: it reads only
    the study's completed trials, and trials run one after another."""

    def __init__(self, n_startup_trials: int = 3):
        self.n_startup_trials = n_startup_trials

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if len(completed) < self.n_startup_trials:
            return False
        fold_start = step - step % FOLD_STEPS
        values = []
        for t in completed:
            seen = t.intermediate_values
            if step in seen:
                values.append(seen[step])
                continue
            for earlier in range(step - 1, fold_start - 1, -1):  # it stopped early in this fold
                if earlier in seen:
                    values.append(seen[earlier])
                    break
        if len(values) < self.n_startup_trials:
            return False
        return trial.intermediate_values[step] > float(np.median(values))


class _Reporter:
    """Reports a fit's progress within a fold to its trial and stops the fit (``optuna.TrialPruned``) when the
    pruner says so: a boosting fit's best early-stopping error so far every ``CHECK_EVERY`` rounds (from
    ``MIN_PATIENCE`` on); a forest's validation error every ``FOREST_CHECK`` trees."""

    def __init__(self, trial: optuna.Trial, first_step: int, prune: bool = True):
        self.trial, self.first_step, self.best, self.rounds = trial, first_step, math.inf, 0
        self.prune = prune  # False: only count the rounds (the fit is the same either way)

    def __call__(self, iteration: int, value: float) -> None:
        self.best = min(self.best, value)
        self.rounds = iteration + 1
        if self.rounds % CHECK_EVERY == 0 and self.rounds >= MIN_PATIENCE:
            self.check(self.rounds // CHECK_EVERY - 1, self.best)

    def check(self, offset: int, value: float) -> None:
        if not self.prune:
            return
        self.trial.report(value, self.first_step + offset)
        if self.trial.should_prune():
            raise optuna.TrialPruned()


class _XgbReport(xgb.callback.TrainingCallback):
    def __init__(self, report: _Reporter):
        super().__init__()
        self.report = report

    def after_iteration(self, model, epoch: int, evals_log: dict) -> bool:
        self.report(epoch, evals_log["valid"]["mae"][-1])
        return False


def _fit_lgb(params: dict, train: lgb.Dataset, valid: lgb.Dataset | None, rounds: int, early: int,
             report: _Reporter | None = None) -> lgb.Booster:
    callbacks = [lgb.early_stopping(early, verbose=False)] if valid is not None else []
    if report is not None and valid is not None:
        def pruning(env: lgb.callback.CallbackEnv) -> None:
            report(env.iteration, env.evaluation_result_list[0][2])

        pruning.order = 40  # after early stopping's own check
        callbacks.append(pruning)
    return lgb.train(params, train, num_boost_round=rounds, valid_sets=[valid] if valid is not None else None,
                     callbacks=callbacks)


def _fit_xgb(params: dict, train: xgb.DMatrix, valid: xgb.DMatrix | None, rounds: int, early: int,
             report: _Reporter | None = None) -> xgb.Booster:
    callbacks = [_XgbReport(report)] if report is not None and valid is not None else None
    return xgb.train(params, train, num_boost_round=rounds, evals=[(valid, "valid")] if valid is not None else (),
                     early_stopping_rounds=early if valid is not None else None, verbose_eval=False,
                     callbacks=callbacks)


def _predict_xgb(model: xgb.Booster, data: xgb.DMatrix) -> np.ndarray:
    best = getattr(model, "best_iteration", None)
    return model.predict(data, iteration_range=(0, best + 1) if best is not None else (0, 0))


def _fit_forest(params: dict, X: np.ndarray, y: np.ndarray, w: np.ndarray, trees: int) -> RandomForestRegressor:
    return RandomForestRegressor(**params, n_estimators=trees).fit(X, _clip_target(y), sample_weight=w)


def _fold_predict(kind: str, params: dict, fd: FoldData, data: ModelData, early: int,
                  report: _Reporter | None = None) -> tuple[np.ndarray, int]:
    """Fit on a fold's training rows, predict its validation and extra rows; also the boosting rounds used.
    ``report``: a tuning trial's reporter, which may stop a boosting fit (``optuna.TrialPruned``)."""
    f = fd.fold
    base = data.base[f.predicted]
    if kind == "lightgbm":
        model = _fit_lgb(params, fd.lgb_train, fd.lgb_inner_valid, MAX_ROUNDS, early, report)
        return (base + model.predict(data.X[f.predicted], num_iteration=model.best_iteration),
                model.best_iteration or MAX_ROUNDS)
    if kind == "xgboost":
        model = _fit_xgb(params, fd.xgb_train, fd.xgb_inner_valid, MAX_ROUNDS, early, report)
        return base + _predict_xgb(model, fd.xgb_valid), (model.best_iteration or MAX_ROUNDS - 1) + 1
    trees = DEFAULT_ROUNDS["random_forest"]
    if report is None:
        rf = _fit_forest(params, data.X[f.train], data.label[f.train], data.weight[f.train], trees)
        return base + forest_predict(rf, data.X[f.predicted]), trees
    # grown FOREST_CHECK trees at a time (warm start: the same trees as one fit), so that a losing trial stops early
    X, y_clipped, w = data.X[f.train], _clip_target(data.label[f.train]), data.weight[f.train]
    X_pred = np.ascontiguousarray(data.X[f.predicted], dtype=np.float32)
    rf = RandomForestRegressor(**params, n_estimators=FOREST_CHECK, warm_start=True)
    per_tree: list[np.ndarray] = []
    for grown in range(FOREST_CHECK, trees + 1, FOREST_CHECK):
        rf.set_params(n_estimators=grown).fit(X, y_clipped, sample_weight=w)
        per_tree += [t.predict(X_pred, check_input=False) for t in rf.estimators_[len(per_tree):]]
        report.rounds = grown
        if grown < trees:
            n = len(f.valid)
            report.check(grown // FOREST_CHECK - 1,
                         float(np.mean(np.abs(data.label[f.valid] - np.mean(per_tree, axis=0)[:n]))))
    return base + np.mean(per_tree, axis=0), trees  # as forest_predict


@dataclass
class Tuned:
    kind: str
    params: dict
    rounds: int
    oof: list[np.ndarray]  # the best trial's predictions of each fold's ``predicted`` rows
    trials: int
    pruned: int = 0  # trials the pruner stopped
    boosting_rounds: int = 0  # rounds fitted over every trial and fold (forest: trees): the tuning's work


PRUNE_INSIDE_FITS = False  # measured: half the CPU of a dev-profile tuning, but a worse holdout (see tune)


def tune(kind: str, data: ModelData, folds: list[FoldData], profile: Profile, seed: int,
         prune_inside_fits: bool = PRUNE_INSIDE_FITS, fixed_params: dict | None = None) -> Tuned:
    """Optuna over the model's space; objective: mean validation MAE across folds. A fixed number of trials; a
    median pruner stops a trial after a fold whose running error is worse than the completed trials' median.

    ``prune_inside_fits`` also stops a losing fit inside a fold (``StepMedianPruner``: every ``CHECK_EVERY``
    boosting rounds, every ``FOREST_CHECK`` trees). Off by default: on the bundled sample in the dev profile (7d)
    it halved tuning's CPU time but the holdout skill fell from +0.117 to +0.095; a learning-curve pruner favours
    fast learning rates.

    The measured default is the first trial, so a tiny budget never does worse than it. ``fixed_params`` (an earlier
    tuning's best) is then the only trial: the folds are forecast again without a search."""
    build = PARAM_BUILDERS[kind]
    n_trials = 1 if fixed_params is not None else max(1, round(profile.optuna_trials * TRIAL_SHARE[kind]))
    early = max(profile.early_stopping_rounds, MIN_PATIENCE)
    outputs: dict[int, tuple[list[np.ndarray], list[int]]] = {}
    work = [0]

    def objective(trial: optuna.Trial) -> float:
        params = build(trial)
        errors, preds, rounds = [], [], []
        for k, fd in enumerate(folds):
            report = _Reporter(trial, k * FOLD_STEPS, prune=prune_inside_fits)
            try:
                pred, used = _fold_predict(kind, params, fd, data, early, report)
            finally:
                work[0] += report.rounds
            preds.append(pred)
            rounds.append(used)
            errors.append(float(np.mean(np.abs(data.y[fd.fold.valid] - pred[: len(fd.fold.valid)]))))
            trial.report(float(np.mean(errors)), k * FOLD_STEPS + FOLD_STEPS - 1 if prune_inside_fits else k)
            if trial.should_prune():
                raise optuna.TrialPruned()
        outputs[trial.number] = (preds, rounds)
        return float(np.mean(errors))

    study = optuna.create_study(
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, n_trials)),
        pruner=StepMedianPruner(n_startup_trials=3) if prune_inside_fits
        else optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0),
    )
    study.enqueue_trial(DEFAULT_PARAMS[kind] if fixed_params is None else fixed_params)
    study.optimize(objective, n_trials=n_trials)
    # the best trial ran every fold (a pruned trial is never best): its predictions are the fold predictions
    preds, rounds = outputs[study.best_trial.number]
    pruned = sum(1 for t in study.trials if t.state == optuna.trial.TrialState.PRUNED)
    return Tuned(kind, dict(study.best_params), int(np.median(rounds)), preds, len(study.trials), pruned, work[0])


def validation_weights(y: np.ndarray, preds: dict[str, np.ndarray], step: float = 0.1) -> dict[str, float]:
    """Ensemble weights that minimise the blend's validation MAE, over a grid of the simplex (``step`` apart);
    fallback weights with too few rows. Unlike inverse-MAE weights, a model that adds nothing gets 0."""
    if len(y) < MIN_OOF_ROWS:
        return dict(FALLBACK_WEIGHTS)
    kinds = list(preds)
    ticks = round(1 / step)
    best, best_mae = None, float("inf")
    for a in range(ticks + 1):
        for b in range(ticks + 1 - a):
            w = dict(zip(kinds, (a / ticks, b / ticks, (ticks - a - b) / ticks), strict=True))
            mae = float(np.mean(np.abs(y - blend(w, preds))))
            if mae < best_mae - 1e-12:
                best, best_mae = w, mae
    return best


def blend(weights: dict[str, float], preds: dict[str, np.ndarray]) -> np.ndarray:
    return sum(weights[k] * preds[k] for k in weights)


# --- metrics ----------------------------------------------------------------------------------------------------


def forecast_metrics(y: np.ndarray, pred: np.ndarray, persistence_mae: float | None = None) -> dict[str, float]:
    """MAE of log-return, its median, MAPE of the price, directional accuracy on >= 1 % moves, R2, skill."""
    if len(y) == 0:
        return {}
    err = y - pred
    mae = float(np.mean(np.abs(err)))
    mape = float(np.mean(np.abs(np.exp(pred - y) - 1.0)))  # |P_hat - P| / P with P = P0 e^y, P_hat = P0 e^pred
    moved = np.abs(y) >= DIRECTION_THRESHOLD
    direction = float(np.mean(np.sign(pred[moved]) == np.sign(y[moved]))) if moved.any() else float("nan")
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(err**2)) / ss_tot if ss_tot > 0 else float("nan")
    out = {"mae_logret": mae, "median_ae_logret": float(np.median(np.abs(err))), "mape_price": mape,
           "directional_accuracy": direction, "r2": r2, "n": float(len(y))}
    if persistence_mae is not None:
        out["skill"] = 1.0 - mae / persistence_mae if persistence_mae > 0 else 0.0
    return out


def all_finite(metrics: dict[str, dict[str, float]], keys: tuple[str, ...] = ("mae_logret", "skill")) -> bool:
    """No NaN or infinity where a promotion decision reads (a poisoned price yields those)."""
    return all(math.isfinite(m.get(k, 0.0)) for m in metrics.values() for k in keys if k in m)


# --- fitting and saving an ensemble -----------------------------------------------------------------------------


def fit_model(kind: str, data: ModelData, params: dict, rounds: int, out_dir: Path,
              index: np.ndarray | None = None) -> np.ndarray:
    """Fit one final model on ``data`` (its rows ``index``) and save it natively in ``out_dir``; returns its gain
    importance per feature, normalised (zeros for the forest)."""
    if index is None or len(index) == data.rows:  # every row (an index is ascending): no copy of the matrix
        X, y, w = data.X, data.label, data.weight
    else:
        X, y, w = data.X[index], data.label[index], data.weight[index]
    out_dir.mkdir(parents=True, exist_ok=True)
    g = np.zeros(len(data.feature_names))
    if kind == "lightgbm":
        lgb_model = lgb.train(_lgb_params(None, params),
                              lgb.Dataset(X, y, weight=w, feature_name=data.feature_names,
                                          params={"max_bin": MAX_BIN}),
                              num_boost_round=max(rounds, 10))
        lgb_model.save_model(str(out_dir / ARTIFACT_FILES["lightgbm"]))
        g = lgb_model.feature_importance(importance_type="gain").astype(float)
    elif kind == "xgboost":
        xgb_model = _fit_xgb(_xgb_params(None, params),
                             xgb_training_matrix(X, y, w, feature_names=data.feature_names),
                             None, max(rounds, 10), 0)
        xgb_model.save_model(str(out_dir / ARTIFACT_FILES["xgboost"]))
        scores = xgb_model.get_score(importance_type="total_gain")
        g = np.array([scores.get(n, 0.0) for n in data.feature_names])
    else:
        rf = _fit_forest(_rf_params(None, params), X, y, w, rounds)
        joblib.dump(rf, out_dir / ARTIFACT_FILES["random_forest"], compress=3)
    return g / (g.sum() or 1.0)


def blend_importance(feature_names: list[str], weights: dict[str, float],
                     gains: dict[str, np.ndarray]) -> dict[str, float]:
    """The weighted gain importance of the fitted boosted models, normalised, largest first."""
    gain = np.zeros(len(feature_names))
    for kind in ("lightgbm", "xgboost"):
        if kind in gains:
            gain += weights[kind] * gains[kind]
    total = float(gain.sum()) or 1.0
    return dict(sorted(((n, float(g) / total) for n, g in zip(feature_names, gain, strict=True)),
                       key=lambda kv: -kv[1]))


def fit_ensemble(data: ModelData, params: dict[str, dict], rounds: dict[str, int], weights: dict[str, float],
                 out_dir: Path, index: np.ndarray | None = None) -> dict[str, float]:
    """Fit the final models that carry weight on ``data`` (its rows ``index``) and save them natively; a model
    the validation gave no weight is not fitted. Returns the gain importance per feature of the boosted models
    that were fitted, normalised."""
    out_dir.mkdir(parents=True, exist_ok=True)
    gains = {kind: fit_model(kind, data, params[kind], rounds[kind], out_dir, index)
             for kind in MODEL_KINDS if weights.get(kind, 0) > 0}
    return blend_importance(data.feature_names, weights, gains)


def write_meta(out_dir: Path, meta: dict) -> None:
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=1, default=str))


class Ensemble:
    """A saved ensemble: the LightGBM, XGBoost and RandomForest models that carry weight, in their native formats,
    plus ``ensemble.json`` (feature names and weights)."""

    def __init__(self, directory: Path):
        directory = Path(directory)
        self.directory = directory
        self.meta = json.loads((directory / META_FILE).read_text())
        self.feature_names: list[str] = self.meta["feature_names"]
        self.weights: dict[str, float] = {k: float(w) for k, w in self.meta["weights"].items() if w > 0}
        self.anchored = self.meta.get("anchor") == ANCHOR_INPUT  # models trained before the anchor have none
        self.models: dict[str, object] = {}
        if "lightgbm" in self.weights:
            self.models["lightgbm"] = lgb.Booster(model_file=str(directory / ARTIFACT_FILES["lightgbm"]),
                                                  params={"num_threads": 1})
        if "xgboost" in self.weights:
            booster = xgb.Booster(params={"nthread": 1})
            booster.load_model(str(directory / ARTIFACT_FILES["xgboost"]))
            self.models["xgboost"] = booster
        if "random_forest" in self.weights:
            # joblib: 20x faster to load than skops for a forest; the files come only from our own training runs
            self.models["random_forest"] = joblib.load(directory / ARTIFACT_FILES["random_forest"])

    def predict_parts(self, inputs: pl.DataFrame) -> dict[str, np.ndarray]:
        """Each weighted model's predicted log-return for rows that went through ``model_inputs``."""
        X = inputs.select(self.feature_names).cast(pl.Float32).to_numpy()
        base = anchor(X, self.feature_names) if self.anchored else np.zeros(len(X))
        parts = {}
        for kind, model in self.models.items():
            if kind == "lightgbm":  # the loading params do not reach predict: 2 threads made a row take ~10 ms
                parts[kind] = base + model.predict(X, num_threads=1)
            elif kind == "xgboost":
                parts[kind] = base + model.predict(xgb.DMatrix(X, nthread=1, feature_names=self.feature_names))
            else:
                parts[kind] = base + forest_predict(model, X)
        return parts

    def predict_inputs(self, inputs: pl.DataFrame) -> np.ndarray:
        return blend(self.weights, self.predict_parts(inputs))

    def predict(self, rows: pl.DataFrame) -> np.ndarray:
        """Predicted log-returns for feature rows."""
        return self.predict_inputs(model_inputs(rows, [])[0])


def forest_predict(forest: RandomForestRegressor, X: np.ndarray) -> np.ndarray:
    """The forest's prediction, the mean of its trees', without the per-tree joblib dispatch of
    ``forest.predict`` (about 0.7 ms a tree: most of a one-row forecast's time)."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    return np.mean([tree.predict(X, check_input=False) for tree in forest.estimators_], axis=0)


def limit_threads() -> None:
    """A training worker's initializer: one thread per model (processes, not threads, give the parallelism; never
    oversubscribe 2 cores), and the worker dies with the process that started it."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    die_with_parent()


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies. A pool worker otherwise trains on for minutes after
    its parent was killed (it only notices at its next task), holding ~300 MB each."""
    import ctypes
    import multiprocessing
    import signal
    import sys

    parent = multiprocessing.parent_process()
    if not sys.platform.startswith("linux") or parent is None:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent.pid:  # the parent died before the request took effect
        os._exit(1)

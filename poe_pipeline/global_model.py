"""The global model: one ensemble per horizon, pooled over the liquid currencies of every league.

A single currency holds 600-2,100 labelled days against ~100 inputs: too few to learn what "no change" misses. A
model pooled over many currencies and leagues sees tens of thousands (Montero-Manso & Hyndman 2021; the M5 winners
were pooled LightGBMs), and on the development leagues it beat per-currency models at every horizon.

- **Rows.** In each past non-event league, the ``pool_size`` most liquid currencies of that league (by their days
  with a High or Medium confidence price), plus, in the current league, the currencies being forecast. Every row
  has a known target; outlier days stay in.
- **Validation.** League folds (``modeling.league_folds``): the last ``cv_folds`` past leagues, each predicted by
  models trained on the leagues before it. Tuning sees every fold but the newest, the *holdout*, so the metrics on
  the holdout are out of sample for tuning and weights alike (nested); ``metrics["holdout"]`` holds them.
- **Out-of-fold forecasts.** Each fold also predicts the rows of the currencies being forecast now, where they
  existed, so that a partition can specialise on its own currency's out-of-fold rows (``currency_model``).
- **Warm refits.** ``train_global(warm=...)`` keeps a validation (tuning, weights, out-of-fold rows) and refits
  only the final models on the new rows: the league folds do not change within a league.
- **Reuse within a league.** A validation is a function of its ``tuning_inputs``: the past leagues' rows, the
  profile and the seed, never the current league's rows. A retrain whose inputs equal the champion's keeps its
  validation; one whose past leagues and profile are the same but whose rows differ (a currency joined the
  forecast, the features changed) keeps its tuned parameters and forecasts the folds again without a search
  (``reuse_of``). Only a new past league or another profile tunes again: once a league, not every week.
- **Kept as it is.** A retrain that would keep the whole validation fits nothing when its pooled rows are those of
  the champion's fit (the same ``data_hash``: run again with no new day) or changed by less than
  ``REFIT_MIN_GROWTH`` (``refit_due``); the champion stays as it is.
"""

from __future__ import annotations

import hashlib
import importlib
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import polars as pl

from poe_pipeline.modeling import (
    ANCHOR_INPUT,
    DEFAULT_PARAMS,
    DEFAULT_ROUNDS,
    MIN_PATIENCE,
    MODEL_KINDS,
    PARAM_BUILDERS,
    Fold,
    FoldData,
    ModelData,
    Tuned,
    _fold_predict,
    blend,
    fit_ensemble,
    fold_data,
    forecast_metrics,
    hash_rows,
    league_folds,
    model_frame,
    tune,
    validation_weights,
    write_meta,
)
from poe_pipeline.settings import Profile

Frame = TypeVar("Frame", pl.DataFrame, pl.LazyFrame)

POOL_SIZE = 100  # the most liquid currencies of each past league that the global model learns from
MIN_GLOBAL_ROWS = 1000
# A refit that keeps the validation and would change the labelled pooled rows by less than this share keeps the
# fitted models: a week of one league is 0.15-0.8 % of the pooled rows (30-188 currencies), and on the four-league
# walk-forward with the league-phase drift, no refit within a league scored as weekly ones (README, "Refitted when
# the rows grew").
REFIT_MIN_GROWTH = 0.05
OOF_FILE = "oof.parquet"
OOF_SCHEMA = {"league": pl.Utf8, "currency": pl.Utf8, "date": pl.Date, "actual_logret": pl.Float64,
              "pred_logret": pl.Float64, "fold": pl.Utf8, "holdout": pl.Boolean, "in_pool": pl.Boolean}


def liquid_by_league(features: pl.DataFrame | pl.LazyFrame, leagues: Iterable[str],
                     size: int) -> dict[str, list[str]]:
    """The ``size`` most liquid currencies of each league: most days with a High or Medium confidence price,
    then most observed days, then by name."""
    counts = (
        features.lazy().filter(pl.col("league").is_in(list(leagues)) & (pl.col("currency") != "Chaos Orb"))
        .group_by("league", "currency")
        .agg((pl.col("confidence_level") >= 1).sum().alias("good"), (~pl.col("is_imputed")).sum().alias("seen"))
        .sort(["league", "good", "seen", "currency"], descending=[False, True, True, False])
        .collect()
    )
    return {lg: g["currency"].head(size).to_list() for (lg,), g in counts.partition_by("league", as_dict=True).items()}


def pooled_rows(features: Frame, league_order: list[str], current_league: str, currencies: Iterable[str],
                pool_size: int = POOL_SIZE) -> Frame:
    """The global model's rows with an ``in_pool`` flag: pool rows train and score; the other rows of the
    ``currencies`` being forecast are only predicted out of fold (their league's pool did not include them).
    A scan of the features gives a query of the rows, which never holds every feature row at once."""
    currencies = list(dict.fromkeys(currencies))
    past = [lg for lg in league_order if lg != current_league]
    pools = liquid_by_league(features, past, pool_size)
    pool_pairs = pl.DataFrame(
        [(lg, c) for lg, cs in pools.items() for c in cs] + [(current_league, c) for c in currencies],
        schema={"league": pl.Utf8, "currency": pl.Utf8}, orient="row",
    ).unique().with_columns(pl.lit(True).alias("in_pool"))
    wanted = pl.col("league").is_in(league_order) & (
        pl.col("currency").is_in(currencies) | pl.col("league").is_in(past))
    rows = (
        features.lazy().filter(wanted)
        .join(pool_pairs.lazy(), on=["league", "currency"], how="left")
        .with_columns(pl.col("in_pool").fill_null(False))
        .filter(pl.col("in_pool") | pl.col("currency").is_in(currencies))
    )
    return rows if isinstance(features, pl.LazyFrame) else rows.collect()


@dataclass
class GlobalValidation:
    """What tuning and the league folds decided; a warm refit reuses it as it is."""

    params: dict[str, dict]
    rounds: dict[str, int]
    weights: dict[str, float]
    metrics: dict[str, dict[str, dict[str, float]]]  # "holdout" | "tuning" -> model -> metric
    folds: list[str]
    oof: pl.DataFrame  # OOF_SCHEMA
    tuning: dict[str, dict[str, float]] = field(default_factory=dict)  # kind -> trials, pruned, rounds, seconds
    inputs: dict = field(default_factory=dict)  # tuning_inputs: what this validation is a function of
    reused: str = ""  # "" tuned here; else what was kept of an earlier validation, and why
    fitted_hash: str = ""  # ModelData.data_hash of the rows its final models were fitted on ("": unknown)
    fitted_rows: int = 0  # the labelled pooled rows its final models were fitted on (0: unknown)

    @classmethod
    def read(cls, directory: Path) -> GlobalValidation:
        import json

        meta = json.loads((Path(directory) / "ensemble.json").read_text())
        return cls(meta["params"], meta["rounds"], meta["weights"], meta["metrics"], meta["folds"],
                   pl.read_parquet(Path(directory) / OOF_FILE), meta.get("tuning", {}), meta.get("inputs", {}),
                   fitted_hash=meta.get("data_window", {}).get("data_hash", ""),
                   fitted_rows=int(meta.get("data_window", {}).get("rows", 0)))


def refit_due(fitted_rows: int, rows_now: int) -> tuple[bool, float]:
    """(whether final models fitted on ``fitted_rows`` labelled pooled rows are worth fitting again on
    ``rows_now``, the relative change): when the rows changed by ``REFIT_MIN_GROWTH`` or more either way, or when
    the fitted count is unknown."""
    if fitted_rows <= 0:
        return True, float("inf")
    change = rows_now / fitted_rows - 1
    return abs(change) >= REFIT_MIN_GROWTH, change


_LIBRARIES = ("lightgbm", "xgboost", "sklearn", "optuna", "numpy")  # modules: xgboost ships as xgboost-cpu too


def tuning_inputs(data: ModelData, in_pool: np.ndarray, current_league: str, profile: Profile, seed: int) -> dict:
    """What a validation is a function of: the past leagues' rows (inputs, targets, weights, pool flags and keys),
    the feature names, the profile, the seed and the model libraries. The current league is never a fold."""
    past = data.leagues != current_league
    digest = hashlib.sha256()
    hash_rows(digest, data.X, np.flatnonzero(past))
    for part in (data.y[past], data.weight[past], in_pool[past], data.dates[past].astype(np.int64)):
        digest.update(np.ascontiguousarray(part).tobytes())
    digest.update("\x1f".join(map(str, data.currencies[past])).encode())
    leagues = [lg for lg in data.league_order if lg != current_league and lg in set(data.leagues[past])]
    return {"past_leagues": leagues, "profile": profile.as_dict(), "seed": seed, "anchor": ANCHOR_INPUT,
            "features": hashlib.sha256(",".join(data.feature_names).encode()).hexdigest()[:16],
            "libraries": {lib: importlib.import_module(lib).__version__ for lib in _LIBRARIES},
            "rows": digest.hexdigest()[:16]}


_SAME_SETUP = ("past_leagues", "profile", "seed", "anchor", "features", "libraries")


def reuse_of(earlier: GlobalValidation | None, inputs: dict) -> tuple[str, str]:
    """What a retrain can keep of an ``earlier`` validation (the champion's), given today's ``tuning_inputs``:
    ("validation", why) when the inputs are equal, ("params", why) when only the past leagues' rows differ,
    ("", why) when it must tune."""
    if earlier is None:
        return "", "no champion to start from"
    if not earlier.inputs:
        return "", "the champion predates recorded tuning inputs"
    if earlier.inputs == inputs:
        return "validation", "the past leagues' rows, the profile and the seed are unchanged"
    changed = [k for k in _SAME_SETUP if earlier.inputs.get(k) != inputs.get(k)]
    if changed:
        return "", f"{', '.join(k.replace('_', ' ') for k in changed)} changed"
    return "params", "the same past leagues and profile, but their rows changed"


@dataclass
class GlobalResult:
    horizon: int
    trained: bool
    reason: str = ""
    params: dict[str, dict] = field(default_factory=dict)
    rounds: dict[str, int] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    folds: list[str] = field(default_factory=list)
    data_window: dict = field(default_factory=dict)
    feature_names: list[str] = field(default_factory=list)
    feature_importance: dict[str, float] = field(default_factory=dict)
    tuning: dict[str, dict[str, float]] = field(default_factory=dict)  # kind -> trials, pruned, rounds, seconds
    inputs: dict = field(default_factory=dict)
    artifact_dir: str = ""
    seconds: float = 0.0
    anchor: str = ANCHOR_INPUT  # the input whose reversion the models' predictions are added to

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def skill(self) -> float:
        """The nested (holdout) skill against persistence; NaN without a holdout."""
        return self.metrics.get("holdout", {}).get("ensemble", {}).get("skill", float("nan"))

    @property
    def validation_mae(self) -> float:
        return self.metrics.get("holdout", {}).get("ensemble", {}).get("mae_logret", float("nan"))

    @property
    def fold_signature(self) -> str:
        return "|".join(self.folds)


def _oof_frame(data: ModelData, rows: np.ndarray, pred: np.ndarray, fold: str, holdout: bool,
               in_pool: np.ndarray) -> pl.DataFrame:
    return data.keys(rows).with_columns(
        pl.Series("actual_logret", data.y[rows]), pl.Series("pred_logret", pred), pl.lit(fold).alias("fold"),
        pl.lit(holdout).alias("holdout"), pl.Series("in_pool", in_pool[rows]),
    ).cast(OOF_SCHEMA).select(list(OOF_SCHEMA))


def _scored(y: np.ndarray, preds: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    persistence = float(np.mean(np.abs(y))) if len(y) else float("nan")
    out = {"persistence": forecast_metrics(y, np.zeros_like(y), persistence)}
    for name, p in preds.items():
        out[name] = forecast_metrics(y, p, persistence)
    return out


@dataclass
class KindValidation:
    """One model kind's part of a validation, which a training job computes alone: its tuning and its forecasts of
    the holdout fold's rows (None without a holdout)."""

    kind: str
    tuned: Tuned | None
    holdout_pred: np.ndarray | None = None
    seconds: float = 0.0


def validation_folds(data: ModelData, in_pool: np.ndarray, current_league: str,
                     profile: Profile) -> tuple[list[Fold], Fold | None]:
    """(the tuning folds, the holdout fold): every league fold but the newest, and the newest."""
    folds = league_folds(data, profile.cv_folds, exclude={current_league}, train_mask=in_pool, extra_mask=~in_pool)
    if len(folds) <= 1:
        return folds, None
    return folds[:-1], folds[-1]


def validate_kind(kind: str, data: ModelData, in_pool: np.ndarray, current_league: str, profile: Profile,
                  seed: int, matrices: list[FoldData] | None = None,
                  fixed_params: dict | None = None) -> KindValidation:
    """Tune one model kind on the tuning folds and forecast the holdout fold with its best parameters.
    ``matrices``: the tuning folds' ``fold_data``, when several kinds share them; ``fixed_params``: an earlier
    tuning's parameters, forecast on the folds instead of a search."""
    started = time.perf_counter()
    tuning, holdout = validation_folds(data, in_pool, current_league, profile)
    if not tuning:
        return KindValidation(kind, None)
    tuned = tune(kind, data, matrices if matrices is not None else fold_data(data, tuning, kinds=(kind,)),
                 profile, seed, fixed_params=fixed_params)
    holdout_pred = None
    if holdout is not None:
        (fd,) = fold_data(data, [holdout], kinds=(kind,))
        holdout_pred = _fold_predict(kind, PARAM_BUILDERS[kind](None, tuned.params), fd, data,
                                     max(profile.early_stopping_rounds, MIN_PATIENCE))[0]
    return KindValidation(kind, tuned, holdout_pred, time.perf_counter() - started)


def combine_validation(data: ModelData, in_pool: np.ndarray, current_league: str, profile: Profile,
                       parts: dict[str, KindValidation], seed: int) -> GlobalValidation:
    """The validation of the ensemble from its kinds' parts: weights on the tuning folds, scores on the holdout."""
    tuning, holdout = validation_folds(data, in_pool, current_league, profile)
    inputs = tuning_inputs(data, in_pool, current_league, profile, seed)
    if not tuning:
        return GlobalValidation(dict(DEFAULT_PARAMS), dict(DEFAULT_ROUNDS), {k: 1 / 3 for k in MODEL_KINDS}, {},
                                [], pl.DataFrame(schema=OOF_SCHEMA), inputs=inputs)
    tuned = {k: parts[k].tuned for k in MODEL_KINDS}
    params = {k: t.params for k, t in tuned.items()}
    rounds = {k: t.rounds for k, t in tuned.items()} | {"random_forest": DEFAULT_ROUNDS["random_forest"]}
    y_tuning = np.concatenate([data.y[f.valid] for f in tuning])
    scored = {k: np.concatenate([p[: len(f.valid)] for p, f in zip(t.oof, tuning, strict=True)])
              for k, t in tuned.items()}
    weights = validation_weights(y_tuning, scored)
    metrics = {"tuning": _scored(y_tuning, {**scored, "ensemble": blend(weights, scored)})}
    oof = [_oof_frame(data, f.predicted, blend(weights, {k: t.oof[i] for k, t in tuned.items()}), f.name, False,
                      in_pool) for i, f in enumerate(tuning)]
    if holdout is not None:
        preds = {k: parts[k].holdout_pred for k in MODEL_KINDS}
        n = len(holdout.valid)
        metrics["holdout"] = _scored(data.y[holdout.valid],
                                     {**{k: p[:n] for k, p in preds.items()}, "ensemble": blend(weights, preds)[:n]})
        oof.append(_oof_frame(data, holdout.predicted, blend(weights, preds), holdout.name, True, in_pool))
    folds = [*tuning, *([holdout] if holdout is not None else [])]
    work = {k: {"trials": t.trials, "pruned": t.pruned, "boosting_rounds": t.boosting_rounds,
                "seconds": round(parts[k].seconds, 2)} for k, t in tuned.items()}
    return GlobalValidation(params, rounds, weights, metrics, [f.name for f in folds], pl.concat(oof), work, inputs)


def validate_global(data: ModelData, in_pool: np.ndarray, current_league: str, profile: Profile,
                    seed: int) -> GlobalValidation:
    """Tune on every league fold but the newest, weigh the ensemble there, and score it on the newest (nested)."""
    tuning, _ = validation_folds(data, in_pool, current_league, profile)
    matrices = fold_data(data, tuning)  # once for every model's trials
    parts = {kind: validate_kind(kind, data, in_pool, current_league, profile, seed, matrices)
             for kind in MODEL_KINDS}
    del matrices
    return combine_validation(data, in_pool, current_league, profile, parts, seed)


def global_data(rows: pl.DataFrame | pl.LazyFrame, feature_columns: list[str], horizon: int,
                league_order: list[str]) -> tuple[ModelData, np.ndarray]:
    """The model matrices of ``rows`` (``pooled_rows``, or a scan of them) and their ``in_pool`` flags, row for
    row."""
    frame, names = model_frame(rows, feature_columns, horizon, league_order, keep=["in_pool"])
    return ModelData.from_frame(frame, names, horizon, league_order), frame["in_pool"].to_numpy()


def skip_reason(in_pool: np.ndarray, horizon: int) -> str:
    """Why the global model of this horizon cannot be trained honestly ("" when it can)."""
    if (n := int(in_pool.sum())) < MIN_GLOBAL_ROWS:
        return (f"only {n} labelled rows to pool at {horizon}d (at least {MIN_GLOBAL_ROWS} are needed): import more "
                "league history")
    return ""


def rows_window(data: ModelData, in_pool: np.ndarray, league_order: list[str]) -> dict:
    """What the final models are fitted on: the pooled rows' dates, counts and leagues, and the matrices' hash."""
    train_rows = np.flatnonzero(in_pool)
    return {
        "first_date": str(data.dates[train_rows].min()), "last_date": str(data.dates[train_rows].max()),
        "rows": int(len(train_rows)), "currencies": int(len(set(data.currencies[train_rows]))),
        "leagues": [lg for lg in league_order if lg in set(data.leagues[train_rows])],
        "data_hash": data.data_hash(),
    }


def finish_global(result: GlobalResult, window: dict, checked: GlobalValidation, importance: dict[str, float],
                  out_dir: Path, warm: bool, seconds: float) -> GlobalResult:
    """Fill ``result`` once the final models are in ``out_dir``; write the out-of-fold rows and ``ensemble.json``.
    ``window``: ``rows_window`` of the rows the final models were fitted on."""
    out_dir.mkdir(parents=True, exist_ok=True)
    checked.oof.write_parquet(out_dir / OOF_FILE)
    result.trained = True
    result.params, result.rounds, result.weights = checked.params, checked.rounds, checked.weights
    result.metrics, result.folds = checked.metrics, checked.folds
    result.feature_importance = importance
    result.tuning = checked.tuning
    result.inputs = checked.inputs
    result.artifact_dir = str(out_dir)
    result.data_window = {**window, "oof_rows": checked.oof.height, "warm_refit": warm,
                          "tuning": checked.reused or "tuned"}
    result.seconds = seconds
    write_meta(out_dir, {**result.as_dict(), "kind": "global"})
    return result


def train_global(
    rows: pl.DataFrame,
    feature_columns: list[str],
    horizon: int,
    league_order: list[str],
    current_league: str,
    profile: Profile,
    out_dir: Path,
    seed: int = 42,
    warm: GlobalValidation | None = None,
) -> GlobalResult:
    """Validate (or reuse ``warm``) and fit the global ensemble of one horizon on ``rows`` (``pooled_rows``);
    write its artifacts to ``out_dir``: the native models, ``ensemble.json`` and the out-of-fold forecasts
    (``oof.parquet``). In one process; ``training.train_globals`` splits the same steps into parallel jobs."""
    started = time.perf_counter()
    data, in_pool = global_data(rows, feature_columns, horizon, league_order)
    result = GlobalResult(horizon, trained=False, feature_names=data.feature_names)
    result.reason = skip_reason(in_pool, horizon)
    if result.reason:
        return result
    checked = warm if warm is not None else validate_global(data, in_pool, current_league, profile, seed)
    importance = fit_ensemble(data, checked.params, checked.rounds, checked.weights, out_dir,
                              index=np.flatnonzero(in_pool))
    return finish_global(result, rows_window(data, in_pool, league_order), checked, importance, out_dir,
                         warm is not None, time.perf_counter() - started)

"""A ``currency_models`` partition: the global model of its horizon, specialised to one currency.

The partition forecasts ``scale x g``, where ``g`` is the global model's forecast (``global_model``) and ``scale``
says how far this currency's own out-of-fold rows trust it. The scale that fits the currency's own rows best is
partially pooled towards the one that fits every currency's rows, so that a currency with few rows of its own stays
close to the pooled scale and one with many follows its own:

    scale = (n x own_scale + PRIOR_ROWS x pooled_scale) / (n + PRIOR_ROWS)

Both scales are chosen on a grid (0 to 1.5) by the mean absolute error of the global model's out-of-fold forecasts.
A currency new to the market (no out-of-fold row of its own) gets the pooled scale, and its forecasts a lower
confidence. The partition records the global model version it was built on and forecasts through that version, so a
new global champion never silently changes a partition's inputs.

What was measured (walk-forward with weekly refits, the global model's forecasts of the three leagues before each
test league choosing the scales): the global forecast as it is, one pooled scale per horizon, each currency's own
scale, and partial pooling. Partial pooling was best or close to best on both the development leagues
(Heist..Archnemesis) and the benchmark leagues (Scourge..Sanctum); the currency's own scale alone was noisy and lost
skill at 3 and 7 days on the development leagues.

The reported metrics are on the currency's own rows of the global model's holdout league: that league's forecasts
come from a model whose tuning never saw it, and the scale used there is chosen on the other folds (cross-fitted), so
no choice saw the rows it is scored on. A currency without holdout rows is scored on the tuning folds, where the
global model's tuning and weights were chosen: in sample for that choice, and ``metrics_scope`` says so.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from poe_pipeline.modeling import forecast_metrics

SCALE_GRID = np.linspace(0.0, 1.5, 31)
PRIOR_ROWS = 200  # the pooled scale counts as this many rows of the currency's own
MIN_OWN_ROWS = 30  # fewer out-of-fold rows than this: the pooled scale alone
HOLDOUT_SCOPE = "holdout league (nested)"
TUNING_FOLDS_SCOPE = "tuning folds (in sample: the global model was tuned on them; the scale is cross-fitted)"
RESIDUALS_FILE = "residuals.parquet"
META_FILE = "currency_model.json"
RESIDUAL_SCHEMA = {"league": pl.Utf8, "date": pl.Date, "actual_logret": pl.Float64, "residual": pl.Float64,
                   "fold": pl.Utf8, "own": pl.Boolean}


def best_scale(y: np.ndarray, g: np.ndarray) -> float:
    """The grid scale whose scaled forecasts have the lowest mean absolute error (1.0 without rows)."""
    if len(y) == 0:
        return 1.0
    maes = [float(np.mean(np.abs(y - a * g))) for a in SCALE_GRID]
    return float(SCALE_GRID[int(np.argmin(maes))])


def pooled_scale(y: np.ndarray, g: np.ndarray, own_y: np.ndarray, own_g: np.ndarray) -> tuple[float, float, int]:
    """(scale, own scale, own rows): the currency's own scale partially pooled towards the all-currency one."""
    pooled = best_scale(y, g)
    n = len(own_y)
    own = best_scale(own_y, own_g) if n >= MIN_OWN_ROWS else pooled
    return (n * own + PRIOR_ROWS * pooled) / (n + PRIOR_ROWS), own, n


@dataclass
class CurrencyResult:
    currency: str
    horizon: int
    trained: bool
    reason: str = ""
    scale: float = 1.0
    own_scale: float = 1.0
    pooled_scale: float = 1.0
    own_rows: int = 0
    global_name: str = ""
    global_version: str = ""
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # "persistence", "global", "specialised"
    metrics_scope: str = ""
    folds: list[str] = field(default_factory=list)
    data_window: dict = field(default_factory=dict)
    artifact_dir: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def validation_mae(self) -> float:
        return self.metrics.get("specialised", {}).get("mae_logret", float("nan"))

    @property
    def skill(self) -> float:
        return self.metrics.get("specialised", {}).get("skill", float("nan"))

    @property
    def fold_signature(self) -> str:
        return "|".join(self.folds)


def train_currency(
    currency: str,
    horizon: int,
    global_oof: pl.DataFrame,
    global_name: str,
    global_version: str,
    out_dir: Path,
) -> CurrencyResult:
    """Specialise the global model (``global_oof``: its out-of-fold forecasts, ``global_model.OOF_SCHEMA``) to
    ``currency``; write ``currency_model.json`` and the residuals that calibrate its intervals to ``out_dir``."""
    started = time.perf_counter()
    result = CurrencyResult(currency, horizon, trained=False, global_name=global_name, global_version=global_version)
    pool = global_oof.filter(pl.col("in_pool"))
    own = global_oof.filter(pl.col("currency") == currency)
    y, g = pool["actual_logret"].to_numpy(), pool["pred_logret"].to_numpy()
    result.scale, result.own_scale, result.own_rows = pooled_scale(
        y, g, own["actual_logret"].to_numpy(), own["pred_logret"].to_numpy())
    result.pooled_scale = best_scale(y, g)

    # Cross-fitted: each fold's rows get the scale chosen without that fold.
    folds = sorted(set(global_oof["fold"]))
    specialised = np.empty(own.height)
    for fold in folds:
        mask = (own["fold"] == fold).to_numpy()
        if not mask.any():
            continue
        other_pool = pool.filter(pl.col("fold") != fold)
        other_own = own.filter(pl.col("fold") != fold)
        scale, _, _ = pooled_scale(other_pool["actual_logret"].to_numpy(), other_pool["pred_logret"].to_numpy(),
                                   other_own["actual_logret"].to_numpy(), other_own["pred_logret"].to_numpy())
        specialised[mask] = scale * own["pred_logret"].to_numpy()[mask]
    own_y = own["actual_logret"].to_numpy()
    # Scored on the global model's holdout league alone where it has rows: its tuning never saw that league and the
    # scale used there was chosen on the other folds, so these metrics are out of sample for every choice (nested).
    holdout = own["holdout"].to_numpy() if own.height else np.array([], dtype=bool)
    scored = holdout if holdout.any() else np.ones(len(own_y), dtype=bool)
    # without holdout rows: the tuning folds, where tuning chose the global model (in sample for that choice)
    result.metrics_scope = (HOLDOUT_SCOPE if holdout.any() else TUNING_FOLDS_SCOPE if own.height
                            else "no rows of its own")
    y_s = own_y[scored]
    persistence = float(np.mean(np.abs(y_s))) if len(y_s) else float("nan")
    if len(own_y):
        result.metrics = {
            "persistence": forecast_metrics(y_s, np.zeros_like(y_s), persistence),
            "global": forecast_metrics(y_s, own["pred_logret"].to_numpy()[scored], persistence),
            "specialised": forecast_metrics(y_s, specialised[scored], persistence),
        }
        residuals = own.select("league", "date", "actual_logret", "fold").with_columns(
            pl.Series("residual", own_y - specialised), pl.lit(True).alias("own"))
    else:
        residuals = pl.DataFrame(schema=RESIDUAL_SCHEMA)
    result.folds = [f for f in folds if f in set(own["fold"])]
    out_dir.mkdir(parents=True, exist_ok=True)
    residuals.select(list(RESIDUAL_SCHEMA)).cast(RESIDUAL_SCHEMA).write_parquet(out_dir / RESIDUALS_FILE)
    result.trained = True
    if result.own_rows < MIN_OWN_ROWS:
        result.reason = (f"{result.own_rows} out-of-fold rows of its own (fewer than {MIN_OWN_ROWS}): the global "
                         "forecast with the pooled scale, at a lower confidence")
    result.artifact_dir = str(out_dir)
    result.data_window = {"own_rows": result.own_rows, "pool_rows": pool.height,
                          "leagues": sorted(set(own["league"].to_list()))}
    result.seconds = time.perf_counter() - started
    (out_dir / META_FILE).write_text(json.dumps({**result.as_dict(), "kind": "currency"}, indent=1, default=str))
    return result


def read_currency_meta(directory: Path) -> dict:
    return json.loads((Path(directory) / META_FILE).read_text())

"""The trained models as MLflow models: a pyfunc wrapping the native files, with a signature and an input example.

An ML engineer loads a champion in one line and forecasts rows of the warehouse's ``features`` view::

    mlflow.set_tracking_uri("sqlite:///data_lake/mlflow/mlflow.db")
    model = mlflow.pyfunc.load_model("models:/poe-divine-orb-7d@champion")
    model.predict(features_rows)  # -> predicted_logret, predicted_price (chaos)

- ``GlobalPyfunc``: the global ensemble of a horizon (LightGBM, XGBoost, RandomForest in their native formats).
- ``CurrencyPyfunc``: a partition; it forecasts through the global model version it was built on, loaded from the
  same registry (``models:/poe-global-<h>d/<version>``), times its scale, exactly as the ``predictions`` asset does.

The native files stay inside the MLflow model (``artifacts/model/``), where the pipeline itself reads them.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import polars as pl
import polars.selectors as cs

# the native files, under <MLflow model>/artifacts/model/: defined in tracking, which must not import MLflow
from poe_pipeline.tracking import ARTIFACT_KEY, native_dir  # noqa: F401

OUTPUT_COLUMNS = ("predicted_logret", "predicted_price")
PYFUNC_CODE = Path(__file__).parent / "pyfunc_code"


def input_columns(feature_names: list[str]) -> list[str]:
    """The feature-view columns a model reads: what ``modeling.model_inputs`` derives its inputs from, plus the
    price the forecast applies to."""
    from poe_pipeline.modeling import _LAGS, _LEVEL_STATS, _LEVEL_WINDOWS

    derived = {"log_price", "ema_12", "ema_26", "price_chaos",
               *(f"log_price_lag_{k}" for k in _LAGS),
               *(f"log_price_roll_{s}_{w}" for s in _LEVEL_STATS for w in _LEVEL_WINDOWS)}
    relative = {f"logret_lag_{k}" for k in _LAGS} | {f"log_price_vs_{s}_{w}" for s in _LEVEL_STATS
                                                      for w in _LEVEL_WINDOWS} | {"log_price_vs_ema_12",
                                                                                  "log_price_vs_ema_26"}
    return sorted({n for n in feature_names if n not in relative} | derived)


def _output(rows: pl.DataFrame, logret: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"predicted_logret": logret,
                         "predicted_price": rows["price_chaos"].to_numpy() * np.exp(logret)})


class GlobalPyfunc(mlflow.pyfunc.PythonModel):
    """The global ensemble of one horizon."""

    def load_context(self, context) -> None:
        from poe_pipeline.modeling import Ensemble

        self.ensemble = Ensemble(Path(context.artifacts[ARTIFACT_KEY]))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        rows = pl.from_pandas(model_input)
        return _output(rows, self.ensemble.predict(rows))


class CurrencyPyfunc(mlflow.pyfunc.PythonModel):
    """One partition: the global version it was built on, times its scale."""

    def load_context(self, context) -> None:
        from poe_pipeline.currency_model import read_currency_meta

        meta = read_currency_meta(Path(context.artifacts[ARTIFACT_KEY]))
        self.scale = float(meta["scale"])
        self.global_model = mlflow.pyfunc.load_model(f"models:/{meta['global_name']}/{meta['global_version']}")

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        rows = pl.from_pandas(model_input)
        logret = self.scale * self.global_model.predict(model_input)["predicted_logret"].to_numpy()
        return _output(rows, logret)


def save_pyfunc(directory: Path, model_dir: Path, kind: str, feature_names: list[str],
                example: pl.DataFrame, example_logret: np.ndarray) -> Path:
    """Write the MLflow model of ``model_dir`` (native files) into ``directory``; returns it."""
    # models from code: the file that builds the pyfunc is stored and run at load, not a pickled object
    python_model = str(PYFUNC_CODE / ("global_ensemble.py" if kind == "global" else "currency_partition.py"))
    example = example.select(input_columns(feature_names)).head(5)
    # integer columns are described as doubles, as MLflow advises for columns that may be missing (pandas holds a
    # missing integer as a float NaN); it still takes ints there, and no longer warns at every logged model
    inputs = example.with_columns(cs.integer().cast(pl.Float64)).to_pandas()
    outputs = _output(example, example_logret[: example.height])
    # MLflow keeps an artifact folder's own name: stage it as ARTIFACT_KEY so native_dir() finds it
    staged = Path(tempfile.mkdtemp()) / ARTIFACT_KEY
    shutil.copytree(model_dir, staged)
    try:
        _save(directory, python_model, staged, inputs, outputs, kind)
    finally:
        shutil.rmtree(staged.parent, ignore_errors=True)
    return directory


def _save(directory: Path, python_model: str, staged: Path, inputs, outputs, kind: str) -> None:
    from mlflow.models import infer_signature

    mlflow.pyfunc.save_model(
        path=str(directory), python_model=python_model, artifacts={ARTIFACT_KEY: str(staged)},
        signature=infer_signature(inputs, outputs), input_example=inputs,
        pip_requirements=["lightgbm", "xgboost", "scikit-learn", "polars", "pandas"],
        metadata={"kind": kind,
                  "output": "predicted_logret: ln(predicted price / price_chaos); predicted_price: chaos"},
    )

"""The Dagster layer, one module per stage: each holds that stage's assets, checks, automation, jobs, schedules and
sensors, and exports them as ``defs``; ``poe_pipeline.definitions`` merges them.

| module | stage |
| --- | --- |
| ``ingestion`` | the 5-minute poll of poe.watch, its schedule, the active-league sensor |
| ``prices`` | poe.ninja dumps and the daily prices, their checks, the daily refresh |
| ``features`` | the feature store and the currency universe, the no-look-ahead check |
| ``models`` | the global models and the currency partitions, the retrain job, its schedule and sensors |
| ``forecasts`` | the predictions and the investment report, their check |
| ``alerts`` | the run-failure alerts |

Helpers shared by the stages (metadata a person can read) are below.
"""

from __future__ import annotations

import math

import dagster as dg
import polars as pl

from poe_pipeline.contracts import VIEW_DOCS, schema_docs
from poe_pipeline.reporting import markdown_table
from poe_pipeline.warehouse import view_schema

INGESTION_QUEUE = {"poe/queue": "ingestion"}  # dagster.yaml limits each queue to one run at a time
TRAINING_QUEUE = {"poe/queue": "training"}
SHOWN_ROWS = 20


def column_schema(view: str) -> dict:
    """``dagster/column_schema`` metadata of an asset that lands in the warehouse view ``view``: the same columns
    and descriptions as the view's ``COMMENT ON`` in DuckDB."""
    return {"dagster/column_schema": dg.TableSchema(columns=[
        dg.TableColumn(name, dtype, description=text or None)
        for name, dtype, text in schema_docs(view, view_schema(view))])}


def view_description(view: str, text: str) -> str:
    return f"{text} Warehouse view `{view}`: {VIEW_DOCS.get(view, '')}".strip()


def table(frame: pl.DataFrame, rows: int = SHOWN_ROWS) -> dg.MetadataValue:
    """A frame as a Markdown table (rounded, at most ``rows`` rows)."""
    shown = frame.head(rows).with_columns(pl.col(pl.Date, pl.Datetime).cast(pl.Utf8))
    return dg.MetadataValue.md(markdown_table(shown) if shown.height else "none")


def rounded(value: float | None, digits: int = 4) -> float | None:
    """A number as a person reads it (``0.85``, not ``0.8500000000000001``); None for NaN or no value."""
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), digits)


def mlflow_link(mlflow_url: str, experiment_id: str, run_id: str) -> dg.MetadataValue | str:
    """A link to an MLflow run when the MLflow UI's address is known (``POE_MLFLOW_URL``), else the run id."""
    if not mlflow_url or not run_id:
        return run_id or ""
    return dg.MetadataValue.url(f"{mlflow_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}")

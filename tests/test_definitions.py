"""The Dagster code location: what it holds, stage by stage, and that Dagster's own validators accept it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dagster as dg

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_the_definitions_hold_every_stage():
    from poe_pipeline.definitions import defs

    assets = {spec.key.to_user_string() for spec in defs.resolve_all_asset_specs()}
    assert assets == {"price_snapshots", "historical_prices", "daily_prices", "features", "currency_universe",
                      "global_models", "currency_models", "predictions", "advice_outcomes", "investment_report"}
    checks = {key.name for key in defs.get_repository_def().asset_graph.asset_check_keys}
    assert checks == {"daily_prices_positive_finite", "daily_prices_unique_keys", "daily_prices_day_over_day_jumps",
                      "features_no_lookahead", "predictions_interval_contains_point"}
    jobs = {job.name for job in defs.resolve_all_job_defs()} - {"__ASSET_JOB"}
    assert jobs == {"ingestion_job", "prices_job", "features_job", "retrain_models_job", "forecast_job"}
    assert {s.name for s in defs.schedules} == {"ingestion_every_5_minutes", "weekly_retrain"}
    assert {s.name for s in defs.sensors} == {"league_change", "new_currency_partitions", "model_degradation",
                                              "failure_alerts", "daily_refresh"}
    assert set(defs.resources) == {"lake", "poe_watch", "run_scope", "monitoring"}


def test_each_stage_lives_in_one_module():
    from poe_pipeline.assets import alerts, features, forecasts, ingestion, models, prices

    def names(stage) -> set[str]:
        d = stage.defs
        return ({k.to_user_string() for a in d.assets or [] for k in a.keys}
                | {j.name for j in d.jobs or []} | {s.name for s in d.schedules or []}
                | {s.name for s in d.sensors or []})

    assert names(ingestion) == {"price_snapshots", "ingestion_job", "ingestion_every_5_minutes", "league_change"}
    assert names(prices) == {"historical_prices", "daily_prices", "prices_job"}
    assert names(features) == {"features", "currency_universe", "features_job"}
    assert names(models) == {"global_models", "currency_models", "retrain_models_job", "weekly_retrain",
                             "new_currency_partitions", "model_degradation"}
    assert names(forecasts) == {"predictions", "advice_outcomes", "investment_report", "forecast_job"}
    assert names(alerts) == {"failure_alerts"}


def test_every_warehouse_asset_declares_its_columns():
    from poe_pipeline.definitions import defs

    for spec in defs.resolve_all_asset_specs():
        if spec.key.to_user_string() in {"global_models", "currency_models"}:
            continue  # they land in MLflow, not in a warehouse view
        schema = spec.metadata.get("dagster/column_schema")
        assert isinstance(schema, dg.TableSchema) and schema.columns, spec.key
        described = [c for c in schema.columns if c.description]
        assert len(described) >= len(schema.columns) // 2, (spec.key, [c.name for c in schema.columns])


def test_dagster_definitions_validate():
    result = subprocess.run([str(BIN / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dg_check_defs():
    result = subprocess.run([str(BIN / "dg"), "check", "defs"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr

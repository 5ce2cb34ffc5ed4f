"""The Dagster code location loads, and Dagster's own validator accepts it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dagster as dg

REPO = Path(__file__).resolve().parents[1]


def test_definitions_load_with_every_stage():
    from poe_pipeline.definitions import defs

    keys = {spec.key.to_user_string() for spec in defs.resolve_all_asset_specs()}
    assert {"price_snapshots", "historical_prices", "daily_prices"} <= keys
    assert defs.resolve_job_def("ingestion_job") is not None
    assert isinstance(defs.resolve_schedule_def("ingestion_every_5_minutes"), dg.ScheduleDefinition)


def test_dagster_definitions_validate():
    result = subprocess.run(
        [str(Path(sys.executable).with_name("dagster")), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr

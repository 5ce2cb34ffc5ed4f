"""The Dagster code location: assets, resources, jobs and schedules of the pipeline."""

from __future__ import annotations

import dagster as dg

from poe_pipeline.jobs import ALL_ASSETS, ingestion_job, retrain_models_job
from poe_pipeline.resources import resources_from_env

ingestion_schedule = dg.ScheduleDefinition(
    name="ingestion_every_5_minutes",
    job=ingestion_job,
    cron_schedule="*/5 * * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
)

defs = dg.Definitions(
    assets=ALL_ASSETS,
    jobs=[ingestion_job, retrain_models_job],
    schedules=[ingestion_schedule],
    resources=resources_from_env(),
)

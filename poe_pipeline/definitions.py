"""The Dagster code location: assets, checks, resources, jobs, schedules and sensors of the pipeline.

What runs when is in ``poe_pipeline.schedules`` (schedules, AutomationConditions, the freshness policy); what the
sensors watch is in ``poe_pipeline.sensors``; the asset checks are in ``poe_pipeline.assets.checks``.
"""

import dagster as dg

from poe_pipeline.assets.checks import checks_for
from poe_pipeline.jobs import ALL_ASSETS, ingestion_job, retrain_models_job
from poe_pipeline.resources import resources_from_env
from poe_pipeline.schedules import SCHEDULES, automation_conditions, daily_refresh_sensor, with_automation
from poe_pipeline.sensors import SENSORS, MonitoringResource


def build_definitions() -> dg.Definitions:
    assets = ALL_ASSETS
    asset_names = {key.to_user_string() for asset in assets for key in asset.keys}
    automated = sorted(set(automation_conditions()) & asset_names)
    return dg.Definitions(
        assets=with_automation(assets),
        asset_checks=checks_for(asset_names),
        jobs=[ingestion_job, retrain_models_job],
        schedules=SCHEDULES,
        sensors=[*SENSORS, daily_refresh_sensor(automated)],
        resources={**resources_from_env(), "monitoring": MonitoringResource.from_env()},
    )


defs = build_definitions()

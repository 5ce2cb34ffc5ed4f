"""The Dagster code location: each stage's definitions (``poe_pipeline.assets``), merged, with the resources.

``dagster dev -w workspace.yaml``, ``dg dev`` and ``dg check defs`` all load ``defs`` from here.
"""

import dagster as dg

from poe_pipeline.assets import alerts, features, forecasts, ingestion, models, prices
from poe_pipeline.resources import resources_from_settings

STAGES = (ingestion, prices, features, models, forecasts, alerts)

# Declarative Automation: one sensor evaluates every asset's automation condition (daily_prices after 00:10 UTC,
# then features, the universe, the predictions and the report as soon as their inputs update).
daily_refresh = dg.AutomationConditionSensorDefinition(
    "daily_refresh",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.STOPPED,
    minimum_interval_seconds=60,
    run_tags={"poe/trigger": "daily_refresh"},
    description="Evaluates the assets' AutomationConditions: daily_prices each day after 00:10 UTC, then the "
    "features, the universe, the predictions and the report as soon as their inputs update.",
)

defs = dg.Definitions.merge(
    *(stage.defs for stage in STAGES),
    dg.Definitions(sensors=[daily_refresh], resources=resources_from_settings()),
)

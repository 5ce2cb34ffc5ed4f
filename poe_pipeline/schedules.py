"""When things run: the 5-minute ingestion, the weekly retrain, and the daily refresh by Declarative Automation.

| what | how |
| --- | --- |
| ingestion | ``ingestion_every_5_minutes``: skips a tick while an ingestion run is queued or running; the run queue's
  ``poe/queue=ingestion`` limit of 1 (dagster.yaml) backs it up |
| weekly retrain | ``weekly_retrain``, Monday 04:00 UTC: every ``currency_models`` partition in one run of
  ``retrain_models_job`` (it trains them in parallel processes); ``POE_RETRAIN_SHARDS=N`` splits it into N runs for a
  cluster, where the K8sRunLauncher gives each its own pod |
| daily refresh | AutomationConditions, evaluated by the ``daily_refresh`` automation sensor: ``daily_prices`` after
  00:10 UTC once a poll of the new day landed, then ``features``, ``currency_universe``, ``predictions`` and
  ``investment_report`` as soon as what they read updated (usually in the same run) |

All of them start stopped: turn them on in the UI (Automation) or with ``dagster schedule start`` /
``dagster sensor start``.
"""

import os
from datetime import UTC, datetime, timedelta

import dagster as dg

from poe_pipeline.assets.features import currency_partitions
from poe_pipeline.jobs import ingestion_job, retrain_models_job
from poe_pipeline.resources import resources_from_env
from poe_pipeline.training import HORIZON_KEYS

INGESTION_SCHEDULE = "ingestion_every_5_minutes"
INGESTION_CRON = "*/5 * * * *"
WEEKLY_RETRAIN_CRON = "0 4 * * 1"  # Monday 04:00 UTC
DAILY_REFRESH_CRON = "10 0 * * *"  # 00:10 UTC: yesterday's last poll (23:55) is in, and the 00:10 poll follows
IN_PROGRESS = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]
INGESTION_QUEUE_TAG = {"poe/queue": "ingestion"}
SCHEDULED_TIME_TAG = "poe/scheduled_execution_time"  # ISO time of the tick; Dagster's own tag is hidden

# warn when the newest snapshot is 15 minutes old (three missed polls), fail after an hour
SNAPSHOT_FRESHNESS = dg.FreshnessPolicy.time_window(fail_window=timedelta(hours=1), warn_window=timedelta(minutes=15))


def ingestion_in_progress(instance: dg.DagsterInstance) -> list[str]:
    """Run ids of ingestion runs that are queued or running (any launcher: schedule, sensor, the UI)."""
    records = instance.get_run_records(filters=dg.RunsFilter(tags=INGESTION_QUEUE_TAG, statuses=IN_PROGRESS), limit=5)
    return [r.dagster_run.run_id for r in records]


@dg.schedule(
    name=INGESTION_SCHEDULE,
    job=ingestion_job,
    cron_schedule=INGESTION_CRON,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="One poll of poe.watch every 5 minutes. A tick is skipped while an ingestion run is still queued or "
    "running, so two never overlap (the run queue's poe/queue=ingestion limit of 1 also holds them apart).",
)
def ingestion_every_5_minutes(context: dg.ScheduleEvaluationContext):
    tick = context.scheduled_execution_time or datetime.now(UTC)  # no tick time when evaluated by hand
    running = ingestion_in_progress(context.instance)
    if running:
        return dg.SkipReason(
            f"Ingestion run {running[0]} is still queued or running; skipping the {tick:%H:%M} UTC poll so two "
            "never overlap"
        )
    # the poll's slot key: a run that starts late (a busy queue) still stores the poll under its tick's time
    return dg.RunRequest(tags={"poe/trigger": "schedule", SCHEDULED_TIME_TAG: tick.isoformat()})


def retrain_shards() -> int:
    raw = os.environ.get("POE_RETRAIN_SHARDS", "1")
    try:
        shards = int(raw)
    except ValueError:
        raise ValueError(f"POE_RETRAIN_SHARDS={raw!r}: expected a whole number of runs, e.g. 4") from None
    if shards < 1:
        raise ValueError(f"POE_RETRAIN_SHARDS={shards}: expected 1 or more")
    return shards


def split_into_shards(names: list[str], shards: int) -> list[list[str]]:
    """Round-robin over the sorted names, so the shards stay balanced as currencies are added."""
    ordered = sorted(names)
    return [ordered[i::shards] for i in range(shards) if ordered[i::shards]]


def run_scope_config(profile: str) -> dict:
    """The whole run_scope config with another profile: run config replaces a resource's config as a whole, so the
    fields set from the environment (league, history) are carried over rather than reset to their defaults."""
    scope = resources_from_env()["run_scope"]
    return {**{name: getattr(scope, name) for name in type(scope).model_fields}, "profile": profile}


def retrain_request(currencies: list[str], profile: str, shard: str = "all") -> dg.RunRequest:
    return dg.RunRequest(
        run_config={
            "ops": {"retrain_partitions": {"config": {"currencies": currencies, "horizons": list(HORIZON_KEYS)}}},
            "resources": {"run_scope": {"config": run_scope_config(profile)}},
        },
        tags={"poe/trigger": "weekly_retrain", "poe/profile": profile, "poe/shard": shard},
    )


@dg.schedule(
    name="weekly_retrain",
    job=retrain_models_job,
    cron_schedule=WEEKLY_RETRAIN_CRON,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Every Monday 04:00 UTC: retrain every currency_models partition in one run that trains them in "
    "parallel, with the `prod` profile (POE_RETRAIN_PROFILE). POE_RETRAIN_SHARDS=N splits it into N runs.",
)
def weekly_retrain(context: dg.ScheduleEvaluationContext):
    profile = os.environ.get("POE_RETRAIN_PROFILE", "prod")
    shards = retrain_shards()
    if shards == 1:
        return retrain_request([], profile)  # empty: the op trains every partition that exists when it starts
    currencies = context.instance.get_dynamic_partitions(currency_partitions.name)
    if not currencies:
        return dg.SkipReason("No currency partitions yet: materialize currency_universe first")
    parts = split_into_shards(currencies, shards)
    return [retrain_request(part, profile, f"{i + 1}/{len(parts)}") for i, part in enumerate(parts)]


# --- the daily refresh, by Declarative Automation ---------------------------------------------------------------


def _eager_despite_missing(*ignored: str) -> dg.AutomationCondition:
    """``eager()``, except that missing partitions of ``ignored`` deps do not block: a currency partition whose model
    is not trained yet (too little data) must not hold back the forecasts of every other currency."""
    return (
        (dg.AutomationCondition.newly_missing() | dg.AutomationCondition.any_deps_updated()).since_last_handled()
        & ~dg.AutomationCondition.any_deps_missing().ignore(dg.AssetSelection.assets(*ignored))
        & ~dg.AutomationCondition.any_deps_in_progress()
        & ~dg.AutomationCondition.in_progress()
    ).with_label("eager (untrained partitions do not block)")


def automation_conditions() -> dict[str, dg.AutomationCondition]:
    """Asset name -> its condition (an asset missing from the graph is simply not matched)."""
    return {
        # daily, once a poll of the new day has landed; imports of history dumps are not awaited
        "daily_prices": dg.AutomationCondition.on_cron(DAILY_REFRESH_CRON).ignore(
            dg.AssetSelection.assets("historical_prices")),
        "features": dg.AutomationCondition.eager(),
        "currency_universe": dg.AutomationCondition.eager(),
        # after new features (daily) and after retrained models (weekly, or a degradation retrain)
        "predictions": _eager_despite_missing("global_models", "currency_models"),
        "investment_report": dg.AutomationCondition.eager(),
    }


def with_automation(assets: list) -> list:
    """The assets with their automation conditions and, on price_snapshots, the freshness policy."""
    conditions = automation_conditions()

    def attach(spec: dg.AssetSpec) -> dg.AssetSpec:
        name = spec.key.to_user_string()
        if name == "price_snapshots":
            spec = dg.apply_freshness_policy(spec, SNAPSHOT_FRESHNESS)
        if name in conditions:
            spec = spec.replace_attributes(automation_condition=conditions[name])
        return spec

    return list(dg.map_asset_specs(attach, assets))


def daily_refresh_sensor(asset_names: list[str]) -> dg.AutomationConditionSensorDefinition:
    return dg.AutomationConditionSensorDefinition(
        "daily_refresh",
        target=dg.AssetSelection.assets(*asset_names),
        default_status=dg.DefaultSensorStatus.STOPPED,
        minimum_interval_seconds=60,
        run_tags={"poe/trigger": "daily_refresh"},
        description="Evaluates the assets' AutomationConditions: daily_prices each day after 00:10 UTC, then the "
        "features, the universe, the predictions and the report as soon as their inputs update.",
    )


SCHEDULES = [ingestion_every_5_minutes, weekly_retrain]

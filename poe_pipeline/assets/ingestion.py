"""Ingestion: one poll of the live poe.watch API every 5 minutes, appended to the lake; the active league.

| definition | what it does |
| --- | --- |
| ``price_snapshots`` | one validated poll, an immutable Parquet file per 5-minute slot; bad records to quarantine |
| ``ingestion_job`` | that asset alone, in-process (a subprocess per poll would cost seconds) |
| ``ingestion_every_5_minutes`` | the schedule; a tick is skipped while an ingestion run is queued or running |
| ``league_change`` | a sensor: records the active challenge league and polls it at once when it changes |
"""

from datetime import UTC, datetime, timedelta

import dagster as dg

from poe_pipeline import monitoring as mon
from poe_pipeline.assets import INGESTION_QUEUE, column_schema, view_description
from poe_pipeline.ingestion import ingest_poll, poll_slot
from poe_pipeline.resources import LakeResource, PoeWatchResource
from poe_pipeline.sources.poe_watch import PoeWatchError

SCHEDULED_TIME_TAG = "poe/scheduled_execution_time"  # ISO time of the tick; Dagster's own tag is hidden
IN_PROGRESS = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
               dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
# warn when the newest snapshot is 15 minutes old (three missed polls), fail after an hour
SNAPSHOT_FRESHNESS = dg.FreshnessPolicy.time_window(fail_window=timedelta(hours=1), warn_window=timedelta(minutes=15))


def _poll_time(context: dg.AssetExecutionContext) -> datetime:
    """The scheduled tick time when a schedule launched the run, else now; floored to the 5-minute slot."""
    scheduled = context.run.tags.get(SCHEDULED_TIME_TAG)
    return poll_slot(datetime.fromisoformat(scheduled) if scheduled else datetime.now(UTC))


@dg.asset(
    group_name="ingestion",
    kinds={"parquet", "python"},
    op_tags=INGESTION_QUEUE,
    freshness_policy=SNAPSHOT_FRESHNESS,
    metadata=column_schema("price_snapshots"),
    description=view_description("price_snapshots", "Every 5 minutes, one validated poll of poe.watch (currency and "
                                 "fragment), appended as an immutable Parquet file per 5-minute slot. Bad records go "
                                 "to quarantine."),
)
def price_snapshots(
    context: dg.AssetExecutionContext, lake: LakeResource, poe_watch: PoeWatchResource
) -> dg.MaterializeResult:
    store = lake.lake
    client = poe_watch.client(store)
    try:
        league = poe_watch.league or mon.read_active_league(store) or client.active_challenge_league()
        result = ingest_poll(store, client, league, _poll_time(context))
    except PoeWatchError as exc:
        raise dg.Failure(
            description=str(exc),
            metadata={f"circuit_breaker_{k}": str(v) for k, v in client.breaker_status().items()},
        ) from exc
    finally:
        client.close()
    lake.publish_views(context.log)
    context.log.info(f"{league}: {result.records} records, {result.quarantined} quarantined"
                     + (f" (skipped: {result.skipped_reason})" if result.skipped_reason else ""))
    return dg.MaterializeResult(metadata={
        "league": league,
        "snapshot_path": dg.MetadataValue.path(str(result.path)),
        "written": result.written,
        "dagster/row_count": result.records,
        "quarantined": result.quarantined,
        "skipped_reason": result.skipped_reason or "",
        **{f"circuit_breaker_{k}": str(v) for k, v in result.breaker.items()},
    })


ingestion_job = dg.define_asset_job(
    "ingestion_job",
    selection=[price_snapshots],
    # a poll takes seconds; past 4 minutes its process is dead or hung, and run monitoring fails it (dagster.yaml)
    tags={**INGESTION_QUEUE, "dagster/max_runtime": "240"},
    executor_def=dg.in_process_executor,  # one step: a subprocess per poll would cost seconds
    description="One poll of the live API into the lake.",
)


def ingestion_in_progress(instance: dg.DagsterInstance) -> list[str]:
    """Run ids of ingestion runs that are queued or running (any launcher: schedule, sensor, the UI)."""
    records = instance.get_run_records(filters=dg.RunsFilter(tags=INGESTION_QUEUE, statuses=IN_PROGRESS), limit=5)
    return [r.dagster_run.run_id for r in records]


@dg.schedule(
    name="ingestion_every_5_minutes",
    job=ingestion_job,
    cron_schedule="*/5 * * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="One poll of poe.watch every 5 minutes. A tick is skipped while an ingestion run is still queued or "
    "running, so two never overlap (the run queue's poe/queue=ingestion limit of 1 also holds them apart).",
)
def ingestion_every_5_minutes(context: dg.ScheduleEvaluationContext):
    tick = context.scheduled_execution_time or datetime.now(UTC)  # no tick time when evaluated by hand
    running = ingestion_in_progress(context.instance)
    if running:
        return dg.SkipReason(f"Ingestion run {running[0]} is still queued or running; skipping the {tick:%H:%M} UTC "
                             "poll so two never overlap")
    # the poll's slot key: a run that starts late (a busy queue) still stores the poll under its tick's time
    return dg.RunRequest(tags={"poe/trigger": "schedule", SCHEDULED_TIME_TAG: tick.isoformat()})


@dg.sensor(
    name="league_change",
    job=ingestion_job,
    minimum_interval_seconds=600,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Polls poe.watch /leagues; when the active challenge league changes it records it in the lake's state "
    "(ingestion polls that league when POE_LEAGUE is unset) and requests a poll.",
)
def league_change(context: dg.SensorEvaluationContext, lake: LakeResource, poe_watch: PoeWatchResource):
    store = lake.lake
    client = poe_watch.client(store)
    try:
        active = client.active_challenge_league()
    except PoeWatchError as exc:
        return dg.SkipReason(f"Could not read the active league: {exc}")
    finally:
        client.close()
    change = mon.record_active_league(store, active)
    if not change.changed:
        return dg.SkipReason(f"The active league is still {active}")
    pinned = f" (POE_LEAGUE pins ingestion to {poe_watch.league})" if poe_watch.league else ""
    context.log.info(f"Active league changed from {change.previous or 'unknown'} to {active}{pinned}")
    return dg.RunRequest(run_key=f"league-{active}", tags={"poe/trigger": "league_change", "poe/league": active})


defs = dg.Definitions(
    assets=[price_snapshots], jobs=[ingestion_job], schedules=[ingestion_every_5_minutes], sensors=[league_change])

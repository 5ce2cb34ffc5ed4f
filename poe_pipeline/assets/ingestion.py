"""``price_snapshots``: one poll of the live poe.watch API, appended to the lake."""


from datetime import UTC, datetime

import dagster as dg

from poe_pipeline.ingestion import ingest_poll, poll_slot
from poe_pipeline.monitoring import read_active_league
from poe_pipeline.resources import LakeResource, PoeWatchResource
from poe_pipeline.sources.poe_watch import PoeWatchError

INGESTION_TAGS = {"poe/queue": "ingestion"}


def _poll_time(context: dg.AssetExecutionContext) -> datetime:
    """The scheduled tick time when a schedule launched the run, else now; floored to the 5-minute slot."""
    scheduled = context.run.tags.get("poe/scheduled_execution_time")  # set by the ingestion schedule
    now = datetime.fromisoformat(scheduled) if scheduled else datetime.now(UTC)
    return poll_slot(now)


@dg.asset(
    group_name="ingestion",
    kinds={"parquet", "python"},
    op_tags=INGESTION_TAGS,
    description="Every 5 minutes, one validated poll of poe.watch (currency and fragment) appended as an "
    "immutable Parquet file under raw/poe_watch/league=<L>/date=<D>/. Bad records go to quarantine.",
)
def price_snapshots(
    context: dg.AssetExecutionContext, lake: LakeResource, poe_watch: PoeWatchResource
) -> dg.MaterializeResult:
    store = lake.lake
    client = poe_watch.client(store)
    try:
        league = poe_watch.league or read_active_league(store) or client.active_challenge_league()
        result = ingest_poll(store, client, league, _poll_time(context))
    except PoeWatchError as exc:
        breaker = client.breaker_status()
        raise dg.Failure(
            description=str(exc),
            metadata={f"circuit_breaker_{k}": str(v) for k, v in breaker.items()},
        ) from exc
    lake.publish_views(context.log)
    context.log.info(
        f"{league}: {result.records} records, {result.quarantined} quarantined"
        + (f" (skipped: {result.skipped_reason})" if result.skipped_reason else "")
    )
    return dg.MaterializeResult(
        metadata={
            "league": league,
            "snapshot_path": dg.MetadataValue.path(str(result.path)),
            "written": result.written,
            "records": result.records,
            "quarantined": result.quarantined,
            "skipped_reason": result.skipped_reason or "",
            **{f"circuit_breaker_{k}": str(v) for k, v in result.breaker.items()},
        }
    )

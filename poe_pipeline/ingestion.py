"""One poe.watch poll into the lake: an immutable Parquet file per 5-minute slot.

The slot time is the file's key, so a re-run of the same slot, or a second run
racing the first, never duplicates a poll: ``write_parquet_once`` publishes with
``os.link``, which fails on an existing file. Bad records go to a quarantine file
beside the raw data, written before the snapshot so none is lost if the run dies.

A poll in which no record validates is schema drift (the API renamed or retyped a field): its records are
quarantined, no snapshot is written (the slot stays free for a re-run), and ``SchemaDriftError`` fails the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import polars as pl

from poe_pipeline.lake import Lake, write_parquet_once
from poe_pipeline.sources.poe_watch import (
    DEFAULT_CATEGORIES,
    QUARANTINE_SCHEMA,
    SNAPSHOT_SCHEMA,
    SOURCE,
    SchemaDriftError,
    schema_drift,
    validate_poll,
)

POLL_EVERY_MINUTES = 5


class PollingClient(Protocol):
    def poll(self, league: str, categories: tuple[str, ...] = ...) -> list[tuple[str, list]]: ...

    def breaker_status(self) -> dict: ...


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError(f"{moment.isoformat()} has no time zone; pass an aware datetime (UTC)")
    return moment.astimezone(UTC)


def _partition(lake: Lake, base: Path, league: str, poll_time: datetime) -> Path:
    poll_time = _utc(poll_time)
    return lake.league_path(
        base, league, f"date={poll_time.strftime('%Y-%m-%d')}", f"poll-{poll_time.strftime('%Y%m%dT%H%M%SZ')}.parquet"
    )


def snapshot_path(lake: Lake, league: str, poll_time: datetime) -> Path:
    return _partition(lake, lake.poe_watch_raw, league, poll_time)


def quarantine_path(lake: Lake, league: str, poll_time: datetime) -> Path:
    return _partition(lake, lake.quarantine / SOURCE, league, poll_time)


def poll_slot(now: datetime, every_minutes: int = POLL_EVERY_MINUTES) -> datetime:
    """Floor ``now`` to its UTC slot: two runs in the same 5 minutes share one key."""
    if every_minutes <= 0:
        raise ValueError(f"every_minutes must be positive, got {every_minutes}")
    seconds = int(_utc(now).timestamp())
    return datetime.fromtimestamp(seconds - seconds % (every_minutes * 60), tz=UTC)


@dataclass(frozen=True)
class IngestResult:
    path: Path
    written: bool
    records: int = 0
    quarantined: int = 0
    categories: dict[str, int] = field(default_factory=dict)  # records kept per category
    skipped_reason: str | None = None
    breaker: dict = field(default_factory=dict)
    quarantine_path: Path | None = None

    def as_metadata(self) -> dict:
        return {
            "path": str(self.path),
            "written": self.written,
            "records": self.records,
            "quarantined": self.quarantined,
            "categories": dict(self.categories),
            "skipped_reason": self.skipped_reason,
            "breaker": dict(self.breaker),
            "quarantine_path": str(self.quarantine_path) if self.quarantine_path else None,
        }


def ingest_poll(
    lake: Lake,
    client: PollingClient,
    league: str,
    poll_time: datetime,
    categories: tuple[str, ...] = DEFAULT_CATEGORIES,
) -> IngestResult:
    """Poll once and store it under ``poll_time``'s key. A poll that fails or is not a JSON list raises
    and writes nothing; an existing snapshot for this key is never fetched again or replaced.

    Raises ``SchemaDriftError`` (after quarantining the records) when no record of the poll validates, and
    ``InvalidLeagueNameError`` before any request for a league name that is not safe as a path.
    """
    poll_time = _utc(poll_time)
    path = snapshot_path(lake, league, poll_time)  # checks the league name before anything is fetched
    if path.exists():
        return IngestResult(
            path,
            written=False,
            skipped_reason=f"a snapshot for {poll_time.isoformat()} exists",
            breaker=client.breaker_status(),
        )

    drift: SchemaDriftError | None = None
    try:
        polled = client.poll(league, categories)
    except SchemaDriftError as exc:  # PoeWatchClient checks inside its breaker, so the poll counted as failed
        polled, drift = exc.polled, exc
    snapshots, quarantined, per_category = [], [], {}
    for category, records in polled:
        good, bad = validate_poll(records, league=league, category=category, polled_at=poll_time)
        snapshots.append(good)
        quarantined.append(bad)
        per_category[category] = good.height
    snapshot = pl.concat(snapshots) if snapshots else pl.DataFrame(schema=SNAPSHOT_SCHEMA)
    quarantine = pl.concat(quarantined) if quarantined else pl.DataFrame(schema=QUARANTINE_SCHEMA)
    if drift is None and snapshot.height == 0 and quarantine.height:
        drift = schema_drift(polled, league)  # a client that does not check (e.g. bodies fetched beforehand)

    q_path = None
    if quarantine.height:
        # Before the snapshot: if the run dies in between, the re-run still stores the bad records' file.
        q_path = quarantine_path(lake, league, poll_time)
        write_parquet_once(quarantine, q_path)
    if drift is not None:
        raise drift.quarantined_in(q_path)
    written = write_parquet_once(snapshot, path)
    return IngestResult(
        path,
        written=written,
        records=snapshot.height if written else 0,
        quarantined=quarantine.height,
        categories=per_category,
        skipped_reason=None if written else "another run stored this poll time first",
        breaker=client.breaker_status(),
        quarantine_path=q_path,
    )


def _league_of(path: Path) -> str | None:
    for part in path.parts:
        if part.startswith("league="):
            return part[len("league=") :]
    return None


def read_snapshots(lake: Lake, leagues: list[str] | tuple[str, ...] | None = None) -> pl.DataFrame:
    """Every stored poe.watch snapshot (dotfiles such as in-flight temp files are ignored)."""
    files = lake.parquet_files(lake.poe_watch_raw)
    if leagues is not None:
        wanted = set(leagues)
        files = [f for f in files if _league_of(f.relative_to(lake.poe_watch_raw)) in wanted]
    if not files:
        return pl.DataFrame(schema=SNAPSHOT_SCHEMA)
    # The league lives in the rows; hive columns would only duplicate it.
    frame = pl.scan_parquet(files, hive_partitioning=False).select(list(SNAPSHOT_SCHEMA)).collect()
    return frame.cast(dict(SNAPSHOT_SCHEMA))

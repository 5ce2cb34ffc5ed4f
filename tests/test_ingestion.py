"""One poll into the lake: idempotent per slot, quarantine beside it, atomic under SIGKILL and races."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pytest

from poe_pipeline.ingestion import (
    ingest_poll,
    poll_slot,
    quarantine_path,
    read_snapshots,
    snapshot_path,
)
from poe_pipeline.lake import Lake
from poe_pipeline.prices import daily_close_from_snapshots
from poe_pipeline.sources.poe_watch import (
    QUARANTINE_SCHEMA,
    SNAPSHOT_SCHEMA,
    CircuitOpenError,
    PoeWatchClient,
    PollFormatError,
    SchemaDriftError,
)
from poe_pipeline.sources.replay import ReplayServer

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"
LEAGUE = "Kalandra"
SLOT = datetime(2022, 10, 8, 12, 5, tzinfo=UTC)


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    return Lake(tmp_path / "lake")


@pytest.fixture
def replay():
    with ReplayServer(SAMPLE, LEAGUE, speed=0, start_day=50) as server:
        yield server


def client_for(replay: ReplayServer, **kw) -> PoeWatchClient:
    opts = dict(min_interval_s=0.0, backoff_base_s=0.001, backoff_max_s=0.01)
    opts.update(kw)
    return PoeWatchClient(replay.url, **opts)


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


# --- keys and paths ----------------------------------------------------------------------------


def test_poll_slot_floors_to_five_minutes_in_utc():
    assert poll_slot(datetime(2022, 10, 8, 12, 9, 59, 999, tzinfo=UTC)) == SLOT
    assert poll_slot(datetime(2022, 10, 8, 14, 5, tzinfo=timezone(timedelta(hours=2)))) == SLOT
    assert poll_slot(SLOT) == SLOT and poll_slot(SLOT + timedelta(minutes=5)) == SLOT + timedelta(minutes=5)
    with pytest.raises(ValueError, match="no time zone"):
        poll_slot(datetime(2022, 10, 8, 12, 7))


def test_paths(lake):
    assert snapshot_path(lake, LEAGUE, SLOT) == (
        lake.poe_watch_raw / "league=Kalandra" / "date=2022-10-08" / "poll-20221008T120500Z.parquet"
    )
    assert quarantine_path(lake, LEAGUE, SLOT) == (
        lake.quarantine
        / "poe_watch"
        / "league=Kalandra"
        / "date=2022-10-08"
        / "poll-20221008T120500Z.parquet"
    )


# --- one poll ----------------------------------------------------------------------------------


def test_ingest_writes_once_per_slot(lake, replay):
    client = client_for(replay)
    first = ingest_poll(lake, client, LEAGUE, SLOT)
    assert first.written and first.path == snapshot_path(lake, LEAGUE, SLOT)
    assert first.quarantined == 0 and first.quarantine_path is None
    assert set(first.categories) == {"currency", "fragment"} and first.records == sum(
        first.categories.values()
    )
    assert first.breaker["state"] == "closed"

    requests_before = replay.request_count()
    again = ingest_poll(
        lake, client, LEAGUE, poll_slot(SLOT + timedelta(minutes=3))
    )  # a later run, same slot
    assert not again.written and "exists" in again.skipped_reason
    assert replay.request_count() == requests_before  # skipped without fetching
    assert all_files(lake.root) == [first.path]

    stored = pl.read_parquet(first.path)
    assert stored.schema == SNAPSHOT_SCHEMA and stored.height == first.records
    divine = stored.filter(pl.col("currency") == "Divine Orb")
    assert 100 <= divine["mean"][0] <= 300 and divine["polled_at"][0] == SLOT

    nxt = ingest_poll(lake, client, LEAGUE, SLOT + timedelta(minutes=5))
    assert nxt.written
    snapshots = read_snapshots(lake)
    assert snapshots.schema == SNAPSHOT_SCHEMA and snapshots.height == first.records + nxt.records
    assert read_snapshots(lake, [LEAGUE]).height == snapshots.height
    assert read_snapshots(lake, ["Sanctum"]).height == 0
    close = daily_close_from_snapshots(snapshots)
    assert close.filter(pl.col("currency") == "Divine Orb")["observations"].to_list() == [2]


def test_quarantine_file(lake, replay):
    replay.inject("missing")  # consumed by the currency request: every third record loses 'mean'
    result = ingest_poll(lake, client_for(replay), LEAGUE, SLOT)
    assert result.written and result.quarantined > 0
    q = pl.read_parquet(quarantine_path(lake, LEAGUE, SLOT))
    assert result.quarantine_path == quarantine_path(lake, LEAGUE, SLOT)
    assert q.schema == QUARANTINE_SCHEMA and q.height == result.quarantined
    assert set(q["reason"]) == {"missing field 'mean'"} and set(q["category"]) == {"currency"}
    assert (
        set(q["league"]) == {LEAGUE} and set(q["source"]) == {"poe_watch"} and set(q["polled_at"]) == {SLOT}
    )
    kept = pl.read_parquet(result.path)
    quarantined_ids = {json.loads(r)["id"] for r in q["record_json"]}
    assert quarantined_ids.isdisjoint(set(kept["id"]))
    served = len(replay.data.items(50, "currency"))
    assert kept.filter(pl.col("category") == "currency").height + q.height == served


def test_all_records_drifted_fails_and_keeps_the_records(lake, replay):
    # Schema drift fails the run (tests/faults/test_live_api.py covers the breaker); the records are quarantined.
    replay.inject("drift", "drift")
    with pytest.raises(SchemaDriftError, match="schema drift") as err:
        ingest_poll(lake, client_for(replay), LEAGUE, SLOT)
    assert not snapshot_path(lake, LEAGUE, SLOT).exists()  # the slot stays free for a re-run
    assert err.value.quarantine_path == quarantine_path(lake, LEAGUE, SLOT)
    assert pl.read_parquet(err.value.quarantine_path).height > 100


@pytest.mark.parametrize("fault", ["malformed", "truncated"])
def test_bad_poll_writes_nothing(lake, replay, fault):
    replay.inject(fault)
    with pytest.raises(PollFormatError, match="the poll was not stored"):
        ingest_poll(lake, client_for(replay), LEAGUE, SLOT)
    assert all_files(lake.root) == []
    assert ingest_poll(lake, client_for(replay), LEAGUE, SLOT).written  # the slot is still free


def test_bad_fragment_poll_discards_the_good_currency_half(lake, replay):
    replay.inject("extra", "truncated")  # the currency request passes, the fragment request is cut
    with pytest.raises(PollFormatError, match="category=fragment"):
        ingest_poll(lake, client_for(replay), LEAGUE, SLOT)
    assert replay.request_count("/get") == 2
    assert all_files(lake.root) == []


def test_open_breaker_writes_nothing(lake, replay, tmp_path):
    client = client_for(replay, max_retries=0, breaker_state_path=lake.state / "poe_watch_breaker.json")
    replay.inject(*["500"] * 5)
    for minute in range(5):
        with pytest.raises(Exception, match="HTTP 500"):
            ingest_poll(lake, client, LEAGUE, SLOT + timedelta(minutes=5 * minute))
    with pytest.raises(CircuitOpenError):
        ingest_poll(lake, client, LEAGUE, SLOT + timedelta(minutes=25))
    assert [p.name for p in all_files(lake.root)] == ["poe_watch_breaker.json"]


def test_readers_ignore_dotfiles(lake, replay):
    result = ingest_poll(lake, client_for(replay), LEAGUE, SLOT)
    junk = result.path.parent / f".{result.path.name}.abc123.tmp"
    junk.write_bytes(b"PAR1 half a file")
    (result.path.parent / ".hidden.parquet").write_bytes(b"not parquet")
    assert read_snapshots(lake).height == result.records


def test_read_snapshots_empty(lake):
    empty = read_snapshots(lake)
    assert empty.height == 0 and empty.schema == SNAPSHOT_SCHEMA


# --- crash and race safety with real processes --------------------------------------------------

WRITER = r"""
import sys
from datetime import UTC, datetime, timedelta
import polars as pl
from poe_pipeline.ingestion import snapshot_path
from poe_pipeline.lake import Lake, write_parquet_once
lake, source, copies = Lake(sys.argv[1]), pl.read_parquet(sys.argv[2]), int(sys.argv[3])
big = pl.concat([source] * copies)
t0 = datetime(2022, 10, 8, tzinfo=UTC)
for i in range(100_000):
    t = t0 + timedelta(minutes=5 * i)
    frame = big.with_columns(pl.lit(t).cast(big.schema["polled_at"]).alias("polled_at"))
    print(f"writing {i}", flush=True)
    write_parquet_once(frame, snapshot_path(lake, "Kalandra", t))
    print(f"wrote {i}", flush=True)
"""


def _kill_mid_write(lake: Lake, source: Path, copies: int, after: int) -> int:
    """Run WRITER, SIGKILL it during write number ``after`` (timed from the earlier writes)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(lake.root), str(source), str(copies)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    durations, started = [], 0.0
    try:
        for line in proc.stdout:
            kind, i = line.split()
            if kind == "writing":
                started = time.monotonic()
                if int(i) == after:
                    time.sleep(0.5 * sum(durations) / len(durations))  # the middle of a typical write
                    proc.send_signal(signal.SIGKILL)
                    break
            else:
                durations.append(time.monotonic() - started)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return after


def test_sigkill_mid_write_leaves_only_whole_files(lake, replay, tmp_path):
    source = tmp_path / "one_poll.parquet"
    result = ingest_poll(Lake(tmp_path / "seed"), client_for(replay), LEAGUE, SLOT)
    pl.read_parquet(result.path).write_parquet(source)
    rows = pl.read_parquet(source).height * 1500

    caught_mid_write = False
    for attempt in range(4):  # the kill is timed; retry until one lands inside a write
        target = Lake(tmp_path / f"lake{attempt}")
        after = _kill_mid_write(target, source, copies=1500, after=3)
        visible = target.parquet_files(target.poe_watch_raw)
        hidden = [p for p in all_files(target.poe_watch_raw) if p.name.startswith(".")]
        # Earlier snapshots are intact; the one being written is either whole or invisible.
        assert after <= len(visible) <= after + 1
        for path in visible:
            frame = pl.read_parquet(path)
            assert frame.height == rows and frame.schema == SNAPSHOT_SCHEMA
        assert all(p.name.endswith(".tmp") for p in hidden)
        assert all(p in visible or p.name.startswith(".") for p in all_files(target.poe_watch_raw))
        assert read_snapshots(target).height == rows * len(visible)
        if hidden and len(visible) == after:
            caught_mid_write = True
            break
    assert caught_mid_write, "the SIGKILL never landed inside a write; the test proved nothing"


RACER = r"""
import json, sys, time
from datetime import datetime
from pathlib import Path
from poe_pipeline.ingestion import ingest_poll
from poe_pipeline.lake import Lake
from poe_pipeline.sources.poe_watch import PoeWatchClient
lake, url, go, slot = Lake(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), datetime.fromisoformat(sys.argv[4])
client = PoeWatchClient(url, min_interval_s=0.0)
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
result = ingest_poll(lake, client, "Kalandra", slot)
print(json.dumps({"written": result.written, "records": result.records}), flush=True)
"""


def test_concurrent_runs_of_one_slot_store_one_snapshot(lake, replay, tmp_path):
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(lake.root), replay.url, str(go), SLOT.isoformat()],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready"
        go.touch()  # all start together
        outputs = [json.loads(proc.communicate(timeout=60)[0]) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [0, 0, 0]
    winners = [o for o in outputs if o["written"]]
    assert len(winners) == 1, outputs
    files = all_files(lake.root)
    assert files == [snapshot_path(lake, LEAGUE, SLOT)]  # one file, no temp leftovers
    assert pl.read_parquet(files[0]).height == winners[0]["records"] > 100

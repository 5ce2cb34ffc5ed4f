"""Damaged files in the lake: a derived Parquet file cut short is detected and rebuilt (and named when it is read
before that), a warehouse.duckdb that is not a database is set aside and rebuilt, and an analyst who holds the
warehouse read-write from another process only delays the views' refresh. Real files, real DuckDB processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

import duckdb
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from conftest import REPO, SAMPLE
from poe_pipeline.features import build_features, feature_path, read_features, update_features
from poe_pipeline.history import import_dumps
from poe_pipeline.ingestion import ingest_poll
from poe_pipeline.lake import Lake, UnreadableFileError
from poe_pipeline.leagues import league_calendar
from poe_pipeline.prices import (
    daily_from_dump_rows,
    daily_prices_path,
    merge_daily_prices,
    read_daily_prices,
    refresh_daily_prices,
)
from poe_pipeline.sources.poe_ninja import read_dump
from poe_pipeline.sources.poe_watch import PoeWatchClient
from poe_pipeline.sources.replay import ReplayServer
from poe_pipeline.warehouse import WarehouseLockedError, publish_views, query, sync_views

LEAGUES = ("Sentinel", "Archnemesis")


@cache
def real_prices() -> pl.DataFrame:
    return merge_daily_prices(daily_from_dump_rows(pl.concat(
        [read_dump(SAMPLE / f"{league}.currency.csv.gz") for league in LEAGUES])))


def damage(path: Path, how: str) -> bytes:
    """Damage ``path`` in place; returns the bytes it now holds."""
    data = path.read_bytes()
    if how == "cut in half":
        damaged = data[: len(data) // 2]
    elif how == "overwritten":
        damaged = os.urandom(len(data))
    elif how == "empty":
        damaged = b""
    else:
        raise ValueError(how)
    path.write_bytes(damaged)
    return damaged


# --- a feature file cut short -------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["cut in half", "overwritten", "empty"])
def test_a_damaged_feature_file_is_named_then_rebuilt(lake, how):
    prices = real_prices()
    calendar = league_calendar(prices)
    assert sorted(update_features(prices, calendar, lake)) == sorted(feature_path(lake, lg) for lg in LEAGUES)
    expected = build_features(prices, calendar).filter(pl.col("league") == "Sentinel")
    bad, other = feature_path(lake, "Sentinel"), feature_path(lake, "Archnemesis")
    other_before = (other.stat().st_mtime_ns, other.read_bytes())
    damage(bad, how)

    # reading it before the rebuild names the file and the fix (polars alone names neither)
    for leagues in (None, ["Sentinel"]):
        with pytest.raises(UnreadableFileError) as err:
            read_features(lake, leagues)
        assert str(err.value).startswith(f"{bad} cannot be read (")
        assert "materialize features again: update_features rebuilds a damaged file" in str(err.value)

    # the inputs did not change, yet the file is rebuilt: only that league's
    assert update_features(prices, calendar, lake) == [bad]
    assert (other.stat().st_mtime_ns, other.read_bytes()) == other_before
    assert_frame_equal(read_features(lake, ["Sentinel"]), expected, check_exact=True)
    assert update_features(prices, calendar, lake) == []  # and then it is up to date


def test_unreadable_feature_fingerprints_rebuild_instead_of_failing(lake):
    prices = real_prices()
    calendar = league_calendar(prices)
    update_features(prices, calendar, lake)
    state = lake.state / "features_fingerprints.json"
    state.write_bytes(state.read_bytes()[:20])  # cut short
    assert len(update_features(prices, calendar, lake)) == len(LEAGUES)
    assert update_features(prices, calendar, lake) == []


# --- a daily_prices file cut short --------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["cut in half", "overwritten"])
def test_a_damaged_daily_prices_file_is_named_then_rewritten(lake, how):
    import_dumps(lake, [SAMPLE / f"{league}.currency.csv.gz" for league in LEAGUES])
    written = refresh_daily_prices(lake)
    assert sorted(written) == sorted(LEAGUES)
    before = read_daily_prices(lake)
    path = daily_prices_path(lake, "Archnemesis")
    damage(path, how)

    with pytest.raises(UnreadableFileError) as err:
        read_daily_prices(lake)
    assert str(err.value).startswith(f"{path} cannot be read (")
    assert "refresh_daily_prices rewrites it from the raw data" in str(err.value)

    assert refresh_daily_prices(lake) == {"Archnemesis": written["Archnemesis"]}
    assert read_daily_prices(lake).equals(before)
    assert refresh_daily_prices(lake) == {}


# --- warehouse.duckdb: corrupt, or held read-write by an analyst ---------------------------------------------------


@pytest.fixture
def filled_lake(lake) -> Lake:
    import_dumps(lake, [SAMPLE / "Sentinel.currency.csv.gz"])
    refresh_daily_prices(lake)
    sync_views(lake)
    return lake


def daily_rows(lake: Lake) -> int:
    return query(lake, "SELECT count(*) AS n FROM daily_prices")["n"][0]


def set_aside(lake: Lake) -> list[Path]:
    return sorted(p for p in lake.root.glob("warehouse.duckdb.corrupt-*") if p.suffix != ".wal")


def corrupt_warehouse(path: Path, how: str) -> bytes:
    data = path.read_bytes()
    if how == "random bytes":
        damaged = os.urandom(64 * 1024)
    elif how == "cut in half":
        damaged = data[: len(data) // 2]
    elif how == "checksum":  # a flipped block after the headers: DuckDB reports a corrupt database file
        damaged = data[:12288 + 64] + bytes(b ^ 0xFF for b in data[12288 + 64:12288 + 4096]) + data[12288 + 4096:]
    else:
        raise ValueError(how)
    path.write_bytes(damaged)
    return damaged


def read_directly(path: Path) -> None:
    con = duckdb.connect(str(path), read_only=True)
    try:
        con.execute("SELECT * FROM daily_prices").fetchall()
    finally:
        con.close()


@pytest.mark.parametrize("how", ["random bytes", "cut in half", "checksum"])
def test_a_corrupt_warehouse_is_set_aside_and_rebuilt_from_the_lake(filled_lake, how):
    lake = filled_lake
    expected = read_daily_prices(lake).height
    views_before = sync_views(lake)
    damaged = corrupt_warehouse(lake.warehouse, how)
    wal = lake.warehouse.with_name("warehouse.duckdb.wal")
    wal.write_bytes(b"a log that belongs to the corrupt file")
    with pytest.raises(duckdb.Error):  # DuckDB itself cannot read it
        read_directly(lake.warehouse)

    # a reader is not blocked meanwhile: the same views, straight over the lake
    assert daily_rows(lake) == expected

    outcome = publish_views(lake)
    [moved] = set_aside(lake)
    assert re.fullmatch(r"warehouse\.duckdb\.corrupt-\d{8}T\d{6}Z", moved.name)
    assert moved.read_bytes() == damaged  # kept exactly as it was, never deleted
    assert moved.with_name(moved.name + ".wal").read_bytes() == b"a log that belongs to the corrupt file"
    assert not wal.exists()
    assert outcome.refreshed and outcome.moved_aside == moved and outcome.views == views_before
    assert outcome.note.startswith(f"{lake.warehouse} was not a valid DuckDB database: moved it aside to {moved}")
    with duckdb.connect(str(lake.warehouse), read_only=True) as con:  # a real database again, with every view
        assert con.execute("SELECT count(*) FROM daily_prices").fetchone()[0] == expected

    again = publish_views(lake)  # the next run: nothing to report
    assert again.note is None and again.refreshed and set_aside(lake) == [moved]


HOLD_READ_WRITE = r"""
import sys, time
import duckdb
con = duckdb.connect(sys.argv[1])  # read-write: the analyst holds the file's write lock
con.execute("SELECT count(*) FROM duckdb_views()").fetchall()
print("ready", flush=True)
seconds = float(sys.argv[2])
if seconds < 0:
    sys.stdin.readline()  # until the test lets go
else:
    time.sleep(seconds)
con.close()
"""


def hold(path: Path, seconds: float = -1) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_READ_WRITE, str(path), str(seconds)],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_an_analyst_holding_the_warehouse_read_write_does_not_fail_the_run(filled_lake):
    lake = filled_lake
    before = lake.warehouse.read_bytes()
    analyst = hold(lake.warehouse)
    try:
        # ingestion runs meanwhile: a poll lands, and its view is new
        with ReplayServer(SAMPLE, "Sentinel", speed=0, start_day=40) as replay:
            polled = ingest_poll(lake, PoeWatchClient(replay.url, min_interval_s=0.0), "Sentinel",
                                 datetime(2022, 6, 20, 12, tzinfo=UTC))
        assert polled.written

        outcome = publish_views(lake, lock_wait_s=0.3)
        assert not outcome.refreshed and outcome.views == [] and outcome.moved_aside is None
        assert outcome.note.startswith(f"Warehouse views not refreshed: {lake.warehouse} is held read-write by "
                                       f"another process (PID {analyst.pid}, ")
        assert f"duckdb -readonly {lake.warehouse}" in outcome.note
        with pytest.raises(WarehouseLockedError) as err:  # sync_views still raises, as a duckdb.IOException
            sync_views(lake)
        assert isinstance(err.value, duckdb.IOException)

        # a lock is not corruption: the file is untouched, nothing set aside
        assert set_aside(lake) == [] and lake.warehouse.read_bytes() == before
        # and the pipeline's own queries still answer, new view included
        assert daily_rows(lake) == read_daily_prices(lake).height
        assert query(lake, "SELECT count(*) AS n FROM price_snapshots")["n"][0] == polled.records
    finally:
        analyst.communicate("\n", timeout=30)
    assert analyst.returncode == 0

    outcome = publish_views(lake)  # the analyst let go: the next run refreshes the views
    assert outcome.refreshed and outcome.note is None and "price_snapshots" in outcome.views
    with duckdb.connect(str(lake.warehouse), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM price_snapshots").fetchone()[0] == polled.records


def test_a_lock_held_for_a_moment_is_waited_out(filled_lake):
    lake = filled_lake
    (lake.root / "model_metrics").mkdir()
    pl.DataFrame({"currency": ["Divine Orb"], "horizon_days": [1]}).write_parquet(
        lake.root / "model_metrics" / "part.parquet")  # a new view to create
    started = time.monotonic()
    other_run = hold(lake.warehouse, seconds=0.5)
    outcome = publish_views(lake, lock_wait_s=20)
    other_run.wait(timeout=30)
    assert outcome.refreshed and outcome.note is None and "model_metrics" in outcome.views
    assert time.monotonic() - started < 20

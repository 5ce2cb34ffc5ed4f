"""Path traversal: a league name from outside (poe.watch ``/leagues``, ``POE_LEAGUE``, a dump's file name) must
never place a file outside the lake, and every real league name must keep working.

Each lake here sits two levels below tmp_path, so that even if a guard failed, ``../../../../outside`` would land
inside tmp_path (and the test sees it there) rather than anywhere else on the machine."""

from __future__ import annotations

import csv
import shutil
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from conftest import EVENT_DUMPS, REPO, SAMPLE
from poe_pipeline.features import feature_path, read_features, update_features
from poe_pipeline.history import (
    dump_quarantine_path,
    find_dumps,
    import_dumps,
    raw_dump_path,
    superseded_dump_path,
)
from poe_pipeline.ingestion import ingest_poll, quarantine_path, read_snapshots, snapshot_path
from poe_pipeline.lake import Lake, UnsafePathError, hive_dir
from poe_pipeline.leagues import league_calendar
from poe_pipeline.names import InvalidLeagueNameError, check_league_name
from poe_pipeline.prices import daily_prices_path, read_daily_prices, refresh_daily_prices
from poe_pipeline.sources.poe_watch import NO_END_DATE, NoActiveLeagueError, PoeWatchClient
from poe_pipeline.sources.replay import ReplayServer

SLOT = datetime(2019, 5, 20, 12, 0, tzinfo=UTC)
SHA = "0123456789abcdef" * 4

PATH_BUILDERS = {
    "snapshot_path": lambda lake, league: snapshot_path(lake, league, SLOT),
    "quarantine_path": lambda lake, league: quarantine_path(lake, league, SLOT),
    "raw_dump_path": lambda lake, league: raw_dump_path(lake, league, "currency", SHA),
    "superseded_dump_path": lambda lake, league: superseded_dump_path(lake, league, "currency", SHA),
    "dump_quarantine_path": lambda lake, league: dump_quarantine_path(lake, league, "currency", SHA),
    "feature_path": feature_path,
    "daily_prices_path": daily_prices_path,
}

HOSTILE = [
    "../../../../outside",
    "..",
    ".",
    ".hidden",
    "Sanctum/../../../../outside",
    "a/b",
    "/etc/cron.d",
    "..\\..\\outside",
    "Sanctum\n",
    "Sanc\x00tum",
    " Sanctum",
    "Sanctum.",
    "Foo..Bar",
    "league=x",
    "x" * 65,
    "",
]


def _real_league_names() -> list[str]:
    with (REPO / "poe_pipeline" / "leagues.csv").open(newline="", encoding="utf-8") as fh:
        names = {row["league"] for row in csv.DictReader(fh)}
    for folder in (SAMPLE, EVENT_DUMPS):
        if folder.is_dir():
            names |= {p.name.split(".currency.")[0] for p in folder.iterdir() if ".currency." in p.name}
    names |= {"Standard", "Hardcore", "SSF Hardcore", "Settlers of Kalguur", "Hardcore Settlers", "Ancestor's Trial"}
    return sorted(names)


@pytest.fixture
def deep_lake(tmp_path: Path) -> Lake:
    return Lake(tmp_path / "home" / "user" / "lake")


def no_file_outside(tmp_path: Path, lake: Lake) -> bool:
    return all(p.resolve().is_relative_to(lake.root.resolve()) for p in tmp_path.rglob("*") if p.is_file())


# --- the names ----------------------------------------------------------------------------------------------------


def test_every_real_league_name_is_a_path_inside_the_lake(deep_lake):
    names = _real_league_names()
    assert {"Incursion Event HC (IRE002)", "Synthesis Event (SRE001)", "Sanctum", "Kalandra"} <= set(names)
    for league in names:
        assert check_league_name(league) == league
        for builder in PATH_BUILDERS.values():
            path = builder(deep_lake, league)
            assert f"league={league}" in path.parts and path.resolve().is_relative_to(deep_lake.root.resolve())


@pytest.mark.parametrize("name", HOSTILE)
@pytest.mark.parametrize("builder", list(PATH_BUILDERS))
def test_a_hostile_name_is_refused_by_every_path_builder(deep_lake, name, builder):
    with pytest.raises(InvalidLeagueNameError) as err:
        PATH_BUILDERS[builder](deep_lake, name)
    message = str(err.value)
    assert message.startswith(f"Invalid league name {name[:80]!r}")  # names the input...
    assert "pass the league's real name (POE_LEAGUE, --league" in message  # ...and the fix
    assert "\n" not in message


def test_the_lake_refuses_a_path_that_resolves_outside_it(deep_lake):
    assert deep_lake.inside(deep_lake.root / "raw" / "x.parquet") == deep_lake.root / "raw" / "x.parquet"
    with pytest.raises(UnsafePathError, match="outside the lake"):
        deep_lake.inside(deep_lake.root / "raw" / ".." / ".." / "outside")
    with pytest.raises(UnsafePathError, match="outside the lake"):
        deep_lake.league_path(deep_lake.root / ".." / "elsewhere", "Sanctum")  # a good name in a bad place
    with pytest.raises(UnsafePathError, match="date='../x' is not a single directory name"):
        hive_dir(deep_lake.root, date="../x")


# --- names from outside, end to end --------------------------------------------------------------------------------


def test_a_hostile_active_league_from_poe_watch_writes_nothing(tmp_path, deep_lake, httpserver):
    hostile = "../../../../outside"
    httpserver.expect_request("/leagues").respond_with_json(
        [
            {"name": "Standard", "start_date": "2013-01-23T21:00:00Z", "end_date": NO_END_DATE},
            {"name": hostile, "start_date": "2019-03-08T20:00:00Z", "end_date": NO_END_DATE},
        ]
    )
    httpserver.expect_request("/get").respond_with_json([{"id": 1, "name": "Divine Orb", "mean": 150.0}])
    client = PoeWatchClient(httpserver.url_for("").rstrip("/"), min_interval_s=0.0,
                            breaker_state_path=deep_lake.poe_watch_breaker_state)
    with pytest.raises(NoActiveLeagueError, match=r"Invalid league name '\.\./\.\./\.\./\.\./outside' from poe\.watch "
                                                  r"/leagues.*POE_LEAGUE"):
        client.active_challenge_league(now=datetime(2019, 5, 1, tzinfo=UTC))

    # the same name through POE_LEAGUE (or a caller that skipped the check) is refused before any request
    with pytest.raises(InvalidLeagueNameError):
        ingest_poll(deep_lake, client, hostile, SLOT)
    assert not [r for r, _ in httpserver.log if r.path == "/get"]
    assert not list(tmp_path.rglob("outside")) and not list(tmp_path.rglob("*.parquet"))
    assert no_file_outside(tmp_path, deep_lake)


def test_a_dump_whose_name_is_not_a_league_is_rejected_and_the_others_import(tmp_path, deep_lake):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(SAMPLE / "Sentinel.currency.csv.gz", inbox)
    (inbox / "...currency.csv").write_text("League;Date;Get;Pay;Value;Confidence\n..;2022-05-20;Divine Orb;Chaos Orb;"
                                           "150;High\n")
    report = import_dumps(deep_lake, find_dumps([inbox]))
    assert report.imported == ["Sentinel.currency.csv.gz"]
    assert report.rejected["...currency.csv"].startswith(
        "Malformed poe.ninja dump ...currency.csv: Invalid league name '..'"
    )
    assert no_file_outside(tmp_path / "home", deep_lake)
    assert not (deep_lake.poe_ninja_raw / "league=..").exists()


def test_event_leagues_with_spaces_and_parentheses_work_end_to_end(tmp_path, deep_lake):
    # a live poll of an event league, served by the replay server from its real dump
    synthesis = "Synthesis Event (SRE001)"
    with ReplayServer(EVENT_DUMPS, synthesis, speed=0, start_day=10) as replay:
        client = PoeWatchClient(replay.url, min_interval_s=0.0)
        assert client.active_challenge_league(now=datetime(2019, 5, 20, tzinfo=UTC)) == synthesis
        result = ingest_poll(deep_lake, client, synthesis, SLOT)
    assert result.written and result.records > 10
    assert result.path.parent.parent.name == f"league={synthesis}"
    assert set(read_snapshots(deep_lake, [synthesis])["league"]) == {synthesis}

    # a dump import, daily prices and features of an HC event league
    incursion = "Incursion Event HC (IRE002)"
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(EVENT_DUMPS / f"{incursion}.currency.csv.gz", inbox)
    assert import_dumps(deep_lake, find_dumps([inbox])).imported == [f"{incursion}.currency.csv.gz"]
    assert incursion in refresh_daily_prices(deep_lake)
    prices = read_daily_prices(deep_lake).filter(pl.col("league") == incursion)
    assert daily_prices_path(deep_lake, incursion).is_file() and prices.height > 100
    written = update_features(prices, league_calendar(prices), deep_lake)
    assert written == [feature_path(deep_lake, incursion)]
    assert set(read_features(deep_lake, [incursion])["league"]) == {incursion}
    assert no_file_outside(tmp_path / "home", deep_lake)

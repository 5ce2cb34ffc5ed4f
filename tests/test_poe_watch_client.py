"""The poe.watch client against real HTTP on loopback: the replay server (real Kalandra prices) and
pytest-httpserver for responses the replay never sends. Retry waits go to a recording ``sleep``."""

from __future__ import annotations

import json
import math
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
import requests

from conftest import Sleeps
from poe_pipeline.sources.poe_ninja import chaos_prices_from_dump_rows, read_dump
from poe_pipeline.sources.poe_watch import (
    QUARANTINE_SCHEMA,
    SNAPSHOT_SCHEMA,
    CircuitOpenError,
    NoActiveLeagueError,
    PoeWatchClient,
    PoeWatchHTTPError,
    PoeWatchUnavailableError,
    PollFormatError,
    parse_retry_after,
    validate_poll,
)
from poe_pipeline.sources.replay import Fault, ReplayServer, UnknownLeagueError, category_of

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
LEAGUE = "Kalandra"
MID_DAY = 50  # 2022-10-08, well inside Kalandra's 110 days
POLLED_AT = datetime(2022, 10, 8, 12, 0, tzinfo=UTC)


@pytest.fixture
def replay():
    with ReplayServer(SAMPLE, LEAGUE, speed=0, start_day=MID_DAY, timeout_sleep_s=2.0) as server:
        yield server


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


def make_client(url: str, sleeps: Sleeps | None = None, **kw) -> PoeWatchClient:
    opts = dict(min_interval_s=0.01, backoff_base_s=0.001, backoff_max_s=0.01, read_timeout_s=1.0)
    opts.update(kw)
    return PoeWatchClient(url, sleep=sleeps if sleeps is not None else time.sleep, **opts)


def currency_poll(client: PoeWatchClient) -> list:
    return client.get_items(LEAGUE, "currency")


# --- real prices -------------------------------------------------------------------------------


def test_replay_serves_real_kalandra_prices(replay, sleeps):
    items = {r["name"]: r for r in currency_poll(make_client(replay.url, sleeps))}
    divine = items["Divine Orb"]
    assert 100 <= divine["mean"] <= 300

    day = replay.current_date()
    dump = chaos_prices_from_dump_rows(read_dump(SAMPLE / "Kalandra.currency.csv.gz"))
    on_day = dump.filter(pl.col("date") == day)
    price = dict(zip(on_day["currency"], on_day["price_chaos"], strict=True))
    assert divine["mean"] == price["Divine Orb"]
    assert divine["exalted"] == pytest.approx(price["Divine Orb"] / price["Exalted Orb"])
    assert divine["min"] <= divine["mean"] <= divine["max"]
    # The last history entry is today; the first is six league days back, read from the dump too.
    six_back = dump.filter(
        (pl.col("currency") == "Divine Orb") & (pl.col("date") == replay.data.days[MID_DAY - 6])
    )
    assert divine["history"][-1] == divine["mean"]
    assert divine["history"][0] == six_back["price_chaos"][0]
    assert {"Chaos Orb"}.isdisjoint(items)
    assert all(r["daily"] == 0 and r["category"] == "currency" for r in items.values())  # no invented volume


def test_fragments_are_served_separately(replay, sleeps):
    fragments = make_client(replay.url, sleeps).get_items(LEAGUE, "fragment")
    names = {r["name"] for r in fragments}
    assert {"Splinter of Xoph", "Mortal Hope", "Sacrifice at Dawn"} <= names
    assert "Divine Orb" not in names and category_of("Tainted Blessing") == "currency"


def test_min_interval_between_requests(replay, sleeps):
    client = make_client(replay.url, sleeps, min_interval_s=5.0)
    client.leagues()
    client.leagues()
    assert len(sleeps) == 1 and 4.0 < sleeps[0] <= 5.0


# --- retries -----------------------------------------------------------------------------------


def test_429_then_success_honours_retry_after(replay, sleeps):
    replay.inject("429")  # Retry-After: 1
    polled = make_client(replay.url, sleeps).poll(LEAGUE)
    assert [c for c, _ in polled] == ["currency", "fragment"] and polled[0][1]
    assert replay.request_count("/get") == 3
    assert max(sleeps) >= 1.0  # the jittered backoff alone is at most 0.01 s


def test_5xx_then_success(replay, sleeps):
    replay.inject("500", "503")
    items = currency_poll(make_client(replay.url, sleeps))
    assert len(items) > 50
    assert replay.request_count("/get") == 3
    assert max(sleeps) < 1.0  # backoff (and rate-limit) waits only: no Retry-After on 5xx


def test_retries_exhausted(replay, sleeps):
    replay.inject("503", "503", "503", "503")
    client = make_client(replay.url, sleeps)
    with pytest.raises(PoeWatchUnavailableError, match=r"after 4 attempt.*HTTP 503") as err:
        client.poll(LEAGUE)
    assert "/get?category=currency&league=Kalandra" in str(err.value)
    assert replay.request_count("/get") == 4  # 1 try + 3 retries, then no fragment request
    assert client.breaker_status()["fail_counter"] == 1


def test_retry_after_longer_than_we_wait_gives_up_at_once(replay, sleeps):
    replay.inject("429:3600")
    with pytest.raises(PoeWatchUnavailableError, match="HTTP 429"):
        currency_poll(make_client(replay.url, sleeps))
    assert replay.request_count("/get") == 1 and not sleeps  # no hour-long wait


def test_client_error_is_not_retried(replay, sleeps):
    client = make_client(replay.url, sleeps)
    with pytest.raises(PoeWatchHTTPError, match="HTTP 404.*Foo") as err:
        client.get_items("Foo", "currency")
    assert err.value.status == 404 and replay.request_count("/get") == 1
    with pytest.raises(PoeWatchHTTPError, match="HTTP 400"):
        client.get_items(LEAGUE, "armour")


def test_read_timeout_is_retried(replay, sleeps):
    replay.inject("timeout:2.0")
    client = make_client(replay.url, sleeps, read_timeout_s=0.2)
    assert len(currency_poll(client)) > 50
    assert replay.request_count("/get") == 2

    replay.inject("timeout:2.0", "timeout:2.0")
    with pytest.raises(PoeWatchUnavailableError, match="after 2 attempt.*[Tt]imed? ?out"):
        currency_poll(make_client(replay.url, sleeps, read_timeout_s=0.2, max_retries=1))


def test_connection_refused_is_retried_then_reported(sleeps):
    server = ReplayServer(SAMPLE, LEAGUE, speed=0)
    url = server.url
    server.stop()  # nothing listens on that port any more
    with pytest.raises(PoeWatchUnavailableError, match="after 4 attempt") as err:
        make_client(url, sleeps).leagues()
    assert isinstance(err.value.__cause__, requests.ConnectionError)


# --- bodies that are not a poll ----------------------------------------------------------------


def test_malformed_body(replay, sleeps):
    replay.inject("malformed")
    with pytest.raises(
        PollFormatError,
        match=r"category=currency&league=Kalandra returned truncated or invalid "
        r"JSON at char 0 .*text/html.*the poll was not stored",
    ):
        currency_poll(make_client(replay.url, sleeps))
    assert replay.request_count("/get") == 1  # a broken body is not retried


def test_truncated_body(replay, sleeps):
    replay.inject("truncated")
    with pytest.raises(PollFormatError, match=r"invalid JSON at char (\d+)") as err:
        currency_poll(make_client(replay.url, sleeps))
    assert int(err.value.args[0].split("at char ")[1].split()[0]) > 1000


def test_not_a_list(httpserver, sleeps):
    httpserver.expect_request("/get").respond_with_json({"error": "league is required"})
    with pytest.raises(
        PollFormatError, match="returned a JSON dict where a list was expected.*league is required"
    ):
        make_client(httpserver.url_for(""), sleeps).get_items(LEAGUE, "currency")


# --- record validation -------------------------------------------------------------------------


def test_missing_fields_go_to_quarantine(replay, sleeps):
    replay.inject("missing")
    records = currency_poll(make_client(replay.url, sleeps))
    snapshots, quarantine = validate_poll(records, league=LEAGUE, category="currency", polled_at=POLLED_AT)
    assert quarantine.height == math.ceil(len(records) / 3)
    assert snapshots.height + quarantine.height == len(records)
    assert set(quarantine["reason"]) == {"missing field 'mean'"}
    assert all("mean" not in json.loads(r) for r in quarantine["record_json"])
    assert quarantine.schema == QUARANTINE_SCHEMA and set(quarantine["source"]) == {"poe_watch"}


def test_extra_fields_are_ignored(replay, sleeps):
    client = make_client(replay.url, sleeps)
    clean = validate_poll(currency_poll(client), league=LEAGUE, category="currency", polled_at=POLLED_AT)[0]
    replay.inject("extra")
    extra_records = currency_poll(client)
    assert "replayNote" in extra_records[0]
    snapshots, quarantine = validate_poll(
        extra_records, league=LEAGUE, category="currency", polled_at=POLLED_AT
    )
    assert quarantine.height == 0
    assert snapshots.equals(clean)


def test_schema_drift_quarantines_every_record(replay, sleeps):
    replay.inject("drift")
    records = currency_poll(make_client(replay.url, sleeps))
    snapshots, quarantine = validate_poll(records, league=LEAGUE, category="currency", polled_at=POLLED_AT)
    assert snapshots.height == 0 and quarantine.height == len(records) > 50
    reason = quarantine["reason"][0]
    assert "missing field 'mean'" in reason and "price" in reason and "schema may have changed" in reason


def test_snapshot_schema_and_values(replay, sleeps):
    records = currency_poll(make_client(replay.url, sleeps))
    snapshots, _ = validate_poll(records, league=LEAGUE, category="currency", polled_at=POLLED_AT)
    assert snapshots.schema == SNAPSHOT_SCHEMA
    row = snapshots.filter(pl.col("name") == "Divine Orb").row(0, named=True)
    assert row["polled_at"] == POLLED_AT and row["currency"] == "Divine Orb" and row["league"] == LEAGUE
    assert row["history"][-1] == row["mean"]


GOOD = {"id": 7, "name": "Orb of Fusing", "mean": 0.5}


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"id": 1, "name": "Orb of Fusing"}, "missing field 'mean'"),
        ({"name": "Orb of Fusing", "mean": 1.0}, "missing field 'id'"),
        ({"id": 1, "name": "  ", "mean": 1.0}, "field 'name'"),
        (
            {"id": 1, "name": "Orb of Fusing", "mean": -2.0},
            "field 'mean': input should be greater than or equal to 0",
        ),
        (
            {"id": 1, "name": "Orb of Fusing", "mean": float("nan")},
            "field 'mean': input should be a finite number",
        ),
        ({"id": 1, "name": "Orb of Fusing", "mean": 1.0, "max": float("inf")}, "field 'max'"),
        ({"id": 1, "name": "Orb of Fusing", "mean": "1.5"}, "field 'mean': input should be a valid number"),
        ({"id": True, "name": "Orb of Fusing", "mean": 1.0}, "field 'id'"),
        ({"id": 1, "name": "Orb of Fusing", "mean": 1.0, "daily": -3}, "field 'daily'"),
        ({"id": 1, "name": "Orb of Fusing", "mean": 1.0, "history": [1.0, "x"]}, "field 'history.1'"),
        (["Orb of Fusing", 1.0], "record is a JSON list, not an object"),
        (None, "record is a JSON NoneType, not an object"),
    ],
)
def test_bad_record_is_quarantined_and_the_rest_kept(record, reason):
    snapshots, quarantine = validate_poll(
        [GOOD, record], league=LEAGUE, category="currency", polled_at=POLLED_AT
    )
    assert snapshots["name"].to_list() == ["Orb of Fusing"] and snapshots["id"].to_list() == [7]
    assert quarantine.height == 1 and reason in quarantine["reason"][0]
    assert quarantine["record_json"][0]  # the record is kept as sent


def test_validate_poll_needs_an_aware_time():
    with pytest.raises(ValueError, match="no time zone"):
        validate_poll([GOOD], league=LEAGUE, category="currency", polled_at=datetime(2022, 10, 8))


# --- the circuit breaker -----------------------------------------------------------------------


def trip(client: PoeWatchClient, replay: ReplayServer, polls: int = 5) -> None:
    replay.inject(*["500"] * polls)
    for _ in range(polls):
        with pytest.raises(PoeWatchUnavailableError):
            client.poll(LEAGUE)


def test_circuit_opens_after_five_failed_polls(replay, sleeps, tmp_path):
    client = make_client(replay.url, sleeps, max_retries=0, breaker_state_path=tmp_path / "breaker.json")
    trip(client, replay, polls=4)
    assert client.breaker_status()["state"] == "closed"
    trip(client, replay, polls=1)
    status = client.breaker_status()
    assert status["state"] == "open" and status["fail_counter"] == 5
    seen = replay.request_count()
    with pytest.raises(CircuitOpenError, match="no request was sent") as err:
        client.poll(LEAGUE)
    with pytest.raises(CircuitOpenError):
        client.active_challenge_league()
    assert replay.request_count() == seen  # the server saw nothing
    opened = datetime.fromisoformat(status["opened_at"])
    assert err.value.until == opened + timedelta(seconds=300)
    assert datetime.fromisoformat(status["retry_after"]) == err.value.until


def test_a_good_poll_resets_the_failure_count(replay, sleeps):
    client = make_client(replay.url, sleeps, max_retries=0)
    trip(client, replay, polls=4)
    client.poll(LEAGUE)
    assert client.breaker_status()["fail_counter"] == 0
    trip(client, replay, polls=4)
    assert client.breaker_status()["state"] == "closed"


def test_config_errors_do_not_trip_the_breaker(replay, sleeps):
    client = make_client(replay.url, sleeps, max_retries=0)
    for _ in range(6):
        with pytest.raises(PoeWatchHTTPError, match="404"):
            client.poll("Foo")
    assert client.breaker_status()["state"] == "closed"


def test_half_open_then_closed_after_reset_timeout(replay, sleeps, tmp_path):
    client = make_client(
        replay.url,
        sleeps,
        max_retries=0,
        breaker_reset_timeout_s=0.2,
        breaker_state_path=tmp_path / "breaker.json",
    )
    trip(client, replay)
    assert client.breaker_status()["state"] == "open"
    time.sleep(0.25)
    assert client.breaker_status()["state"] == "half-open"

    replay.inject("500")  # the trial poll fails: open again, after one request
    seen = replay.request_count()
    with pytest.raises(PoeWatchUnavailableError):
        client.poll(LEAGUE)
    assert replay.request_count() == seen + 1 and client.breaker_status()["state"] == "open"

    time.sleep(0.25)
    assert [c for c, _ in client.poll(LEAGUE)] == ["currency", "fragment"]
    status = client.breaker_status()
    assert (status["state"], status["fail_counter"], status["retry_after"]) == ("closed", 0, None)


def test_breaker_state_survives_a_new_client(replay, sleeps, tmp_path):
    path = tmp_path / "state" / "poe_watch_breaker.json"
    first = make_client(replay.url, sleeps, max_retries=0, breaker_state_path=path)
    trip(first, replay, polls=3)
    first.close()
    second = make_client(replay.url, sleeps, max_retries=0, breaker_state_path=path)  # as a new run would
    assert second.breaker_status()["fail_counter"] == 3
    trip(second, replay, polls=2)

    third = make_client(replay.url, sleeps, max_retries=0, breaker_state_path=path)
    seen = replay.request_count()
    with pytest.raises(CircuitOpenError):
        third.poll(LEAGUE)
    assert replay.request_count() == seen
    stored = json.loads(path.read_text())
    assert stored["state"] == "open" and stored["fail_counter"] == 5 and stored["opened_at"]
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temp files left


def test_unreadable_breaker_file_counts_as_closed(replay, sleeps, tmp_path):
    path = tmp_path / "breaker.json"
    path.write_text("{not json")
    client = make_client(replay.url, sleeps, breaker_state_path=path)
    assert client.breaker_status()["state"] == "closed"
    assert client.poll(LEAGUE)
    assert json.loads(path.read_text())["state"] == "closed"


# --- leagues -----------------------------------------------------------------------------------


def test_active_challenge_league_from_replay(replay, sleeps):
    assert make_client(replay.url, sleeps).active_challenge_league() == LEAGUE


def test_active_challenge_league_skips_permanent_variant_and_ended(httpserver, sleeps):
    no_end = "0001-01-01T00:00:00Z"
    httpserver.expect_request("/leagues").respond_with_json(
        [
            {"name": "Standard", "start_date": "2013-01-23T21:00:00+01:00", "end_date": no_end},
            {"name": "Hardcore", "start_date": "2013-01-23T22:00:00+01:00", "end_date": no_end},
            {"name": "Sanctum", "start_date": "2022-12-09T20:00:00Z", "end_date": "2023-04-04T20:00:00Z"},
            {"name": "Crucible", "start_date": "2023-04-07T20:00:00Z", "end_date": no_end},
            {"name": "Hardcore Crucible", "start_date": "2023-04-07T20:00:00Z", "end_date": no_end},
            {"name": "SSF Crucible", "start_date": "2023-04-07T20:00:00Z", "end_date": no_end},
            {"name": "HC SSF Crucible", "start_date": "2023-04-07T20:00:00Z", "end_date": no_end},
        ]
    )
    client = make_client(httpserver.url_for(""), sleeps)
    assert client.active_challenge_league(now=datetime(2023, 5, 1, tzinfo=UTC)) == "Crucible"


def test_no_active_challenge_league(httpserver, sleeps):
    httpserver.expect_request("/leagues").respond_with_json(
        [
            {
                "name": "Standard",
                "start_date": "2013-01-23T21:00:00+01:00",
                "end_date": "0001-01-01T00:00:00Z",
            },
            {"name": "Sanctum", "start_date": "2022-12-09T20:00:00Z", "end_date": "2023-04-04T20:00:00Z"},
        ]
    )
    with pytest.raises(NoActiveLeagueError, match="no active challenge league.*Standard, Sanctum.*--league"):
        make_client(httpserver.url_for(""), sleeps).active_challenge_league(
            now=datetime(2023, 5, 1, tzinfo=UTC)
        )


def test_parse_retry_after():
    now = datetime(2015, 10, 21, 7, 27, 0, tzinfo=UTC)
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=now) == 60.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


# --- the replay server itself ------------------------------------------------------------------


def test_replay_endpoints_and_errors(replay):
    base = replay.url
    r = requests.get(f"{base}/get", params={"category": "currency", "league": "Foo"}, timeout=5)
    assert r.status_code == 404 and "Kalandra" in r.json()["error"]
    r = requests.get(f"{base}/get", params={"category": "armour", "league": LEAGUE}, timeout=5)
    assert r.status_code == 400 and "armour" in r.json()["error"]
    leagues = requests.get(f"{base}/leagues", timeout=5).json()
    assert leagues[0] == {
        "name": LEAGUE,
        "start_date": "2022-08-19T00:00:00Z",
        "end_date": "0001-01-01T00:00:00Z",
    }

    divine = next(
        i
        for i in requests.get(
            f"{base}/get", params={"category": "currency", "league": LEAGUE}, timeout=5
        ).json()
        if i["name"] == "Divine Orb"
    )
    history = requests.get(f"{base}/history", params={"id": divine["id"], "league": LEAGUE}, timeout=5).json()
    assert history[-1] == {
        "mean": divine["mean"],
        "date": f"{replay.current_date()}T00:00:00Z",
        "id": divine["id"],
    }
    assert len(history) <= MID_DAY + 1 and history[0]["date"] == "2022-08-19T00:00:00Z"
    assert requests.get(f"{base}/history", params={"id": 1, "league": LEAGUE}, timeout=5).status_code == 404


def test_replay_faults_over_http(replay, sleeps):
    r = requests.post(f"{replay.url}/_replay/faults", json=["500", "timeout:0.5"], timeout=5)
    assert r.status_code == 200 and r.json()["queued"] == ["500", "timeout:0.5"]
    assert requests.post(f"{replay.url}/_replay/faults", json=["nope"], timeout=5).status_code == 400
    assert requests.get(f"{replay.url}/leagues", timeout=5).status_code == 500
    assert replay.queued_faults() == ["timeout:0.5"]
    with pytest.raises(ValueError, match="Unknown replay fault 'nope'.*429, 500"):
        replay.inject("nope")
    assert Fault.parse("429:0") == Fault("429", 0.0)


def test_replay_clock():
    now = [1000.0]
    with ReplayServer(SAMPLE, LEAGUE, speed=288.0, start_day=3, clock=lambda: now[0]) as server:
        assert server.current_day_index() == 3
        now[0] += 299.0
        assert server.current_day_index() == 3
        now[0] += 1.0  # 5 real minutes = one simulated day at speed 288
        assert server.current_day_index() == 4 and server.current_date() == date(2022, 8, 23)
        now[0] += 10**6
        assert server.current_day_index() == len(server.data.days) - 1  # clamped to the last day
        server.set_day(0)
        assert server.current_day_index() == 0
        with pytest.raises(ValueError, match="days 0..109"):
            server.set_day(500)
    with ReplayServer(SAMPLE, LEAGUE, speed=0, start_day=7, clock=lambda: now[0]) as frozen:
        now[0] += 10**6
        assert frozen.current_day_index() == 7


def test_replay_unknown_league_lists_known_ones():
    with pytest.raises(
        UnknownLeagueError, match=r"Unknown league 'Foo': known leagues in .* are .*Kalandra.*Sanctum"
    ):
        ReplayServer(SAMPLE, "Foo")

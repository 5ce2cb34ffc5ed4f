"""Faults of the live poe.watch API, over real HTTP on loopback (the replay server's real Kalandra prices, or
pytest-httpserver for answers the replay never gives): schema drift, two records of one currency in a poll, and a
Retry-After longer than the client waits."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import polars as pl
import pytest

from conftest import SAMPLE, Sleeps
from poe_pipeline.ingestion import ingest_poll, quarantine_path, read_snapshots, snapshot_path
from poe_pipeline.lake import Lake
from poe_pipeline.prices import daily_close_from_snapshots
from poe_pipeline.sources.poe_watch import (
    DEFAULT_CATEGORIES,
    CircuitOpenError,
    PoeWatchClient,
    PoeWatchUnavailableError,
    RetryAfterTooLongError,
    SchemaDriftError,
    validate_poll,
)
from poe_pipeline.sources.replay import ReplayServer

LEAGUE = "Kalandra"
DAY = 50  # 2022-10-08
SLOT = datetime(2022, 10, 8, 12, 5, tzinfo=UTC)


@pytest.fixture
def replay():
    with ReplayServer(SAMPLE, LEAGUE, speed=0, start_day=DAY) as server:
        yield server


def client_for(url: str, lake: Lake | None = None, sleeps: Sleeps | None = None, **kw) -> PoeWatchClient:
    opts = dict(min_interval_s=0.0, backoff_base_s=0.001, backoff_max_s=0.01, read_timeout_s=2.0)
    opts.update(kw)
    if lake is not None:
        opts["breaker_state_path"] = lake.poe_watch_breaker_state
    return PoeWatchClient(url, sleep=sleeps if sleeps is not None else Sleeps(), **opts)


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


# --- a poll where every record fails validation: schema drift -------------------------------------------------


def test_schema_drift_fails_the_poll_names_the_fields_and_keeps_every_record(lake, replay):
    replay.inject("drift", "drift")  # both categories: 'mean' renamed to 'price', plus a new 'priceSource'
    served = sum(len(replay.data.items(DAY, c)) for c in DEFAULT_CATEGORIES)
    client = client_for(replay.url, lake)
    with pytest.raises(SchemaDriftError) as err:
        ingest_poll(lake, client, LEAGUE, SLOT)
    message = str(err.value)
    assert f"schema drift: all {served} records of the 'Kalandra' poll" in message
    assert f"missing fields 'mean' ({served} records)" in message
    assert f"unknown fields 'price' ({served} records), 'priceSource' ({served} records)" in message
    assert "update PoeWatchItem" in message and "\n" not in message
    # nothing lost: every record is in the quarantine, as sent; no snapshot, so the slot stays free
    q_path = quarantine_path(lake, LEAGUE, SLOT)
    assert err.value.quarantine_path == q_path and str(q_path) in message
    quarantined = pl.read_parquet(q_path)
    assert quarantined.height == served
    assert all("price" in json.loads(r) for r in quarantined["record_json"])
    assert not snapshot_path(lake, LEAGUE, SLOT).exists()
    # it counted as one failed poll, in the breaker's file that the next run reads
    assert client.breaker_status()["fail_counter"] == 1
    assert json.loads(lake.poe_watch_breaker_state.read_text())["fail_counter"] == 1

    # the API is fixed: a re-run of the same slot stores the poll, and the success resets the count
    result = ingest_poll(lake, client_for(replay.url, lake), LEAGUE, SLOT)
    assert result.written and result.records == served
    assert result.breaker["fail_counter"] == 0


def test_repeated_schema_drift_opens_the_circuit_breaker(lake, replay):
    replay.inject(*["drift"] * 10)
    for i in range(5):
        with pytest.raises(SchemaDriftError):
            ingest_poll(lake, client_for(replay.url, lake), LEAGUE, SLOT + timedelta(minutes=5 * i))
    seen = replay.request_count()
    # a new client, as the next Dagster run would make: the open breaker spares the API
    next_run = client_for(replay.url, lake)
    assert next_run.breaker_status()["state"] == "open"
    with pytest.raises(CircuitOpenError, match="no request was sent"):
        ingest_poll(lake, next_run, LEAGUE, SLOT + timedelta(minutes=25))
    assert replay.request_count() == seen
    assert read_snapshots(lake).height == 0
    assert len(files_under(lake.quarantine)) == 5  # every drifted poll kept


def test_a_poll_with_only_some_bad_records_stays_a_success(lake, replay):
    replay.inject("drift")  # only the currency request drifts; the fragments are fine
    client = client_for(replay.url, lake)
    result = ingest_poll(lake, client, LEAGUE, SLOT)
    assert result.written and result.categories["currency"] == 0
    assert result.records == result.categories["fragment"] == len(replay.data.items(DAY, "fragment"))
    assert result.quarantined == len(replay.data.items(DAY, "currency"))
    assert client.breaker_status()["fail_counter"] == 0

    replay.inject("missing")  # every third currency record loses 'mean'
    result = ingest_poll(lake, client, LEAGUE, SLOT + timedelta(minutes=5))
    assert result.written and 0 < result.quarantined < result.records
    assert client.breaker_status()["fail_counter"] == 0


class PrefetchedClient:
    """A client without a breaker (as in the ingestion benchmark): bodies fetched beforehand."""

    def __init__(self, polled: list[tuple[str, list]]):
        self.polled = polled

    def poll(self, league: str, categories: tuple[str, ...] = DEFAULT_CATEGORIES) -> list[tuple[str, list]]:
        return self.polled

    def breaker_status(self) -> dict:
        return {}


def test_schema_drift_is_caught_for_a_client_that_does_not_check(lake, replay):
    replay.inject("drift", "drift")
    http = client_for(replay.url)
    polled = [(c, http.get_items(LEAGUE, c)) for c in DEFAULT_CATEGORIES]  # unchecked, straight from HTTP
    with pytest.raises(SchemaDriftError, match="missing fields 'mean'"):
        ingest_poll(lake, PrefetchedClient(polled), LEAGUE, SLOT)
    assert pl.read_parquet(quarantine_path(lake, LEAGUE, SLOT)).height == sum(len(r) for _, r in polled)
    assert not snapshot_path(lake, LEAGUE, SLOT).exists()


# --- two records of the same currency in one poll -------------------------------------------------------------


def real_items(replay: ReplayServer, category: str = "currency") -> list[dict]:
    return [dict(r) for r in replay.data.items(DAY, category)]


def with_liquidity(record: dict, daily: int | None, current: int | None = None, accepted: int | None = None) -> dict:
    return {**record, "daily": daily, "current": current, "accepted": accepted}


def serve(httpserver, currency: list[dict], fragment: list[dict]) -> str:
    for category, items in (("currency", currency), ("fragment", fragment)):
        httpserver.expect_request("/get", query_string={"category": category, "league": LEAGUE}).respond_with_json(
            items
        )
    return httpserver.url_for("").rstrip("/")


def test_a_later_bogus_duplicate_does_not_become_the_close(lake, replay, httpserver):
    items = real_items(replay)
    divine = next(r for r in items if r["name"] == "Divine Orb")
    real = with_liquidity(divine, daily=420, current=130, accepted=120)
    bogus = with_liquidity({**divine, "id": 999_999, "mean": 1.0, "min": 1.0, "max": 1.0}, daily=2, current=1)
    currency = [real if r is divine else r for r in items] + [bogus]
    result = ingest_poll(lake, client_for(serve(httpserver, currency, real_items(replay, "fragment"))), LEAGUE, SLOT)

    assert result.written and result.quarantined == 1
    stored = pl.read_parquet(result.path).filter(pl.col("currency") == "Divine Orb")
    assert stored["mean"].to_list() == [divine["mean"]] and stored["id"].to_list() == [divine["id"]]
    close = daily_close_from_snapshots(read_snapshots(lake)).filter(pl.col("currency") == "Divine Orb")
    assert close["price_chaos"].to_list() == [divine["mean"]]  # before: 1.0, the bogus record
    q = pl.read_parquet(result.quarantine_path).row(0, named=True)
    assert json.loads(q["record_json"])["id"] == 999_999
    kept_at = currency.index(real) + 1
    assert q["reason"].startswith(
        f"duplicate of currency 'Divine Orb' in this poll: kept the more liquid record #{kept_at} "
        f"(id {divine['id']}, name 'Divine Orb', mean {divine['mean']:g}, daily 420, current 130, accepted 120)"
    )


@pytest.mark.parametrize(
    ("first", "second", "kept"),
    [
        ((5, 9, 9), (40, 0, 0), "second"),  # higher daily volume wins, whatever the order
        ((40, 1, 1), (40, 7, 0), "second"),  # same daily: more current listings
        ((40, 7, 3), (40, 7, 8), "second"),  # same daily and current: more accepted listings
        ((40, 7, 8), (40, 7, 8), "first"),  # a tie: the first
        ((None, None, None), (0, 0, 0), "second"),  # an unknown count is less than 0
        ((3, None, None), (None, 50, 50), "first"),
    ],
)
def test_the_more_liquid_duplicate_is_kept(replay, first, second, kept):
    exalted = next(r for r in real_items(replay) if r["name"] == "Exalted Orb")
    a = with_liquidity({**exalted, "mean": exalted["mean"]}, *first)
    b = with_liquidity({**exalted, "id": 1, "mean": exalted["mean"] * 3}, *second)
    snapshots, quarantine = validate_poll([a, b], league=LEAGUE, category="currency", polled_at=SLOT)
    winner, loser = (a, b) if kept == "first" else (b, a)
    assert snapshots["mean"].to_list() == [winner["mean"]]
    assert [json.loads(r)["mean"] for r in quarantine["record_json"]] == [loser["mean"]]
    assert f"record #{1 if kept == 'first' else 2} (id {winner['id']}" in quarantine["reason"][0]


def test_spellings_of_one_currency_are_duplicates(replay):
    # poe.watch and older leagues spell it "Jeweler's Orb"; both are the canonical "Jeweller's Orb"
    jeweller = next(r for r in real_items(replay) if r["name"] == "Jeweller's Orb")
    other = {**jeweller, "id": 2, "name": "Jeweler\u2019s Orb", "mean": jeweller["mean"] * 50, "daily": 1}
    snapshots, quarantine = validate_poll(
        [{**jeweller, "daily": 60}, other], league=LEAGUE, category="currency", polled_at=SLOT
    )
    assert snapshots["name"].to_list() == ["Jeweller's Orb"]
    assert "duplicate of currency \"Jeweller's Orb\"" in quarantine["reason"][0]
    # the same name in another category is not a duplicate
    fragments, none = validate_poll([other], league=LEAGUE, category="fragment", polled_at=SLOT)
    assert fragments.height == 1 and none.height == 0


# --- 429 with a Retry-After beyond what the client waits ------------------------------------------------------


def test_retry_after_beyond_the_cap_says_how_long_and_what_to_do(replay):
    replay.inject("429:3600")
    sleeps = Sleeps()
    with pytest.raises(RetryAfterTooLongError) as err:
        client_for(replay.url, sleeps=sleeps).poll(LEAGUE)
    message = str(err.value)
    assert "answered HTTP 429 and asked to wait 3600 s (Retry-After)" in message
    assert "more than this client's cap of 300 s (max_retry_after_s)" in message
    assert "next scheduled poll will try again" in message and "raise max_retry_after_s" in message
    assert "failed after" not in message
    assert isinstance(err.value, PoeWatchUnavailableError)  # what callers already catch
    assert (err.value.retry_after, err.value.cap) == (3600, 300)
    assert replay.request_count("/get") == 1 and not sleeps  # no hour-long wait, no retry


def test_retry_after_as_an_http_date_on_a_later_attempt(httpserver):
    later = format_datetime(datetime.now(UTC) + timedelta(hours=2), usegmt=True)
    httpserver.expect_ordered_request("/leagues").respond_with_data("busy", status=503)
    httpserver.expect_ordered_request("/leagues").respond_with_data(
        "slow down", status=429, headers={"Retry-After": later}
    )
    sleeps = Sleeps()
    client = client_for(httpserver.url_for("").rstrip("/"), sleeps=sleeps, max_retry_after_s=60)
    with pytest.raises(RetryAfterTooLongError, match=r"gave up after 2 attempt\(s\)") as err:
        client.leagues()
    assert 7100 < err.value.retry_after <= 7200
    assert "asked to wait 7" in str(err.value) and "cap of 60 s" in str(err.value)
    assert len(sleeps) == 1 and sleeps[0] < 1  # only the backoff after the 503


def test_retry_after_within_the_cap_is_waited(replay):
    replay.inject("429:120")
    sleeps = Sleeps()
    assert client_for(replay.url, sleeps=sleeps).poll(LEAGUE)
    assert max(sleeps) == pytest.approx(120, abs=0.1)

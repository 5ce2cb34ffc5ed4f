"""poe.watch: the live price API, polled every 5 minutes.

One ``requests.Session`` with (connect, read) timeouts, a minimum interval between
requests, tenacity retries for 429/5xx/connection errors (honouring ``Retry-After``)
and a pybreaker circuit breaker around each poll. The breaker's state lives in a
JSON file, because every Dagster run is a new process and must see the failures of
the runs before it.

Records are validated one by one: a bad record goes to quarantine with a reason,
the rest of the poll is kept. A poll in which no record validates is schema drift
(``SchemaDriftError``): it is checked inside the breaker, so it counts as a failed poll.
Two records of one currency in a poll: the more liquid one is kept, the other quarantined.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Annotated, Any

import polars as pl
import pybreaker
import requests
import tenacity
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from poe_pipeline import __version__
from poe_pipeline.names import InvalidLeagueNameError, canonical_currency_name, check_league_name

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.poe.watch"
DEFAULT_CATEGORIES = ("currency", "fragment")
SOURCE = "poe_watch"
NO_END_DATE = "0001-01-01T00:00:00Z"
PERMANENT_LEAGUES = frozenset({"Standard", "Hardcore", "SSF Standard", "SSF Hardcore", "Ruthless"})

# The contract read by ``prices.daily_close_from_snapshots`` and the lake.
SNAPSHOT_SCHEMA = pl.Schema(
    {
        "polled_at": pl.Datetime(time_unit="us", time_zone="UTC"),
        "league": pl.Utf8,
        "category": pl.Utf8,
        "id": pl.Int64,
        "name": pl.Utf8,
        "currency": pl.Utf8,
        "mean": pl.Float64,
        "min": pl.Float64,
        "max": pl.Float64,
        "mode": pl.Float64,
        "exalted": pl.Float64,
        "daily": pl.Int64,
        "total": pl.Int64,
        "current": pl.Int64,
        "accepted": pl.Int64,
        "change": pl.Float64,
        "low_confidence": pl.Boolean,
        "history": pl.List(pl.Float64),
    }
)

QUARANTINE_SCHEMA = pl.Schema(
    {
        "polled_at": pl.Datetime(time_unit="us", time_zone="UTC"),
        "league": pl.Utf8,
        "source": pl.Utf8,
        "category": pl.Utf8,
        "reason": pl.Utf8,
        "record_json": pl.Utf8,
    }
)


# --- errors ------------------------------------------------------------------------------------


class PoeWatchError(RuntimeError):
    """Base class of every poe.watch failure."""


class PollFormatError(PoeWatchError):
    """The body is not JSON, or not the JSON list the endpoint promises."""


class PoeWatchHTTPError(PoeWatchError):
    """An HTTP error status. 429 and 5xx are retried; other 4xx are not."""

    def __init__(self, message: str, status: int, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after

    @property
    def retryable(self) -> bool:
        return self.status == 429 or self.status >= 500


class SchemaDriftError(PollFormatError):
    """No record of a poll validates: the API renamed or retyped fields. ``polled`` holds the records as sent,
    ``quarantine_path`` where ingestion kept them."""

    def __init__(self, message: str, polled: list[tuple[str, list]], quarantine_path: Path | None = None):
        super().__init__(message)
        self.polled, self.quarantine_path = polled, quarantine_path

    def quarantined_in(self, path: Path | None) -> SchemaDriftError:
        if path is None:
            return self
        return SchemaDriftError(f"{self} The records are kept in {path}.", self.polled, path)


class PoeWatchUnavailableError(PoeWatchError):
    """Every attempt failed (429, 5xx, timeouts or connection errors)."""


class RetryAfterTooLongError(PoeWatchUnavailableError):
    """The server answered 429 (or 503) asking for a longer pause than the client waits."""

    def __init__(self, message: str, retry_after: float, cap: float):
        super().__init__(message)
        self.retry_after, self.cap = retry_after, cap


class CircuitOpenError(PoeWatchError):
    """The breaker is open: no request was sent."""

    def __init__(self, message: str, until: datetime | None):
        super().__init__(message)
        self.until = until


class NoActiveLeagueError(PoeWatchError):
    pass


# --- the breaker's state, shared between processes through a JSON file --------------------------


class JsonFileBreakerStorage(pybreaker.CircuitBreakerStorage):
    """pybreaker storage in a JSON file: state, fail/success counters and opened_at.

    Every read goes to the file, so a breaker opened by an earlier run (another
    process) is seen by the next one. Writes are atomic (temp file + os.replace).
    An unreadable file counts as a closed breaker: it only guards the API, it holds no data.
    """

    def __init__(self, path: Path, name: str = "poe_watch"):
        super().__init__(name)
        self.path = Path(path)
        self._lock = threading.RLock()

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning(
                "Ignoring unreadable circuit-breaker state %s (%s); treating it as closed", self.path, exc
            )
            return {}
        return data if isinstance(data, dict) else {}

    def _update(self, **changes: Any) -> None:
        with self._lock:
            data = {
                "state": pybreaker.STATE_CLOSED,
                "fail_counter": 0,
                "success_counter": 0,
                "opened_at": None,
            }
            data.update(self._read())
            data.update(changes)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    json.dump(data, fh, indent=2)
                os.replace(tmp, self.path)
            finally:
                Path(tmp).unlink(missing_ok=True)

    @property
    def state(self) -> str:
        state = self._read().get("state", pybreaker.STATE_CLOSED)
        valid = (pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN)
        return state if state in valid else pybreaker.STATE_CLOSED

    @state.setter
    def state(self, state: str) -> None:
        self._update(state=state)

    def increment_counter(self) -> None:
        with self._lock:
            self._update(fail_counter=self.counter + 1)

    def reset_counter(self) -> None:
        self._update(fail_counter=0)

    def increment_success_counter(self) -> None:
        with self._lock:
            self._update(success_counter=self.success_counter + 1)

    def reset_success_counter(self) -> None:
        self._update(success_counter=0)

    @property
    def counter(self) -> int:
        return int(self._read().get("fail_counter") or 0)

    @property
    def success_counter(self) -> int:
        return int(self._read().get("success_counter") or 0)

    @property
    def opened_at(self) -> datetime | None:
        raw = self._read().get("opened_at")
        try:
            return datetime.fromisoformat(raw).astimezone(UTC) if raw else None
        except (TypeError, ValueError):
            return None

    @opened_at.setter
    def opened_at(self, value: datetime) -> None:
        self._update(opened_at=value.astimezone(UTC).isoformat())


# --- retries -----------------------------------------------------------------------------------


class wait_retry_after(tenacity.wait.wait_base):  # noqa: N801 (tenacity's naming style)
    """Exponential backoff with jitter, but never shorter than the server's ``Retry-After``."""

    def __init__(self, backoff: tenacity.wait.wait_base):
        self.backoff = backoff

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        wait = self.backoff(retry_state)
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        return max(wait, retry_after or 0.0)


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, PoeWatchHTTPError):
        return exc.retryable
    return isinstance(exc, requests.ConnectionError | requests.Timeout)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _seconds(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.3g}"


def _describe(path: str, params: dict[str, str] | None) -> str:
    query = "&".join(f"{k}={v}" for k, v in (params or {}).items())
    return f"{path}?{query}" if query else path


# --- the client --------------------------------------------------------------------------------


class PoeWatchClient:
    """poe.watch over HTTP: rate-limited, retried, circuit-broken.

    ``sleep`` is used for the rate limit and the retry waits, so tests can record
    the waits instead of spending them.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        min_interval_s: float = 1.0,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,
        max_retries: int = 3,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 30.0,
        max_retry_after_s: float = 300.0,
        breaker_fail_max: int = 5,
        breaker_reset_timeout_s: float = 300.0,
        breaker_state_path: Path | None = None,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.base_url = base_url.rstrip("/")
        self.min_interval_s = min_interval_s
        self.timeout = (connect_timeout_s, read_timeout_s)
        self.max_retries = max_retries
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.max_retry_after_s = max_retry_after_s
        self.session = session or requests.Session()
        self.session.headers.setdefault("User-Agent", f"poe-pipeline/{__version__}")
        self._sleep = sleep
        self._throttle_lock = threading.Lock()
        self._next_request_at = 0.0
        storage = (
            JsonFileBreakerStorage(breaker_state_path)
            if breaker_state_path is not None
            else pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
        )
        self.breaker = pybreaker.CircuitBreaker(
            fail_max=breaker_fail_max,
            reset_timeout=breaker_reset_timeout_s,
            state_storage=storage,
            # A 404/400 is a configuration error (wrong league or category), not an unhealthy API.
            exclude=[lambda e: isinstance(e, PoeWatchHTTPError) and not e.retryable],
            # The poll that trips the breaker raises its own error, which says what went wrong.
            throw_new_error_on_trip=False,
            name="poe.watch",
        )

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> PoeWatchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- HTTP ---

    def _throttle(self) -> None:
        with self._throttle_lock:
            wait = self._next_request_at - time.monotonic()
            if wait > 0:
                self._sleep(wait)
            self._next_request_at = max(time.monotonic(), self._next_request_at) + self.min_interval_s

    def _request_once(self, path: str, params: dict[str, str] | None) -> requests.Response:
        self._throttle()
        response = self.session.get(f"{self.base_url}{path}", params=params, timeout=self.timeout)
        if response.status_code >= 400:
            where = _describe(path, params)
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            snippet = response.text[:200].strip()
            if response.status_code == 429 or response.status_code >= 500:
                msg = f"poe.watch {where} answered HTTP {response.status_code}"
            else:
                msg = (
                    f"poe.watch {where} answered HTTP {response.status_code} ({snippet!r}); "
                    "check the league and category names"
                )
            raise PoeWatchHTTPError(msg, response.status_code, retry_after)
        return response

    def _stop_on_long_retry_after(self, retry_state: tenacity.RetryCallState) -> bool:
        # A server asking for a longer pause than we are willing to hold a run for: give up now.
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        return retry_after is not None and retry_after > self.max_retry_after_s

    def _get_json(self, path: str, params: dict[str, str] | None = None) -> Any:
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.max_retries + 1) | self._stop_on_long_retry_after,
            wait=wait_retry_after(
                tenacity.wait_exponential_jitter(
                    initial=self.backoff_base_s, max=self.backoff_max_s, jitter=self.backoff_base_s
                )
            ),
            retry=tenacity.retry_if_exception(_retryable),
            sleep=self._sleep,
            before_sleep=tenacity.before_sleep_log(log, logging.WARNING),
        )
        where = _describe(path, params)
        try:
            response = retrying(self._request_once, path, params)
        except tenacity.RetryError as err:
            attempts = err.last_attempt.attempt_number
            last = err.last_attempt.exception()
            retry_after = getattr(last, "retry_after", None)
            if retry_after is not None and retry_after > self.max_retry_after_s:
                raise RetryAfterTooLongError(
                    f"poe.watch {where} answered HTTP {last.status} and asked to wait {_seconds(retry_after)} s "
                    f"(Retry-After) before trying again, more than this client's cap of "
                    f"{_seconds(self.max_retry_after_s)} s "
                    f"(max_retry_after_s), so it gave up after {attempts} attempt(s) instead of holding the run. "
                    "The next scheduled poll will try again; to wait that long instead, raise max_retry_after_s.",
                    retry_after,
                    self.max_retry_after_s,
                ) from last
            raise PoeWatchUnavailableError(
                f"poe.watch {where} failed after {attempts} attempt(s): {last}. "
                "The API may be down or rate-limiting; the next scheduled poll will try again."
            ) from last
        try:
            return json.loads(response.content.decode(response.encoding or "utf-8", errors="replace"))
        except json.JSONDecodeError as exc:
            tail = "; the poll was not stored" if path == "/get" else ""
            raise PollFormatError(
                f"poe.watch {where} returned truncated or invalid JSON at char {exc.pos} "
                f"(HTTP {response.status_code}, {len(response.content)} bytes, "
                f"Content-Type {response.headers.get('Content-Type')!r}){tail}"
            ) from None

    def _get_list(self, path: str, params: dict[str, str] | None = None) -> list:
        body = self._get_json(path, params)
        if not isinstance(body, list):
            tail = "; the poll was not stored" if path == "/get" else ""
            shown = json.dumps(body)[:200]
            raise PollFormatError(
                f"poe.watch {_describe(path, params)} returned a JSON {type(body).__name__} where a list "
                f"was expected ({shown}){tail}"
            )
        return body

    # --- endpoints ---

    def get_items(self, league: str, category: str) -> list:
        """``GET /get?category=..&league=..``: the raw item records (validate with ``validate_poll``)."""
        return self._get_list("/get", {"category": category, "league": league})

    def leagues(self) -> list[dict]:
        return self._get_list("/leagues")

    def history(self, item_id: int, league: str) -> list[dict]:
        return self._get_list("/history", {"id": str(item_id), "league": league})

    def active_challenge_league(self, now: datetime | None = None) -> str:
        """The current challenge league: not permanent or HC/SSF/Ruthless, and no end date or a future one."""
        now = now or datetime.now(UTC)
        if self.breaker_status()["state"] == pybreaker.STATE_OPEN:
            raise self._circuit_open_error()  # an open breaker spares the API this request too
        leagues = self.leagues()
        candidates: list[tuple[datetime, str]] = []
        for entry in leagues:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                continue
            name = entry["name"]
            if not is_challenge_league_name(name):
                continue
            end = _parse_api_time(entry.get("end_date"))
            if end is not None and end.year > 1 and end <= now:
                continue
            start = _parse_api_time(entry.get("start_date")) or datetime.min.replace(tzinfo=UTC)
            candidates.append((start, name))
        if not candidates:
            names = ", ".join(_shown_name(e.get("name")) for e in leagues if isinstance(e, dict)) or "none"
            raise NoActiveLeagueError(
                f"poe.watch /leagues lists no active challenge league (leagues: {names}); "
                "pass the league explicitly, e.g. --league Sanctum"
            )
        active = max(candidates)[1]
        try:  # the name becomes a lake path: never trust it
            return check_league_name(active, source="poe.watch /leagues")
        except InvalidLeagueNameError as exc:
            raise NoActiveLeagueError(str(exc)) from None

    def poll(self, league: str, categories: Iterable[str] = DEFAULT_CATEGORIES) -> list[tuple[str, list]]:
        """One breaker-guarded poll of every category. ``CircuitOpenError`` (no request sent) while open;
        ``SchemaDriftError`` (counted as a failed poll) when no record validates."""
        categories = tuple(categories)

        def _poll() -> list[tuple[str, list]]:
            polled = [(category, self.get_items(league, category)) for category in categories]
            drift = schema_drift(polled, league)
            if drift is not None:  # raised inside the breaker: a drifted poll is a failed poll
                raise drift
            return polled

        try:
            return self.breaker.call(_poll)
        except pybreaker.CircuitBreakerError:
            raise self._circuit_open_error() from None

    def _circuit_open_error(self) -> CircuitOpenError:
        status = self.breaker_status()
        until = datetime.fromisoformat(status["retry_after"]) if status["retry_after"] else None
        return CircuitOpenError(
            f"poe.watch circuit breaker is open after {self.breaker.fail_max} consecutive failed polls "
            f"(opened at {status['opened_at']}); no request was sent. It lets a trial poll through "
            f"after {status['retry_after']}. Check that the API is reachable, or wait.",
            until,
        )

    def breaker_status(self) -> dict:
        """The breaker for run metadata: state, consecutive failed polls, when it opened and until when."""
        storage = self.breaker._state_storage  # pybreaker exposes no public getter for opened_at
        state = storage.state
        opened_at = storage.opened_at
        retry_after = None
        if state == pybreaker.STATE_OPEN and opened_at is not None:
            until = opened_at + timedelta(seconds=self.breaker.reset_timeout)
            if datetime.now(UTC) >= until:
                state = pybreaker.STATE_HALF_OPEN  # pybreaker moves there lazily, on the next call
            else:
                retry_after = until.isoformat()
        return {
            "state": state,
            "fail_counter": int(storage.counter),
            "opened_at": opened_at.isoformat() if opened_at else None,
            "retry_after": retry_after,
        }


def _shown_name(name: Any) -> str:
    """A league name for a one-line message: as is when it is a valid name, else quoted and cut."""
    try:
        return check_league_name(name)
    except InvalidLeagueNameError:
        return _short(name)


def is_challenge_league_name(name: str) -> bool:
    """False for Standard, Hardcore, SSF, HC and Ruthless variants."""
    if name in PERMANENT_LEAGUES:
        return False
    words = name.replace("(", " ").replace(")", " ").split()
    return not any(w in ("Hardcore", "HC", "SSF", "Ruthless") for w in words)


def _parse_api_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# --- record validation -------------------------------------------------------------------------

Price = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0, le=2**63 - 1)]


class PoeWatchItem(BaseModel):
    """One record of ``/get``. Strict types: a price sent as a string is drift, not data."""

    model_config = ConfigDict(extra="ignore", strict=True)

    id: Annotated[int, Field(ge=0, le=2**63 - 1)]
    name: str
    mean: Price
    min: Price | None = None
    max: Price | None = None
    mode: Price | None = None
    exalted: Price | None = None
    change: Annotated[float, Field(allow_inf_nan=False)] | None = None
    daily: Count | None = None
    total: Count | None = None
    current: Count | None = None
    accepted: Count | None = None
    lowConfidence: bool = False  # noqa: N815 (the API's field name)
    history: list[Annotated[float, Field(allow_inf_nan=False)] | None] | None = None
    group: str | None = None
    frame: int | None = None

    @field_validator("name")
    @classmethod
    def _non_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


# Fields poe.watch documents for other categories; not evidence of drift when present.
_DOCUMENTED_FIELDS = set(PoeWatchItem.model_fields) | {
    "category",
    "icon",
    "influences",
    "linkCount",
    "perfectPrice",
    "perfectAmount",
    "implicits",
    "explicits",
    "gemLevel",
    "gemQuality",
    "gemIsCorrupted",
    "itemLevel",
    "baseIsShaper",
    "baseIsElder",
    "mapTier",
    "enchantMin",
    "enchantMax",
    "stackSize",
}


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reason(exc: ValidationError, record: dict) -> str:
    parts, missing = [], False
    for err in exc.errors(include_url=False):
        field = ".".join(str(p) for p in err["loc"]) or "record"
        if err["type"] == "missing":
            missing = True
            parts.append(f"missing field '{field}'")
        else:
            msg = err["msg"][:1].lower() + err["msg"][1:]
            parts.append(f"field '{field}': {msg} (got {_short(err.get('input'))})")
    unknown = sorted(set(record) - _DOCUMENTED_FIELDS)
    if missing and unknown:
        parts.append(f"unexpected fields {', '.join(unknown)}: the poe.watch schema may have changed")
    return "; ".join(parts)


def _validates(record: Any) -> bool:
    if not isinstance(record, dict):
        return False
    try:
        PoeWatchItem.model_validate(record)
    except ValidationError:
        return False
    return True


def _counted(counter: Counter) -> str:
    return ", ".join(f"'{name}' ({n} record{'s' if n != 1 else ''})" for name, n in sorted(counter.items()))


def schema_drift(polled: list[tuple[str, list]], league: str) -> SchemaDriftError | None:
    """``SchemaDriftError`` naming the missing, unknown and invalid fields when no record of the poll validates;
    None when at least one does (or the poll is empty). Cheap on a healthy poll: it stops at the first good
    record."""
    total = sum(len(records) for _, records in polled)
    if total == 0 or any(_validates(r) for _, records in polled for r in records):
        return None
    missing, invalid, unknown, not_objects = Counter(), Counter(), Counter(), 0
    for _, records in polled:
        for record in records:
            if not isinstance(record, dict):
                not_objects += 1
                continue
            unknown.update(set(record) - _DOCUMENTED_FIELDS)
            try:
                PoeWatchItem.model_validate(record)
            except ValidationError as exc:
                fields = {(e["type"], str(e["loc"][0]) if e["loc"] else "record") for e in exc.errors()}
                missing.update(f for kind, f in fields if kind == "missing")
                invalid.update(f for kind, f in fields if kind != "missing")
    per_category = ", ".join(f"{category} {len(records)}" for category, records in polled)
    found = [
        f"missing fields {_counted(missing)}" if missing else "",
        f"unknown fields {_counted(unknown)}" if unknown else "",
        f"invalid fields {_counted(invalid)}" if invalid else "",
        f"{not_objects} record(s) not a JSON object" if not_objects else "",
    ]
    return SchemaDriftError(
        f"poe.watch schema drift: all {total} records of the {league!r} poll ({per_category}) failed validation; "
        f"{'; '.join(f for f in found if f)}. The API has probably renamed or retyped fields: update PoeWatchItem "
        "in poe_pipeline/sources/poe_watch.py to the new names. The poll was not stored and counts as a failure "
        "toward the circuit breaker.",
        polled,
    )


def _liquidity(row: dict) -> tuple[int, int, int]:
    return tuple(-1 if row[k] is None else row[k] for k in ("daily", "current", "accepted"))


def _describe_record(index: int, row: dict) -> str:
    return (
        f"record #{index + 1} (id {row['id']}, name {row['name']!r}, mean {row['mean']:g}, daily {row['daily']}, "
        f"current {row['current']}, accepted {row['accepted']})"
    )


def _one_per_currency(rows: list[tuple[int, dict, dict]]) -> tuple[list[dict], list[tuple[dict, str]]]:
    """Where a currency appears twice in a category, keep the more liquid record: higher ``daily``, then
    ``current``, then ``accepted`` listings, then the first. Returns (kept rows, [(record, reason)])."""
    by_currency: dict[str, list[tuple[int, dict, dict]]] = {}
    for entry in rows:
        by_currency.setdefault(entry[2]["currency"], []).append(entry)
    kept_index: set[int] = set()
    dropped: list[tuple[int, dict, str]] = []
    for currency, entries in by_currency.items():
        # max() keeps the first of equals; -index makes that explicit
        best = max(entries, key=lambda e: (*_liquidity(e[2]), -e[0]))
        kept_index.add(best[0])
        for index, record, row in entries:
            if index != best[0]:
                dropped.append((index, record, (
                    f"duplicate of currency {currency!r} in this poll: kept the more liquid "
                    f"{_describe_record(best[0], best[2])} over this {_describe_record(index, row)}"
                )))
    kept = [row for index, _, row in rows if index in kept_index]
    return kept, [(record, reason) for _, record, reason in sorted(dropped, key=lambda d: d[0])]


def _record_json(record: Any) -> str:
    try:
        return json.dumps(record, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(record)


def validate_poll(
    records: list,
    *,
    league: str,
    category: str,
    polled_at: datetime,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split one category's records into (snapshots, quarantine), both in their contract schemas.

    A record that fails the schema is quarantined with its reason; of two records of the same currency (canonical
    name), the less liquid one is quarantined with a reason naming the one kept.
    """
    if polled_at.tzinfo is None:
        raise ValueError(f"polled_at {polled_at.isoformat()} has no time zone; pass an aware UTC datetime")
    polled_at = polled_at.astimezone(UTC)
    good: list[tuple[int, dict, dict]] = []  # (position in the poll, record as sent, snapshot row)
    bad: list[tuple[Any, str]] = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            reason = f"record is a JSON {type(record).__name__}, not an object"
        else:
            try:
                item = PoeWatchItem.model_validate(record)
            except ValidationError as exc:
                reason = _reason(exc, record)
            else:
                row = {
                    "polled_at": polled_at,
                    "league": league,
                    "category": category,
                    "id": item.id,
                    "name": item.name,
                    "currency": canonical_currency_name(item.name),
                    "mean": item.mean,
                    "min": item.min,
                    "max": item.max,
                    "mode": item.mode,
                    "exalted": item.exalted,
                    "daily": item.daily,
                    "total": item.total,
                    "current": item.current,
                    "accepted": item.accepted,
                    "change": item.change,
                    "low_confidence": item.lowConfidence,
                    "history": item.history,
                }
                good.append((index, record, row))
                continue
        bad.append((record, reason))
    kept, duplicates = _one_per_currency(good)
    quarantined = [
        {
            "polled_at": polled_at,
            "league": league,
            "source": SOURCE,
            "category": category,
            "reason": reason,
            "record_json": _record_json(record),
        }
        for record, reason in bad + duplicates
    ]
    return pl.DataFrame(kept, schema=SNAPSHOT_SCHEMA), pl.DataFrame(quarantined, schema=QUARANTINE_SCHEMA)

"""An offline poe.watch: replays a poe.ninja league dump, day by day, in poe.watch's response shape.

Every price served is a real daily price from the dump; nothing is invented:

- ``mean`` and ``mode`` are the day's chaos price (``chaos_prices_from_dump_rows``);
- ``min``/``max`` span the two sides of that day's market (the direct price and the
  reverse ``Chaos Orb -> X`` row), or equal ``mean`` when only one side exists;
- ``exalted`` is ``mean`` divided by that day's Exalted Orb price (0 when unknown);
- ``history`` holds the last 7 league days' means (null where the dump skips a day);
  ``change`` is the % change against 7 league days before (0 when that day is unknown);
- ``daily``, ``total``, ``current`` and ``accepted`` are 0: the dumps carry no volumes.

The simulated clock: ``day = start_day + floor(elapsed_real_seconds * speed / 86400)``,
clamped to the league's last day. ``speed=288`` is one day per 5-minute poll; 0 freezes it.

Faults (constructor, ``inject()``, ``--fault``, or ``POST /_replay/faults`` with a JSON
list) are consumed one per request: ``429[:retry_after_s]``, ``500``, ``503``,
``timeout[:sleep_s]``, ``truncated``, ``malformed``, ``drift``, ``missing``, ``extra``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import polars as pl

from poe_pipeline.sources.poe_ninja import CHAOS, chaos_prices_from_dump_rows, read_dump

EXALTED = "Exalted Orb"
CATEGORIES = ("currency", "fragment")
NO_END_DATE = "0001-01-01T00:00:00Z"
SECONDS_PER_DAY = 86400.0
DEFAULT_TIMEOUT_SLEEP_S = 35.0  # longer than the client's default 30 s read timeout
HISTORY_DAYS = 7

# poe.ninja files these under Fragments; everything else in a currency dump is "currency".
FRAGMENT_PATTERN = re.compile(
    r"\b(Splinter|Fragment|Emblem|Key|Breachstone|Crest|Scarab|Sacrifice|Mortal|Timeless|Offering|"
    r"Blessing of|Simulacrum|Writ|Goddess|Vessel)\b"
)

FAULT_KINDS = ("429", "500", "503", "timeout", "truncated", "malformed", "drift", "missing", "extra")
MALFORMED_BODY = (
    b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head>"
    b"<body><h1>Bad Gateway</h1><p>The upstream server is unavailable.</p></body></html>"
)


def category_of(name: str) -> str:
    return "fragment" if FRAGMENT_PATTERN.search(name) else "currency"


def item_id(name: str) -> int:
    """A stable id per currency name, the same in every league and run."""
    return zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF


@dataclass(frozen=True)
class Fault:
    kind: str
    arg: float | None = None

    @classmethod
    def parse(cls, spec: str | Fault) -> Fault:
        if isinstance(spec, Fault):
            return spec
        kind, _, arg = str(spec).strip().partition(":")
        if kind not in FAULT_KINDS:
            raise ValueError(
                f"Unknown replay fault {spec!r}: choose from {', '.join(FAULT_KINDS)} "
                "(429 and timeout take an optional ':seconds', e.g. timeout:2.0)"
            )
        if arg and kind not in ("429", "timeout"):
            raise ValueError(f"Replay fault {kind!r} takes no argument (got {spec!r})")
        try:
            value = float(arg) if arg else None
        except ValueError:
            raise ValueError(f"Replay fault {spec!r}: {arg!r} is not a number of seconds") from None
        return cls(kind, value)


class UnknownLeagueError(ValueError):
    pass


def find_league_dump(history_dir: Path, league: str) -> Path:
    history_dir = Path(history_dir)
    if not history_dir.is_dir():
        raise FileNotFoundError(
            f"History directory {history_dir} does not exist; pass --history DIR holding "
            "<League>.currency.csv(.gz) files, e.g. sample_data/"
        )
    for suffix in (".currency.csv", ".currency.csv.gz"):
        path = history_dir / f"{league}{suffix}"
        if path.is_file():
            return path
    known = sorted(
        {
            p.name.split(".currency.csv")[0]
            for p in history_dir.iterdir()
            if p.is_file() and p.name.endswith((".currency.csv", ".currency.csv.gz"))
        }
    )
    raise UnknownLeagueError(
        f"Unknown league {league!r}: known leagues in {history_dir} are {', '.join(known) or 'none'}"
    )


class LeagueReplay:
    """The league's real daily prices, indexed by league day, ready to render as poe.watch items."""

    def __init__(self, league: str, prices: pl.DataFrame):
        prices = prices.filter(pl.col("currency") != CHAOS)
        if prices.height == 0:
            raise ValueError(f"League {league!r} has no chaos prices to replay")
        self.league = league
        self.days: list[date] = prices["date"].unique().sort().to_list()
        day_of = {d: i for i, d in enumerate(self.days)}
        n = len(self.days)
        self.price: dict[str, list[float | None]] = {}
        self.reverse: dict[str, list[float | None]] = {}
        self.confidence: dict[str, list[str | None]] = {}
        for row in prices.iter_rows(named=True):
            name, i = row["currency"], day_of[row["date"]]
            if name not in self.price:
                self.price[name], self.reverse[name], self.confidence[name] = (
                    [None] * n,
                    [None] * n,
                    [None] * n,
                )
            self.price[name][i] = row["price_chaos"]
            self.reverse[name][i] = row["reverse_price_chaos"]
            self.confidence[name][i] = row["confidence"]
        self.ids = {name: item_id(name) for name in self.price}
        if len(set(self.ids.values())) != len(self.ids):
            raise ValueError(f"Item id collision among {league!r} currencies; change item_id()")
        self.names_by_id = {v: k for k, v in self.ids.items()}
        self._cache: dict[tuple[int, str], list[dict]] = {}

    @classmethod
    def from_dir(cls, history_dir: Path, league: str) -> LeagueReplay:
        path = find_league_dump(history_dir, league)
        stat = path.stat()
        return _load_replay(path.resolve(), stat.st_mtime_ns, stat.st_size, league)

    def items(self, day: int, category: str) -> list[dict]:
        key = (day, category)
        if key not in self._cache:
            self._cache[key] = self._render(day, category)
        return self._cache[key]

    def _render(self, day: int, category: str) -> list[dict]:
        exalted_price = self.price.get(EXALTED, [None] * len(self.days))[day]
        items = []
        for name in sorted(self.price):
            mean = self.price[name][day]
            if mean is None or category_of(name) != category:
                continue
            sides = [v for v in (mean, self.reverse[name][day]) if v is not None and math.isfinite(v)]
            before = self.price[name][day - HISTORY_DAYS] if day >= HISTORY_DAYS else None
            items.append(
                {
                    "id": self.ids[name],
                    "name": name,
                    "category": category,
                    "group": category,
                    "frame": 5,
                    "icon": "",
                    "mean": mean,
                    "min": min(sides),
                    "max": max(sides),
                    "mode": mean,
                    "exalted": mean / exalted_price if exalted_price else 0,
                    "daily": 0,  # the dumps carry no volumes; 0 rather than an invented number
                    "total": 0,
                    "current": 0,
                    "accepted": 0,
                    "change": round((mean / before - 1.0) * 100.0, 2) if before else 0,
                    "history": self.price[name][max(0, day - HISTORY_DAYS + 1) : day + 1],
                    "lowConfidence": self.confidence[name][day] == "Low",
                }
            )
        return items

    def history(self, item: int, day: int) -> list[dict] | None:
        name = self.names_by_id.get(item)
        if name is None:
            return None
        return [
            {"mean": p, "date": f"{self.days[i].isoformat()}T00:00:00Z", "id": item}
            for i, p in enumerate(self.price[name][: day + 1])
            if p is not None
        ]


@lru_cache(maxsize=8)
def _load_replay(path: Path, mtime_ns: int, size: int, league: str) -> LeagueReplay:
    # Keyed on mtime and size so an edited dump is re-read; the replay data is never mutated.
    return LeagueReplay(league, chaos_prices_from_dump_rows(read_dump(path)))


def _apply_record_fault(kind: str, items: list[dict]) -> list[dict]:
    if kind == "drift":  # a renamed field and a new one on every record
        return [
            {**{("price" if k == "mean" else k): v for k, v in it.items()}, "priceSource": "trade"}
            for it in items
        ]
    if kind == "missing":  # every third record loses a required field
        return [
            {k: v for k, v in it.items() if k != "mean"} if i % 3 == 0 else it for i, it in enumerate(items)
        ]
    if kind == "extra":
        return [
            {**it, "influences": None, "linkCount": 0, "replayNote": "unknown extra field"} for it in items
        ]
    return items


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib signature)
        pass  # quiet: tests and the demo poll every few seconds

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (e.g. after a timeout fault)

    def _json(self, status: int, payload: object, fault: Fault | None = None) -> None:
        body = json.dumps(payload).encode("utf-8")
        if fault is not None and fault.kind == "truncated":
            body = body[: len(body) // 2]  # a valid start of the JSON, cut in half
        self._send(status, body)

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def do_POST(self) -> None:  # noqa: N802 (stdlib name)
        replay = self.server.replay
        if urlsplit(self.path).path != "/_replay/faults":
            return self._error(404, f"Unknown path {self.path!r}")
        length = int(self.headers.get("Content-Length") or 0)
        try:
            specs = json.loads(self.rfile.read(length) or b"[]")
            if not isinstance(specs, list):
                raise ValueError('expected a JSON list of fault names, e.g. ["429", "truncated"]')
            replay.inject(*specs)
        except ValueError as exc:
            return self._error(400, str(exc))
        self._json(200, {"queued": replay.queued_faults()})

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        replay = self.server.replay
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if url.path == "/_replay/status":
            return self._json(200, replay.status())

        replay._record_request(self.path)
        fault = replay._next_fault()
        if fault is not None:
            if fault.kind == "429":
                retry_after = 1.0 if fault.arg is None else fault.arg
                return self._send(
                    429, b'{"error": "rate limited"}', headers={"Retry-After": f"{retry_after:g}"}
                )
            if fault.kind in ("500", "503"):
                return self._send(int(fault.kind), json.dumps({"error": f"HTTP {fault.kind}"}).encode())
            if fault.kind == "timeout":
                replay._stopping.wait(replay.timeout_sleep_s if fault.arg is None else fault.arg)
            if fault.kind == "malformed":
                return self._send(200, MALFORMED_BODY, content_type="text/html")

        if url.path == "/leagues":
            return self._json(200, replay.leagues_payload(), fault)
        if url.path == "/categories":
            groups = [
                {
                    "id": i + 1,
                    "name": c,
                    "display": c.title(),
                    "groups": [{"id": i + 1, "name": c, "display": c.title()}],
                }
                for i, c in enumerate(CATEGORIES)
            ]
            return self._json(200, groups, fault)
        if url.path in ("/get", "/history"):
            league = query.get("league")
            if league != replay.league:
                return self._error(404, f"Unknown league {league!r}: this replay serves {replay.league!r}")
            day = replay.current_day_index()
            if url.path == "/history":
                try:
                    wanted = int(query.get("id", ""))
                except ValueError:
                    return self._error(400, f"Bad id {query.get('id')!r}: expected an integer item id")
                history = replay.data.history(wanted, day)
                if history is None:
                    return self._error(404, f"Unknown item id {wanted} in {replay.league!r}")
                return self._json(200, history, fault)
            category = query.get("category")
            if category not in CATEGORIES:
                return self._error(
                    400, f"Unknown category {category!r}: this replay serves {', '.join(CATEGORIES)}"
                )
            items = replay.data.items(day, category)
            if fault is not None:
                items = _apply_record_fault(fault.kind, items)
            return self._json(200, items, fault)
        return self._error(404, f"Unknown path {url.path!r}: try /get, /leagues, /history or /categories")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    replay: ReplayServer

    def handle_error(self, request, client_address) -> None:  # noqa: ANN001 (stdlib signature)
        pass  # a client that hung up is not the server's problem


class ReplayServer:
    """poe.watch on loopback, serving one league of real poe.ninja prices on a simulated clock."""

    def __init__(
        self,
        history_dir: Path,
        league: str,
        *,
        speed: float = 288.0,
        start_day: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: Iterable[str | Fault] = (),
        timeout_sleep_s: float = DEFAULT_TIMEOUT_SLEEP_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.data = LeagueReplay.from_dir(Path(history_dir), league)
        self.league = league
        n = len(self.data.days)
        if not 0 <= start_day < n:
            raise ValueError(f"start_day {start_day} is outside {league!r}, which has days 0..{n - 1}")
        self.speed = float(speed)
        self.timeout_sleep_s = timeout_sleep_s
        self._clock = clock
        self._start_day = start_day
        self._t0 = clock()
        self._lock = threading.Lock()
        self._faults: deque[Fault] = deque(Fault.parse(f) for f in faults)
        self.requests: list[str] = []
        self._stopping = threading.Event()
        self._httpd = _HTTPServer((host, port), _Handler, bind_and_activate=True)
        self._httpd.replay = self
        self._thread: threading.Thread | None = None

    # --- lifecycle ---

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> ReplayServer:
        self._stopping.clear()
        # A short poll interval keeps stop() quick (serve_forever checks for shutdown at this pace).
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="poe-watch-replay",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes handlers sleeping on a timeout fault
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> ReplayServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the simulated clock ---

    def current_day_index(self) -> int:
        elapsed_days = (
            0 if self.speed <= 0 else int((self._clock() - self._t0) * self.speed // SECONDS_PER_DAY)
        )
        return max(0, min(self._start_day + elapsed_days, len(self.data.days) - 1))

    def current_date(self) -> date:
        return self.data.days[self.current_day_index()]

    def set_day(self, index: int) -> None:
        """Jump to league day ``index``; the clock runs on from there."""
        n = len(self.data.days)
        if not 0 <= index < n:
            raise ValueError(f"Day {index} is outside {self.league!r}, which has days 0..{n - 1}")
        self._start_day, self._t0 = index, self._clock()

    # --- faults and bookkeeping ---

    def inject(self, *faults: str | Fault) -> None:
        parsed = [Fault.parse(f) for f in faults]  # all or nothing
        with self._lock:
            self._faults.extend(parsed)

    def queued_faults(self) -> list[str]:
        with self._lock:
            return [f.kind if f.arg is None else f"{f.kind}:{f.arg:g}" for f in self._faults]

    def _next_fault(self) -> Fault | None:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    def _record_request(self, path: str) -> None:
        with self._lock:
            self.requests.append(path)

    def request_count(self, path_prefix: str = "/") -> int:
        with self._lock:
            return sum(1 for p in self.requests if p.startswith(path_prefix))

    def leagues_payload(self) -> list[dict]:
        return [
            {
                "name": self.league,
                "start_date": f"{self.data.days[0].isoformat()}T00:00:00Z",
                "end_date": NO_END_DATE,
            },
            {"name": "Standard", "start_date": "2013-01-23T21:00:00Z", "end_date": NO_END_DATE},
        ]

    def status(self) -> dict:
        day = self.current_day_index()
        return {
            "league": self.league,
            "day_index": day,
            "date": self.data.days[day].isoformat(),
            "days": len(self.data.days),
            "speed": self.speed,
            "queued_faults": self.queued_faults(),
        }


def serve_replay(
    history_dir: Path,
    league: str,
    speed: float = 288.0,
    start_day: int = 0,
    host: str = "127.0.0.1",
    port: int = 8765,
    faults: Iterable[str] = (),
) -> None:
    """Serve until Ctrl-C. Prints the URL to point ``PoeWatchClient`` at."""
    server = ReplayServer(
        history_dir, league, speed=speed, start_day=start_day, host=host, port=port, faults=faults
    ).start()
    data = server.data
    print(
        f"poe.watch replay of {league} ({len(data.days)} days, {data.days[0]} to {data.days[-1]}, "
        f"starting at day {start_day}, speed {speed:g}x) listening on {server.url}",
        flush=True,
    )
    try:
        while server._thread is not None and server._thread.is_alive():
            server._thread.join(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="poe-pipeline serve-replay", description=__doc__.splitlines()[0])
    parser.add_argument("--history", required=True, type=Path, help="directory of <League>.currency.csv(.gz)")
    parser.add_argument("--league", required=True)
    parser.add_argument("--speed", type=float, default=288.0, help="simulated seconds per real second")
    parser.add_argument("--start-day", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--fault", action="append", default=[], help=f"one of {', '.join(FAULT_KINDS)}")
    args = parser.parse_args(argv)
    try:
        serve_replay(args.history, args.league, args.speed, args.start_day, args.host, args.port, args.fault)
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"error: {exc}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

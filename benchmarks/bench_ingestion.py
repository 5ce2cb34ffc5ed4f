"""One poe.watch poll of ~200 records into a fresh lake: HTTP, parse, validate, write.

The replay server (real Sanctum prices, league day 60: 105 currency + 95 fragment records) runs in its own
process, so its CPU is not billed to the poll. Two cases, each in a fresh process like a Dagster run:

- ``ingestion_poll``: ``ingest_poll`` through ``PoeWatchClient`` over loopback HTTP (file-backed circuit
  breaker, as in production). ``wall_s``/``cpu_s`` are the first (cold) poll of the process; ``warm_*`` are
  the median of the next few polls into later slots.
- ``ingestion_parse_validate_write``: the same ``ingest_poll`` with the response bodies fetched beforehand:
  JSON parse, ``validate_poll`` and the Parquet writes, no HTTP. This is the "excluding network" figure.

Targets (from the issue): < 2 s CPU per poll excluding network, < 300 MB peak memory.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

from benchmarks.harness import check_target, development_dumps_dir, measure, timed
from poe_pipeline.ingestion import ingest_poll
from poe_pipeline.lake import Lake
from poe_pipeline.sources.poe_watch import DEFAULT_CATEGORIES, PoeWatchClient

LEAGUE = "Sanctum"
REPLAY_DAY = 60  # mid-league: 200 records over currency and fragment
POLL_TIME = datetime(2023, 2, 10, 12, 0, tzinfo=UTC)  # the slot key; the lake is fresh
WARM_POLLS = 5


class _ReplayProcess:
    """``poe_pipeline.sources.replay`` in a child process, on a free loopback port, clock frozen."""

    def __enter__(self) -> str:
        history, _ = development_dumps_dir()
        cmd = [
            sys.executable,
            "-m",
            "poe_pipeline.sources.replay",
            "--history",
            str(history),
            "--league",
            LEAGUE,
            "--speed",
            "0",
            "--start-day",
            str(REPLAY_DAY),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        match = re.search(r"listening on (http://\S+)", line)
        if not match:
            self._stop()
            raise RuntimeError(f"replay server did not start: {line!r} {self.proc.stderr.read()[-500:]!r}")
        self.url = match.group(1)
        for category in DEFAULT_CATEGORIES:  # warm the server's caches (urllib: the client's stack stays cold)
            fetch_body(self.url, category)
        return self.url

    def _stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __exit__(self, *exc: object) -> None:
        self._stop()


def fetch_body(url: str, category: str) -> bytes:
    query = urllib.parse.urlencode({"category": category, "league": LEAGUE})
    with urllib.request.urlopen(f"{url}/get?{query}", timeout=30) as response:
        return response.read()


class _PrefetchedClient:
    """A ``PollingClient`` over response bodies fetched beforehand: ``poll`` only decodes the JSON."""

    def __init__(self, bodies: dict[str, bytes]):
        self.bodies = bodies

    def poll(self, league: str, categories: tuple[str, ...] = DEFAULT_CATEGORIES) -> list[tuple[str, list]]:
        return [(c, json.loads(self.bodies[c].decode("utf-8"))) for c in categories]

    def breaker_status(self) -> dict:
        return {}


def _polls(lake: Lake, client) -> dict:
    """A cold poll, then ``WARM_POLLS`` more into the following 5-minute slots."""
    figures: dict = {}
    warm_wall, warm_cpu = [], []
    for i in range(WARM_POLLS + 1):
        result, wall, cpu = timed(lambda i=i: ingest_poll(lake, client, LEAGUE, POLL_TIME + timedelta(minutes=5 * i)))
        if not result.written:
            raise RuntimeError(f"poll {i} was not written: {result.skipped_reason}")
        if i == 0:
            figures = {
                "wall_s": wall,
                "cpu_s": cpu,
                "records": result.records,
                "quarantined": result.quarantined,
                "snapshot_kb": result.path.stat().st_size / 1024,
            }
        else:
            warm_wall.append(wall)
            warm_cpu.append(cpu)
    figures["warm_wall_s"] = statistics.median(warm_wall)
    figures["warm_cpu_s"] = statistics.median(warm_cpu)
    return figures


def poll_over_http() -> dict:
    root = Path(tempfile.mkdtemp(prefix="bench-ingestion-"))
    try:
        with _ReplayProcess() as url:
            lake = Lake(root)
            client = PoeWatchClient(url, min_interval_s=0, breaker_state_path=lake.state / "poe_watch_breaker.json")
            with client:
                return _polls(lake, client)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def parse_validate_write() -> dict:
    root = Path(tempfile.mkdtemp(prefix="bench-ingestion-"))
    try:
        with _ReplayProcess() as url:
            bodies = {c: fetch_body(url, c) for c in DEFAULT_CATEGORIES}
        figures = _polls(Lake(root), _PrefetchedClient(bodies))
        figures["response_kb"] = sum(len(b) for b in bodies.values()) / 1024
        return figures
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(repeats: int) -> dict:
    poll = measure("ingestion_poll", poll_over_http, repeats)
    local = measure("ingestion_parse_validate_write", parse_validate_write, repeats)
    issue = "issue: < 2 s CPU per poll excluding network, < 300 MB peak"
    return {
        "results": {"poll": poll, "parse_validate_write": local},
        "targets": {
            "cpu_per_poll_excluding_network_s": check_target(local, "cpu_s", "<", 2.0, issue),
            "cpu_per_poll_with_http_s": check_target(poll, "cpu_s", "<", 2.0, issue),
            "peak_rss_mb": check_target(poll, "peak_rss_mb", "<", 300.0, issue),
        },
    }

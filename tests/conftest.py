from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from poe_pipeline.lake import Lake

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"
# Small real files for the tests, gzipped copies of poe.ninja's own (see tests/data/README.md)
NINJA_API = REPO / "tests" / "data" / "poe-ninja-api"  # currencyoverview responses
EVENT_DUMPS = REPO / "tests" / "data" / "event-dumps"  # two event leagues, names with spaces and parentheses


class Sleeps(list):
    """A ``sleep`` that records waits instead of spending them."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    return Lake(tmp_path / "lake")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No test reads the developer's lake or Dagster instance."""
    monkeypatch.setenv("POE_DATA_LAKE", str(tmp_path / "lake"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    # The track record's replay (a refit of the global models) only where it is tested: the demo lake and
    # tests/test_track_record.py (their subprocesses get a clean environment, so the default of 14 days)
    monkeypatch.setenv("POE_TRACK_RECORD_DAYS", "0")
    (tmp_path / "dagster_home").mkdir()


@dataclass(frozen=True)
class DemoLake:
    root: Path
    currencies: list[str]
    env: dict[str, str]  # the environment of `make dev` on this lake, offline
    stdout: str


@pytest.fixture(scope="session")
def demo_lake(tmp_path_factory) -> DemoLake:
    """The lake `make demo` builds: its own command, on the bundled sample, with the Makefile's currency list.
    Shared by the tests that read the demo's warehouse, its report and its UI."""
    from e2e.processes import BIN, base_env

    currencies = re.search(r"^DEMO_CURRENCIES \?= (.+)$", (REPO / "Makefile").read_text(), re.M).group(1).strip()
    root = tmp_path_factory.mktemp("demo") / "lake"
    env = base_env(root / ".dagster", root, POE_LEAGUE="Sanctum", POE_HISTORY_DIR=str(SAMPLE),
                   POE_WATCH_URL="http://127.0.0.1:9")  # nothing in the tests may reach the internet
    run = subprocess.run([str(BIN / "poe-pipeline"), "run", "--history", str(SAMPLE), "--league", "Sanctum",
                          "--lake", str(root), "--currencies", currencies],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return DemoLake(root, currencies.split(","), env, run.stdout)

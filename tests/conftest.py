from __future__ import annotations

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
    (tmp_path / "dagster_home").mkdir()

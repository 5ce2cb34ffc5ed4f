"""Dagster resources: the lake, the live price API, and the scope of a run."""

from __future__ import annotations

import os

import dagster as dg
import duckdb

from poe_pipeline.lake import Lake
from poe_pipeline.settings import get_profile, resolve_lake_root
from poe_pipeline.warehouse import sync_views

POE_WATCH_URL = "https://api.poe.watch"


class LakeResource(dg.ConfigurableResource):
    """The Parquet lake and its DuckDB warehouse. Empty root: ``POE_DATA_LAKE`` or ``./data_lake``."""

    root: str = ""

    @property
    def lake(self) -> Lake:
        return Lake(resolve_lake_root(self.root or None))

    def publish_views(self, log) -> list[str]:
        """Refresh the warehouse views; an analyst holding the file read-write only delays that."""
        try:
            return sync_views(self.lake)
        except duckdb.IOException as exc:
            log.warning(f"warehouse.duckdb is locked by another process, views not refreshed: {exc}")
            return []


class PoeWatchResource(dg.ConfigurableResource):
    """The poe.watch API. Tests and the demo point ``base_url`` at the loopback replay server."""

    base_url: str = POE_WATCH_URL
    league: str = ""  # empty: the active challenge league that /leagues reports
    min_interval_s: float = 1.0

    def client(self, lake: Lake):
        from poe_pipeline.sources.poe_watch import PoeWatchClient

        return PoeWatchClient(
            self.base_url,
            min_interval_s=self.min_interval_s,
            breaker_state_path=lake.state / "poe_watch_breaker.json",
        )


class RunScopeResource(dg.ConfigurableResource):
    """What a pipeline run covers: history to import, the current league, currencies and profile."""

    history_dirs: list[str] = []
    league: str = ""  # empty: the newest league in the data
    currencies: list[str] = []  # empty: every eligible currency
    profile: str = "test"

    def profile_config(self):
        return get_profile(self.profile)


def resources_from_env() -> dict[str, dg.ConfigurableResource]:
    """Defaults for ``dagster dev`` and the daemon, overridable by environment variables."""
    history = os.environ.get("POE_HISTORY_DIR", "")
    return {
        "lake": LakeResource(root=os.environ.get("POE_DATA_LAKE", "")),
        "poe_watch": PoeWatchResource(
            base_url=os.environ.get("POE_WATCH_URL", POE_WATCH_URL),
            league=os.environ.get("POE_LEAGUE", ""),
        ),
        "run_scope": RunScopeResource(
            history_dirs=[d for d in history.split(os.pathsep) if d],
            league=os.environ.get("POE_LEAGUE", ""),
            profile=os.environ.get("POE_PROFILE", "test"),
        ),
    }

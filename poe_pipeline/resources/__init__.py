"""Dagster resources: the lake, the live price API, the scope of a run, and where alerts go.

``resources_from_settings`` builds them from ``settings.Settings`` (the environment, read in one place); the CLI
and tests pass their own values as run config, so a run's scope is always visible in the UI.
"""

from __future__ import annotations

import dagster as dg
from pydantic import PrivateAttr

from poe_pipeline import monitoring as mon
from poe_pipeline.lake import Lake
from poe_pipeline.scope import RunScope
from poe_pipeline.settings import DEFAULT_PROFILE, WEBHOOK_ENV, Settings, resolve_lake_root

POE_WATCH_URL = "https://api.poe.watch"


class LakeResource(dg.ConfigurableResource):
    """The Parquet lake and its DuckDB warehouse. Empty root: ``POE_DATA_LAKE`` or ``./data_lake``."""

    root: str = ""

    @property
    def lake(self) -> Lake:
        return Lake(resolve_lake_root(self.root or None))

    def publish_views(self, log) -> list[str]:
        """Refresh the warehouse views. A warehouse that another process holds read-write only delays that (the
        run still succeeds and says so); a corrupt one is set aside and rebuilt from the lake."""
        from poe_pipeline.warehouse import publish_views

        outcome = publish_views(self.lake)
        if outcome.note:
            log.warning(outcome.note)
        return outcome.views


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
            breaker_state_path=lake.poe_watch_breaker_state,
        )


class RunScopeResource(dg.ConfigurableResource):
    """What a pipeline run covers: history to import, the current league, the currencies and the profile.

    ``scope(lake)`` resolves it once per run (``scope.RunScope``): every asset reads the same league.
    """

    history_dirs: list[str] = []
    league: str = ""  # empty: the newest league in the data
    currencies: list[str] = []  # empty: every eligible currency
    profile: str = DEFAULT_PROFILE
    _scope: RunScope | None = PrivateAttr(default=None)

    def scope(self, lake: Lake) -> RunScope:
        if self._scope is None or self._scope.lake != lake:
            from pathlib import Path

            self._scope = RunScope(lake, tuple(Path(d) for d in self.history_dirs), self.league,
                                   tuple(self.currencies), self.profile)
        return self._scope


class MonitoringResource(dg.ConfigurableResource):
    """Thresholds of the sensors and where alerts go besides the lake (empty or None: the defaults of
    ``monitoring.DegradationRules``)."""

    degradation_factor: float | None = None
    degradation_window_days: int | None = None
    degradation_min_errors: int | None = None
    retrain_cooldown_hours: float | None = None
    jump_factor: float | None = None  # the day-over-day jump check's factor
    webhook_url: str = ""  # Slack incoming webhook or any JSON webhook; empty: alerts are only logged and stored
    dagster_url: str = ""  # the UI's base URL, for links in alerts

    def rules(self) -> mon.DegradationRules:
        given = {"factor": self.degradation_factor, "window_days": self.degradation_window_days,
                 "min_errors": self.degradation_min_errors, "cooldown_hours": self.retrain_cooldown_hours}
        return mon.DegradationRules(**{k: v for k, v in given.items() if v is not None})

    def dispatch(self, alert: mon.Alert, lake: LakeResource, log) -> str:
        """Store the alert in the lake, log its webhook payload, and POST it when a webhook is configured."""
        import json

        path = mon.write_alert(lake.lake, alert)
        if path is None:
            return f"alert {alert.alert_id} was already stored"
        payload = mon.webhook_payload(alert)
        log.warning(f"ALERT {alert.severity}: {alert.title} -> {path}\nwebhook payload: {json.dumps(payload)}")
        if self.webhook_url:
            outcome = mon.post_webhook(self.webhook_url, payload)
            log.info(outcome)
            return f"stored {path}; {outcome}"
        return f"stored {path}; no webhook configured (set {WEBHOOK_ENV})"


def resources_from_settings(settings: Settings | None = None) -> dict[str, dg.ConfigurableResource]:
    """The resources of ``dagster dev`` and the daemon, from the environment."""
    s = settings or Settings.from_env()
    return {
        "lake": LakeResource(root=str(s.lake_root)),
        "poe_watch": PoeWatchResource(base_url=s.poe_watch_url or POE_WATCH_URL, league=s.league),
        "run_scope": RunScopeResource(history_dirs=list(s.history_dirs), league=s.league, profile=s.profile),
        "monitoring": MonitoringResource(
            degradation_factor=s.degradation_factor, degradation_window_days=s.degradation_window_days,
            degradation_min_errors=s.degradation_min_errors, retrain_cooldown_hours=s.retrain_cooldown_hours,
            jump_factor=s.jump_factor,
            # a secret: read when the sensor runs, never shown in the UI
            webhook_url=dg.EnvVar(WEBHOOK_ENV) if s.webhook_configured else "",
            dagster_url=s.dagster_url,
        ),
    }

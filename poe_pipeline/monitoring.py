"""What the sensors decide, as plain Python: new currencies, model degradation, the active league, alerts.

The Dagster sensors in ``poe_pipeline.assets`` (models, alerts) are thin wrappers around these functions.
Everything here reads and writes the lake; nothing imports Dagster.

Alerts are JSON records under ``<lake>/alerts/date=<YYYY-MM-DD>/``, one immutable file per alert, published
atomically (a reader never sees half a record) and keyed by a stable id, so a sensor that evaluates the same failure
twice stores it once.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import duckdb
import polars as pl
import requests

from poe_pipeline.lake import Lake, write_text_atomic
from poe_pipeline.warehouse import query

log = logging.getLogger(__name__)

DEFAULT_DEGRADATION_FACTOR = 1.5
DEFAULT_DEGRADATION_WINDOW_DAYS = 7
DEFAULT_MIN_ERRORS = 3
DEFAULT_RETRAIN_COOLDOWN_HOURS = 24.0


# --- partitions to train ----------------------------------------------------------------------------------------


def trained_currencies(lake: Lake) -> set[str]:
    """Currencies with at least one trained partition (``model_metrics``): the others still need training."""
    files = lake.parquet_files(lake.model_metrics)
    if not files:
        return set()
    frame = (pl.scan_parquet(files, hive_partitioning=False, missing_columns="insert")
             .filter(pl.col("trained") & pl.col("currency").is_not_null()).select("currency").unique().collect())
    return set(frame["currency"].to_list())


# --- degradation ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DegradationRules:
    factor: float = DEFAULT_DEGRADATION_FACTOR  # realized MAE above factor x validation MAE is degraded
    window_days: int = DEFAULT_DEGRADATION_WINDOW_DAYS  # realized errors of the last N days
    min_errors: int = DEFAULT_MIN_ERRORS  # fewer realized errors than this in the window: no verdict
    cooldown_hours: float = DEFAULT_RETRAIN_COOLDOWN_HOURS  # a model trained this recently is left alone

    def __post_init__(self) -> None:
        if not self.factor > 0 or not math.isfinite(self.factor):
            raise ValueError(f"degradation factor must be a positive number (default 1.5), got {self.factor}")
        if self.window_days < 1 or self.min_errors < 1:
            raise ValueError(f"window_days and min_errors must be at least 1, got {self.window_days}, "
                             f"{self.min_errors}")


DEGRADATION_SCHEMA = {
    "league": pl.Utf8, "currency": pl.Utf8, "horizon_days": pl.Int32, "errors": pl.UInt32,
    "window_end": pl.Date, "realized_mae": pl.Float64, "validation_mae": pl.Float64, "ratio": pl.Float64,
    "trained_at": pl.Datetime("us", "UTC"),
}


def degradation_report(
    errors: pl.DataFrame, metrics: pl.DataFrame, rules: DegradationRules = DegradationRules()
) -> pl.DataFrame:
    """Realized vs validation error per (currency, horizon) of the newest league in ``errors``.

    ``errors``: prediction_errors rows (league, currency, origin_date, horizon_days, abs_log_error). A forecast is
    realized on origin_date + horizon_days; the window is the ``window_days`` days ending on the league's newest
    realized day (the data's clock, so a replayed league works like a live one). ``metrics``: model_metrics rows
    (currency, horizon_days, trained, ensemble_mae_logret, trained_at); the newest trained row per partition is its
    validation error. Both are in log-price units. Every partition with enough errors is returned, with ``ratio``
    = realized / validation; ``degraded_partitions`` applies the factor and the cooldown.
    """
    if errors.height == 0 or metrics.height == 0:
        return pl.DataFrame(schema=DEGRADATION_SCHEMA)
    realized = errors.filter(pl.col("abs_log_error").is_finite()).with_columns(
        pl.col("horizon_days").cast(pl.Int32),
        (pl.col("origin_date").cast(pl.Date) + pl.duration(days=pl.col("horizon_days"))).alias("realized_on"),
    )
    if realized.height == 0:
        return pl.DataFrame(schema=DEGRADATION_SCHEMA)
    newest = realized.group_by("league").agg(pl.col("realized_on").max()).sort("realized_on")
    league, window_end = newest.row(-1)
    window_start = window_end - timedelta(days=rules.window_days - 1)
    per_partition = (
        realized.filter((pl.col("league") == league) & pl.col("realized_on").is_between(window_start, window_end))
        .group_by("league", "currency", "horizon_days")
        .agg(pl.len().alias("errors"), pl.col("abs_log_error").mean().alias("realized_mae"))
        .filter(pl.col("errors") >= rules.min_errors)
    )
    latest_models = (
        metrics.filter(pl.col("trained") & pl.col("ensemble_mae_logret").is_finite())
        .with_columns(pl.col("horizon_days").cast(pl.Int32))
        .sort("trained_at")
        .group_by("currency", "horizon_days")
        .agg(pl.col("ensemble_mae_logret").last().alias("validation_mae"), pl.col("trained_at").last())
    )
    return (
        per_partition.join(latest_models, on=["currency", "horizon_days"], how="inner")
        .with_columns(
            pl.lit(window_end).alias("window_end"),
            (pl.col("realized_mae") / pl.col("validation_mae")).alias("ratio"),
        )
        .select(list(DEGRADATION_SCHEMA))
        .cast(DEGRADATION_SCHEMA)
        .sort(["ratio", "currency", "horizon_days"], descending=[True, False, False])
    )


def degraded_partitions(
    report: pl.DataFrame, rules: DegradationRules = DegradationRules(), now: datetime | None = None
) -> pl.DataFrame:
    """The rows of ``degradation_report`` over the factor whose model is older than the cooldown."""
    now = now or datetime.now(UTC)
    cooled = now - timedelta(hours=rules.cooldown_hours)
    return report.filter(
        (pl.col("realized_mae") > rules.factor * pl.col("validation_mae")) & (pl.col("trained_at") <= cooled)
    )


def retrain_batches(degraded: pl.DataFrame) -> list[tuple[list[str], list[str]]]:
    """Group degraded partitions into (currencies, horizon keys) batches that cover exactly them.

    ``retrain_models_job`` trains the cross product of its currencies and horizons, so currencies with the same
    set of degraded horizons go together: usually one batch, never a partition that is not degraded.
    """
    horizons_of: dict[str, set[int]] = {}
    for currency, horizon in degraded.select("currency", "horizon_days").iter_rows():
        horizons_of.setdefault(currency, set()).add(int(horizon))
    batches: dict[tuple[int, ...], list[str]] = {}
    for currency, horizons in sorted(horizons_of.items()):
        batches.setdefault(tuple(sorted(horizons)), []).append(currency)
    return [(currencies, [f"{h}d" for h in horizons]) for horizons, currencies in sorted(batches.items())]


def _has_view(lake: Lake, name: str) -> bool:
    if not lake.warehouse.exists():
        return False
    with duckdb.connect(str(lake.warehouse), read_only=True) as con:
        return bool(con.execute("SELECT count(*) FROM duckdb_views() WHERE view_name = ?", [name]).fetchone()[0])


def load_degradation_inputs(lake: Lake) -> tuple[pl.DataFrame, pl.DataFrame] | str:
    """(prediction_errors, model_metrics) from the warehouse, or the reason they are not there yet.

    Raises ``duckdb.IOException`` when another process holds the warehouse read-write.
    """
    for view in ("prediction_errors", "model_metrics"):
        if not _has_view(lake, view):
            return f"the warehouse has no {view} view yet (materialize the models and predictions first)"
    errors = query(lake, "SELECT league, currency, origin_date, horizon_days, abs_log_error FROM prediction_errors "
                         "WHERE abs_log_error IS NOT NULL")
    metrics = query(lake, "SELECT currency, horizon_days, trained, ensemble_mae_logret, trained_at FROM model_metrics")
    return errors, metrics


# --- the active league ------------------------------------------------------------------------------------------


def active_league_path(lake: Lake) -> Path:
    return lake.state / "active_league.json"


def read_active_league(lake: Lake) -> str | None:
    """The league the league-change sensor last saw as active on poe.watch, or None if it never ran.

    Ingestion polls this league when ``POE_LEAGUE`` is unset. An unreadable file counts as unknown.
    """
    try:
        data = json.loads(active_league_path(lake).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("Ignoring unreadable %s (%s)", active_league_path(lake), exc)
        return None
    league = data.get("league") if isinstance(data, dict) else None
    return league if isinstance(league, str) and league else None


@dataclass(frozen=True)
class LeagueChange:
    previous: str | None
    current: str

    @property
    def changed(self) -> bool:
        return self.previous != self.current


def record_active_league(lake: Lake, league: str, now: datetime | None = None) -> LeagueChange:
    """Store ``league`` as the active one (atomically) when it differs from the stored one; returns the change."""
    if not league:
        raise ValueError("league must be a non-empty name")
    previous = read_active_league(lake)
    if previous != league:
        stamp = (now or datetime.now(UTC)).astimezone(UTC).isoformat()
        history = _league_history(lake) + [{"league": league, "since": stamp, "previous": previous}]
        write_text_atomic(
            json.dumps({"league": league, "since": stamp, "previous": previous, "history": history[-20:]}, indent=2),
            active_league_path(lake),
        )
    return LeagueChange(previous, league)


def _league_history(lake: Lake) -> list[dict]:
    try:
        data = json.loads(active_league_path(lake).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    history = data.get("history") if isinstance(data, dict) else None
    return history if isinstance(history, list) else []


# --- alerts -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Alert:
    """One alert. ``alert_id`` is stable for the same event, so storing it twice stores it once."""

    alert_id: str
    kind: str  # run_failure, circuit_breaker_open, degradation, league_change, model_load_failure, buy_signal
    severity: str  # critical, error, warning, info
    title: str
    message: str
    created_at: str
    details: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


SEVERITIES = ("critical", "error", "warning", "info")


def run_failure_alert(
    run_id: str, job_name: str, error: str, failed_steps: list[str], breaker: dict | None,
    tags: dict | None = None, now: datetime | None = None, dagster_url: str | None = None,
) -> Alert:
    """The alert for a failed run; an open circuit breaker makes it a critical ``circuit_breaker_open`` alert."""
    breaker = dict(breaker or {})
    is_open = breaker.get("state") == "open"
    now = (now or datetime.now(UTC)).astimezone(UTC)
    if is_open:
        title = f"poe.watch circuit breaker is open: {job_name} failed"
        hint = (f"No request goes to poe.watch until {breaker.get('retry_after') or 'the reset timeout'}; check that "
                "the API is reachable. Ingestion resumes on its own with a trial poll.")
    else:
        title = f"{job_name} failed"
        hint = "Open the run in the Dagster UI for the full log; the next scheduled run will try again."
    details = {
        "run_id": run_id, "job_name": job_name, "failed_steps": failed_steps, "circuit_breaker": breaker,
        "tags": dict(tags or {}), "hint": hint,
    }
    if dagster_url:
        details["run_url"] = f"{dagster_url.rstrip('/')}/runs/{run_id}"
    return Alert(
        alert_id=f"{'circuit-breaker-open' if is_open else 'run-failure'}-{run_id}",
        kind="circuit_breaker_open" if is_open else "run_failure",
        severity="critical" if is_open else "error",
        title=title,
        message=error.strip()[:4000] or "the run failed without an error message",
        created_at=now.isoformat(),
        details=details,
    )


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:120]


def alert_path(lake: Lake, alert: Alert) -> Path:
    day = datetime.fromisoformat(alert.created_at).astimezone(UTC).date().isoformat()
    return lake.alerts / f"date={day}" / f"{_safe(alert.alert_id)}.json"


def _stored_ids(lake: Lake) -> set[str]:
    return {p.stem for p in (lake.alerts).glob("date=*/*.json")}


def write_alert(lake: Lake, alert: Alert) -> Path | None:
    """Store the alert as ``alerts/date=<day>/<alert_id>.json``; None when an alert with this id already exists."""
    if alert.severity not in SEVERITIES:
        raise ValueError(f"Unknown severity {alert.severity!r}: choose one of {', '.join(SEVERITIES)}")
    if _safe(alert.alert_id) in _stored_ids(lake):
        return None
    return write_text_atomic(json.dumps(alert.as_dict(), indent=2, default=str), alert_path(lake, alert))


def read_alerts(lake: Lake) -> list[dict]:
    """Every stored alert, oldest first."""
    files = sorted((lake.alerts).glob("date=*/*.json"))
    alerts = [json.loads(p.read_text(encoding="utf-8")) for p in files]
    return sorted(alerts, key=lambda a: a["created_at"])


_EMOJI = {"critical": ":rotating_light:", "error": ":x:", "warning": ":warning:", "info": ":information_source:"}


def webhook_payload(alert: Alert) -> dict:
    """A Slack incoming-webhook message (``text`` plus blocks); other webhooks get the record under ``alert``."""
    lines = [f"{_EMOJI.get(alert.severity, '')} *{alert.title}*", alert.message[:1500]]
    if alert.details.get("hint"):
        lines.append(f"_{alert.details['hint']}_")
    if alert.details.get("run_url"):
        lines.append(f"<{alert.details['run_url']}|Open the run in Dagster>")
    text = "\n".join(line for line in lines if line)
    return {
        "text": text,
        "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": text[:2900]}}],
        "alert": alert.as_dict(),
    }


def post_webhook(url: str, payload: dict, timeout_s: float = 10.0) -> str:
    """POST the payload; returns a one-line outcome. Never raises: the alert is already stored in the lake."""
    host = urlsplit(url).netloc or "the webhook"  # the URL's path is often the secret (Slack): never log it
    try:
        response = requests.post(url, json=payload, timeout=timeout_s)
    except requests.RequestException as exc:
        return f"webhook POST to {host} failed: {type(exc).__name__}"
    if response.status_code >= 400:
        return f"webhook {host} answered HTTP {response.status_code}: {response.text[:200]!r}"
    return f"webhook {host} answered HTTP {response.status_code}"

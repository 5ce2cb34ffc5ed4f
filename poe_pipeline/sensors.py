"""Sensors: new currency partitions, retrains on degradation, the active league, and failure alerts.

Each is a thin wrapper: the decisions live in ``poe_pipeline.monitoring``. Thresholds and the webhook come from the
``monitoring`` resource (``MonitoringResource.from_env``), so the UI shows them and a deployment sets them with
environment variables.
"""

import hashlib
import json
import os
import re
from datetime import UTC, datetime

import dagster as dg
import duckdb

from poe_pipeline import monitoring as mon
from poe_pipeline.assets.features import currency_partitions
from poe_pipeline.jobs import ingestion_job, retrain_models_job
from poe_pipeline.resources import LakeResource, PoeWatchResource
from poe_pipeline.sources.poe_watch import PoeWatchError
from poe_pipeline.training import HORIZON_KEYS


class MonitoringResource(dg.ConfigurableResource):
    """Thresholds of the sensors and where alerts go besides the lake."""

    degradation_factor: float = mon.DEFAULT_DEGRADATION_FACTOR
    degradation_window_days: int = mon.DEFAULT_DEGRADATION_WINDOW_DAYS
    degradation_min_errors: int = mon.DEFAULT_MIN_ERRORS
    retrain_cooldown_hours: float = mon.DEFAULT_RETRAIN_COOLDOWN_HOURS
    webhook_url: str = ""  # Slack incoming webhook or any JSON webhook; empty: alerts are only logged and stored
    dagster_url: str = ""  # the UI's base URL, for links in alerts

    @classmethod
    def from_env(cls) -> "MonitoringResource":
        """``POE_DEGRADATION_FACTOR``, ``POE_DEGRADATION_WINDOW_DAYS``, ``POE_DEGRADATION_MIN_ERRORS``,
        ``POE_RETRAIN_COOLDOWN_HOURS``, ``POE_ALERT_WEBHOOK_URL`` (a secret: read when the sensor runs, never shown
        in the UI) and ``POE_DAGSTER_URL``."""
        env = os.environ
        return cls(
            degradation_factor=float(env.get("POE_DEGRADATION_FACTOR") or mon.DEFAULT_DEGRADATION_FACTOR),
            degradation_window_days=int(
                env.get("POE_DEGRADATION_WINDOW_DAYS") or mon.DEFAULT_DEGRADATION_WINDOW_DAYS),
            degradation_min_errors=int(env.get("POE_DEGRADATION_MIN_ERRORS") or mon.DEFAULT_MIN_ERRORS),
            retrain_cooldown_hours=float(
                env.get("POE_RETRAIN_COOLDOWN_HOURS") or mon.DEFAULT_RETRAIN_COOLDOWN_HOURS),
            webhook_url=dg.EnvVar("POE_ALERT_WEBHOOK_URL") if env.get("POE_ALERT_WEBHOOK_URL") else "",
            dagster_url=env.get("POE_DAGSTER_URL", ""),
        )

    def rules(self) -> mon.DegradationRules:
        return mon.DegradationRules(
            factor=self.degradation_factor,
            window_days=self.degradation_window_days,
            min_errors=self.degradation_min_errors,
            cooldown_hours=self.retrain_cooldown_hours,
        )

    def dispatch(self, alert: mon.Alert, lake: LakeResource, log) -> str:
        """Store the alert in the lake, log its webhook payload, and POST it when a webhook is configured."""
        path = mon.write_alert(lake.lake, alert)
        if path is None:
            return f"alert {alert.alert_id} was already stored"
        payload = mon.webhook_payload(alert)
        log.warning(f"ALERT {alert.severity}: {alert.title} -> {path}\nwebhook payload: {json.dumps(payload)}")
        if self.webhook_url:
            outcome = mon.post_webhook(self.webhook_url, payload)
            log.info(outcome)
            return f"stored {path}; {outcome}"
        return f"stored {path}; no webhook configured (set POE_ALERT_WEBHOOK_URL)"


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str, sort_keys=True).encode()).hexdigest()[:16]


def retrain_run_config(currencies: list[str], horizons: list[str], retrain_global: bool = True) -> dict:
    return {"ops": {"retrain_partitions": {"config": {"currencies": currencies, "horizons": horizons,
                                                      "retrain_global": retrain_global}}}}


@dg.sensor(
    name="new_currency_partitions",
    job=retrain_models_job,
    minimum_interval_seconds=300,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Adds a `currency` partition for every currency the stored currency_universe marks eligible (in any "
    "league) and requests a training run for the new ones. Never removes a partition.",
)
def new_currency_partitions(context: dg.SensorEvaluationContext, lake: LakeResource):
    eligible = mon.eligible_currencies(lake.lake)
    if not eligible:
        return dg.SkipReason("No eligible currency in <lake>/currency_universe yet: materialize currency_universe")
    new = mon.missing_partitions(eligible, context.instance.get_dynamic_partitions(currency_partitions.name))
    if not new:
        return dg.SkipReason(f"All {len(eligible)} eligible currencies already are partitions")
    context.log.info(f"Adding {len(new)} currency partition(s): {', '.join(new)}")
    return dg.SensorResult(
        dynamic_partitions_requests=[currency_partitions.build_add_request(new)],
        run_requests=[dg.RunRequest(
            run_key=f"new-currencies-{_key(new)}",
            # the global models already forecast them: the new partitions only specialise the current champions
            run_config=retrain_run_config(new, list(HORIZON_KEYS), retrain_global=False),
            tags={"poe/trigger": "new_currencies"},
        )],
    )


@dg.sensor(
    name="model_degradation",
    job=retrain_models_job,
    minimum_interval_seconds=3600,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Requests a retrain of the currency_models partitions whose realized error over the last 7 days "
    "(prediction_errors) exceeds their validation error (model_metrics) by the configured factor (1.5x).",
)
def model_degradation(context: dg.SensorEvaluationContext, lake: LakeResource, monitoring: MonitoringResource):
    store = lake.lake
    try:
        loaded = mon.load_degradation_inputs(store)
    except duckdb.IOException as exc:
        return dg.SkipReason(f"warehouse.duckdb is locked by a writer; trying again next tick ({exc})")
    if isinstance(loaded, str):
        return dg.SkipReason(f"No verdict: {loaded}")
    errors, metrics = loaded
    rules = monitoring.rules()
    report = mon.degradation_report(errors, metrics, rules)
    degraded = mon.degraded_partitions(report, rules)
    if degraded.height == 0:
        worst = report.row(0, named=True) if report.height else None
        detail = (f"; worst: {worst['currency']} {worst['horizon_days']}d at {worst['ratio']:.2f}x validation"
                  if worst else "")
        return dg.SkipReason(f"No partition over {rules.factor}x its validation error in the {rules.window_days} "
                             f"days to {report['window_end'].max() if report.height else 'now'}{detail}")
    window_end = degraded["window_end"].max()
    requests = []
    for currencies, horizons in mon.retrain_batches(degraded):
        requests.append(dg.RunRequest(
            run_key=f"degradation-{window_end}-{_key(currencies, horizons)}",
            run_config=retrain_run_config(currencies, horizons),
            tags={"poe/trigger": "degradation", "poe/window_end": str(window_end)},
        ))
    rows = degraded.select("currency", "horizon_days", "errors", "realized_mae", "validation_mae", "ratio")
    alert = mon.Alert(
        alert_id=f"degradation-{window_end}-{_key(sorted(rows.select('currency', 'horizon_days').rows()))}",
        kind="degradation", severity="warning",
        title=f"{degraded.height} model partition(s) degraded: retrain requested",
        message="; ".join(f"{r['currency']} {r['horizon_days']}d: realized MAE {r['realized_mae']:.4f} = "
                          f"{r['ratio']:.2f}x validation {r['validation_mae']:.4f} ({r['errors']} forecasts)"
                          for r in rows.iter_rows(named=True)),
        created_at=datetime.now(UTC).isoformat(),
        details={"window_end": str(window_end), "factor": rules.factor, "partitions": rows.to_dicts()},
    )
    context.log.info(monitoring.dispatch(alert, lake, context.log))
    return requests


@dg.sensor(
    name="league_change",
    job=ingestion_job,
    minimum_interval_seconds=600,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Polls poe.watch /leagues; when the active challenge league changes it records it in "
    "<lake>/state/active_league.json (ingestion polls that league when POE_LEAGUE is unset) and requests a poll.",
)
def league_change(context: dg.SensorEvaluationContext, lake: LakeResource, poe_watch: PoeWatchResource):
    store = lake.lake
    client = poe_watch.client(store)
    try:
        active = client.active_challenge_league()
    except PoeWatchError as exc:
        return dg.SkipReason(f"Could not read the active league: {exc}")
    finally:
        client.close()
    change = mon.record_active_league(store, active)
    if not change.changed:
        return dg.SkipReason(f"The active league is still {active}")
    pinned = f" (POE_LEAGUE pins ingestion to {poe_watch.league})" if poe_watch.league else ""
    context.log.info(f"Active league changed from {change.previous or 'unknown'} to {active}{pinned}")
    return dg.RunRequest(run_key=f"league-{active}", tags={"poe/trigger": "league_change", "poe/league": active})


def _step_errors(context: dg.RunFailureSensorContext) -> tuple[list[str], list[str]]:
    steps, messages = [], []
    for event in context.get_step_failure_events():
        steps.append(event.step_key or "")
        error = getattr(event.event_specific_data, "error", None)
        text = re.sub(r"^[\w.]+(Error|Failure|Exception): ", "", error.message.strip()) if error else event.message
        messages.append(f"{event.step_key}: {text}")
    return steps, messages


@dg.run_failure_sensor(
    name="failure_alerts",
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Writes an alert record under <lake>/alerts/ for every failed run of this code location (a critical "
    "one when the poe.watch circuit breaker is open), logs the Slack/webhook payload, and POSTs it when "
    "POE_ALERT_WEBHOOK_URL is set.",
)
def failure_alerts(
    context: dg.RunFailureSensorContext, lake: LakeResource, poe_watch: PoeWatchResource,
    monitoring: MonitoringResource,
):
    run = context.dagster_run
    steps, messages = _step_errors(context)
    client = poe_watch.client(lake.lake)  # reads the breaker's state file; sends no request
    try:
        breaker = client.breaker_status()
    finally:
        client.close()
    alert = mon.run_failure_alert(
        run_id=run.run_id, job_name=run.job_name, error="\n".join(messages) or context.failure_event.message or "",
        failed_steps=steps, breaker=breaker,
        tags={k: v for k, v in run.tags.items() if k.startswith(("poe/", "dagster/schedule", "dagster/sensor"))},
        dagster_url=monitoring.dagster_url or None,
    )
    context.log.info(monitoring.dispatch(alert, lake, context.log))


SENSORS = [new_currency_partitions, model_degradation, league_change, failure_alerts]

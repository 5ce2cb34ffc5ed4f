"""Alerts: every failed run of this code location becomes an alert in the lake, the log and, when configured, a
webhook (Slack or any JSON endpoint). On by default.

| definition | what it does |
| --- | --- |
| ``failure_alerts`` | a run-failure sensor; a critical alert when the poe.watch circuit breaker is open |
"""

import re

import dagster as dg

from poe_pipeline import monitoring as mon
from poe_pipeline.resources import LakeResource, MonitoringResource, PoeWatchResource


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
    description="Writes an alert record under the lake's alerts/ for every failed run of this code location (a "
    "critical one when the poe.watch circuit breaker is open), logs the Slack/webhook payload, and POSTs it when "
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


defs = dg.Definitions(sensors=[failure_alerts])

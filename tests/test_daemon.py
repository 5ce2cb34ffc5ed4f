"""The real daemon: `dagster-daemon run` on this project launches the 5-minute schedule's run, which polls a replay
server on loopback and appends a snapshot to a temporary lake. Once on the default SQLite instance, once on the
production PostgreSQL instance (deploy/dagster.yaml).

How it stays under a minute without waiting for a 5-minute boundary: the schedule is turned on with the real CLI
(`dagster schedule start`), and its start time is then moved 6 minutes back, as if the daemon had been down since
then. The daemon's scheduler does what it does after any outage: it launches the latest missed tick (a job without
partitions catches up one tick only) at once. Everything after that is the production path: the tick is recorded,
the run is queued, the run coordinator dequeues it under the tag limits, the run launcher starts it in a new process,
the asset polls the replay server and writes the snapshot keyed by the tick's scheduled time. The freshness daemon
then evaluates the snapshot's freshness policy.
"""

import shutil
import subprocess
import time
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest
from dagster._core.definitions.freshness import FreshnessState
from dagster._core.scheduler.instigation import InstigatorType, ScheduleInstigatorData
from dagster._core.storage.tags import SCHEDULED_EXECUTION_TIME_TAG
from e2e.postgres import start_server
from e2e.processes import BIN, REPO, base_env, start, stop, wait_for

from conftest import SAMPLE
from poe_pipeline.assets.ingestion import SCHEDULED_TIME_TAG, ingestion_every_5_minutes
from poe_pipeline.ingestion import read_snapshots
from poe_pipeline.lake import Lake
from poe_pipeline.sources.replay import ReplayServer

pytestmark = pytest.mark.slow
OUTAGE = timedelta(minutes=6)


@pytest.fixture(params=["sqlite", "postgres"])
def instance_config(request, tmp_path):
    """(DAGSTER_HOME, extra environment) for the default instance or the production one."""
    home = tmp_path / "dagster_home_daemon"
    home.mkdir()
    if request.param == "sqlite":
        shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
        yield home, {}
        return
    request.applymarker(pytest.mark.postgres)
    server = start_server()
    try:
        shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
        yield home, {"DAGSTER_PG_URL": server.create_database("dagster")}
    finally:
        server.stop()


def _rewind_schedule_start(instance: dg.DagsterInstance, by: timedelta) -> None:
    (state,) = [s for s in instance.all_instigator_state(instigator_type=InstigatorType.SCHEDULE)
                if s.name == ingestion_every_5_minutes.name]
    data = state.instigator_data
    started = datetime.now(UTC) - by
    instance.update_instigator_state(state.with_data(ScheduleInstigatorData(
        cron_schedule=data.cron_schedule, start_timestamp=started.timestamp())))


def test_daemon_launches_the_scheduled_ingestion(instance_config, tmp_path, monkeypatch):
    home, extra = instance_config
    lake = Lake(tmp_path / "lake")
    with ReplayServer(SAMPLE, "Sanctum", start_day=30) as replay:
        env = base_env(home, lake.root, POE_WATCH_URL=replay.url, POE_LEAGUE="Sanctum",
                       FRESHNESS_DAEMON_INTERVAL_SECONDS="3", **extra)
        for key, value in extra.items():
            monkeypatch.setenv(key, value)
        started = subprocess.run([str(BIN / "dagster"), "schedule", "start", ingestion_every_5_minutes.name, "-w",
                                  "workspace.yaml"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr
        _keep_clear_of_a_slot_boundary()
        with dg.DagsterInstance.from_config(str(home)) as instance:
            _rewind_schedule_start(instance, OUTAGE)
            log = tmp_path / "daemon.log"
            daemon = start([str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"], env=env, log=log)
            try:
                def scheduled_run():
                    runs = instance.get_runs(filters=dg.RunsFilter(
                        tags={"dagster/schedule_name": ingestion_every_5_minutes.name}))
                    if runs and runs[0].status == dg.DagsterRunStatus.FAILURE:
                        raise AssertionError(f"the scheduled run failed:\n{_run_errors(instance, runs[0])}")
                    return runs[0] if runs and runs[0].status == dg.DagsterRunStatus.SUCCESS else None

                run = wait_for(scheduled_run, 120, "the scheduled ingestion run to succeed", process=daemon, log=log)
                tick = datetime.fromisoformat(run.tags[SCHEDULED_EXECUTION_TIME_TAG])  # set by Dagster's scheduler
                assert run.tags[SCHEDULED_TIME_TAG] == tick.isoformat()  # set by our schedule, read by the asset
                assert datetime.now(UTC) - OUTAGE - timedelta(minutes=1) <= tick <= datetime.now(UTC)
                assert tick.minute % 5 == 0 and tick.second == 0
                assert run.tags["poe/queue"] == "ingestion"  # so the queue's limit of one applied to it

                snapshots = read_snapshots(lake)
                assert snapshots.height > 100, "the run appended no snapshot"
                assert snapshots["polled_at"].unique().to_list() == [tick]
                assert set(snapshots["league"]) == {"Sanctum"} and replay.request_count("/get") == 2

                key = dg.AssetKey("price_snapshots")

                def freshness():
                    record = instance.get_freshness_state_records([key]).get(key)
                    return record if record and record.freshness_state == FreshnessState.PASS else None

                wait_for(freshness, 60, "the freshness daemon to find price_snapshots fresh", process=daemon, log=log)
                assert len(instance.get_runs()) == 1  # one tick, one run
            finally:
                stop(daemon)


def _keep_clear_of_a_slot_boundary(margin_s: float = 60) -> None:
    """Start the daemon well inside a 5-minute slot, so its tick and its run fall in the same slot even where the
    asset keys the poll by the time it runs rather than by the tick (see test_automation's strict xfail)."""
    to_boundary = 300 - time.time() % 300
    if to_boundary < margin_s:
        time.sleep(to_boundary + 1)


def _run_errors(instance: dg.DagsterInstance, run) -> str:
    records = instance.all_logs(run.run_id)
    return "\n".join(r.message or "" for r in records if r.level >= 40)[-3000:] or f"run {run.run_id}"


"""Processes killed with SIGKILL: a training session's worker processes die with it, and the MLflow run it left
RUNNING is marked FAILED by the next session. Real subprocesses, real signals, a real MLflow store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import dagster as dg
import psutil
import pytest
import yaml
from e2e.processes import BIN, base_env, start, stop, wait_for

from conftest import REPO, SAMPLE
from poe_pipeline.assets.ingestion import ingestion_job
from poe_pipeline.lake import Lake
from poe_pipeline.monitoring import read_alerts
from poe_pipeline.sources.replay import ReplayServer
from poe_pipeline.tracking import OWNER_PID_TAG, ModelTracker

TRAIN = textwrap.dedent("""
    import sys
    from pathlib import Path

    import polars as pl

    from poe_pipeline.features import FEATURE_COLUMNS, build_features
    from poe_pipeline.lake import Lake
    from poe_pipeline.leagues import league_calendar, training_leagues
    from poe_pipeline.prices import daily_from_dump_rows, merge_daily_prices
    from poe_pipeline.settings import get_profile
    from poe_pipeline.sources.poe_ninja import read_dump
    from poe_pipeline.training import train_globals

    sample, lake = Path(sys.argv[1]), Lake(Path(sys.argv[2]))
    prices = merge_daily_prices(daily_from_dump_rows(pl.concat(
        [read_dump(sample / f"{league}.currency.csv.gz") for league in ("Sentinel", "Kalandra", "Sanctum")])))
    calendar = league_calendar(prices)
    order = training_leagues(calendar, "Sanctum")
    train_globals(lake, build_features(prices, calendar), FEATURE_COLUMNS, (1, 3), order, "Sanctum", ["Divine Orb"],
                  get_profile("dev"), {}, workers=2, progress=lambda _: None)
""")


def _workers(parent: psutil.Process) -> list[psutil.Process]:
    try:
        return [p for p in parent.children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
    except psutil.NoSuchProcess:
        return []


def _busy(workers: list[psutil.Process]) -> bool:
    try:
        return all(p.cpu_times().user > 3 for p in workers)
    except psutil.NoSuchProcess:
        return False


def test_a_killed_training_takes_its_workers_along_and_its_run_is_failed_later(tmp_path):
    lake = Lake(tmp_path / "lake")
    trainer = subprocess.Popen([sys.executable, "-c", TRAIN, str(SAMPLE), str(lake.root)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        parent = psutil.Process(trainer.pid)
        # both workers busy training (the dev profile's 50 trials keep them at it for minutes)
        workers = wait_for(lambda: (w if len(w := _workers(parent)) == 2 and _busy(w) else None), 180,
                           "two training workers at work", interval=0.2, process=trainer)
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait(timeout=10)
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"workers outlived their killed parent: {[p.pid for p in alive]}"
    finally:
        if trainer.poll() is None:
            trainer.kill()

    tracker = ModelTracker(lake)
    (running,) = tracker.client.search_runs([tracker.experiment_id], "attributes.status = 'RUNNING'")
    assert running.data.tags[OWNER_PID_TAG] == str(trainer.pid)
    assert tracker.fail_stale_runs() == [running.info.run_id]
    run = tracker.client.get_run(running.info.run_id)
    assert run.info.status == "FAILED" and "died" in run.data.tags["poe.failure"]
    assert tracker.fail_stale_runs() == []  # a run still owned by a live process is never touched


def _run_processes(daemon: subprocess.Popen) -> list[psutil.Process] | None:
    """The code server the daemon started and the run worker it spawned for the one run (``StartRun``), once the
    worker exists: killing both is what a crash of the machine's process tree does to a run."""
    try:
        servers = [p for p in psutil.Process(daemon.pid).children(recursive=True)
                   if "api grpc" in " ".join(p.cmdline())]
        for server in servers:
            workers = [p for p in server.children() if "spawn_main" in " ".join(p.cmdline())]
            if workers:
                return [*workers, server]
    except psutil.NoSuchProcess:
        pass
    return None


@pytest.mark.slow
def test_a_killed_ingestion_run_is_failed_by_run_monitoring_and_alerted(tmp_path):
    """The real daemon launches an ingestion run whose poll hangs; its worker is killed with SIGKILL. Run monitoring
    (dagster.yaml, with shorter intervals here) cancels it past its maximum runtime, fails it when the dead worker
    never answers, and the failure sensor writes the alert, so the 5-minute schedule is free to poll again."""
    home = tmp_path / "dagster_home_daemon"
    home.mkdir()
    config = yaml.safe_load((REPO / "dagster.yaml").read_text())
    assert config["run_monitoring"]["enabled"] and float(ingestion_job.tags["dagster/max_runtime"]) < 300
    config["run_monitoring"].update(poll_interval_seconds=2, cancel_timeout_seconds=5)
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    with dg.DagsterInstance.from_config(str(home)):  # created once, before two processes open it at the same time
        pass
    lake = Lake(tmp_path / "lake")
    with ReplayServer(SAMPLE, "Sanctum", start_day=20) as replay:
        replay.inject(*["timeout:60"] * 4)  # every attempt of the poll hangs: the run is in progress when killed
        env = base_env(home, lake.root, POE_WATCH_URL=replay.url, POE_LEAGUE="Sanctum")
        daemon = start([str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"], env=env,
                       log=tmp_path / "daemon.log")
        try:
            launched = subprocess.run(
                [str(BIN / "dagster"), "job", "launch", "-w", "workspace.yaml", "-j", "ingestion_job",
                 "--tags", json.dumps({"dagster/max_runtime": "10"})],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
            assert launched.returncode == 0, launched.stdout + launched.stderr
            with dg.DagsterInstance.from_config(str(home)) as instance:
                (run,) = instance.get_runs()
                wait_for(lambda: instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED, 120,
                         "the run to start", process=daemon, log=tmp_path / "daemon.log")
                for process in wait_for(lambda: _run_processes(daemon), 60, "the run's worker process",
                                        process=daemon, log=tmp_path / "daemon.log"):
                    os.kill(process.pid, signal.SIGKILL)

                def ended():
                    status = instance.get_run_by_id(run.run_id).status
                    return status if status in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED) else None

                assert wait_for(ended, 120, "run monitoring to end the killed run", process=daemon,
                                log=tmp_path / "daemon.log") == dg.DagsterRunStatus.FAILURE
                alerts = wait_for(lambda: [a for a in read_alerts(lake) if a["details"].get("run_id") == run.run_id],
                                  120, "the failure alert", process=daemon, log=tmp_path / "daemon.log")
                assert alerts[0]["kind"] == "run_failure"
        finally:
            stop(daemon)


@pytest.fixture(autouse=True)
def _no_stray_processes():
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    stray = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    for p in stray:
        p.kill()
    assert not stray, f"the test left processes behind: {[p.pid for p in stray]}"

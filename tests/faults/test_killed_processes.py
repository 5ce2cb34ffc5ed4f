"""Processes killed with SIGKILL: a training session's worker processes die with it, and the MLflow run it left
RUNNING is marked FAILED by the next session. Real subprocesses, real signals, a real MLflow store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest
import yaml
from e2e.processes import wait_for

from conftest import REPO, SAMPLE
from poe_pipeline.assets.ingestion import ingestion_job
from poe_pipeline.lake import Lake
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


def test_a_run_left_started_by_a_killed_ingestion_is_failed_by_run_monitoring():
    """The daemon's run monitoring cancels an ingestion run that outlives its maximum runtime; a worker killed
    with SIGKILL never answers the cancel, so after the cancel timeout the run is marked failed, the failure sensor
    alerts, and the 5-minute schedule (which skips while a run is in progress) polls again."""
    config = yaml.safe_load((REPO / "dagster.yaml").read_text())["run_monitoring"]
    max_runtime = float(ingestion_job.tags["dagster/max_runtime"])
    assert config["enabled"] and max_runtime < 300  # a poll takes seconds; the next tick is 5 minutes away
    worst = max_runtime + config["poll_interval_seconds"] + config["cancel_timeout_seconds"]
    assert worst <= 15 * 60, f"a killed run blocks polling for up to {worst} s"


@pytest.fixture(autouse=True)
def _no_stray_processes():
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    stray = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    for p in stray:
        p.kill()
    assert not stray, f"the test left processes behind: {[p.pid for p in stray]}"

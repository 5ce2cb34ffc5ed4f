"""Runs that start at the same moment on a brand-new lake: real processes, a real loopback server."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from conftest import REPO, SAMPLE
from poe_pipeline.lake import Lake
from poe_pipeline.sources.replay import ReplayServer


def test_three_ingestions_at_once_on_a_fresh_lake_end_cleanly_with_one_poll(tmp_path):
    """Each process creates the Dagster instance; unguarded, their schema migrations race and one crashes
    ("alembic_version has more than one head"). The lake keeps one poll of the slot."""
    to_boundary = 300 - time.time() % 300  # all three in one 5-minute slot
    if to_boundary < 60:
        time.sleep(to_boundary + 1)
    lake = Lake(tmp_path / "lake")
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}  # the instance under the fresh lake
    with ReplayServer(SAMPLE, "Sanctum", start_day=20, speed=0) as replay:
        command = [sys.executable, "-m", "poe_pipeline.cli", "ingest", "--league", "Sanctum", "--url", replay.url,
                   "--lake", str(lake.root)]
        processes = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True) for _ in range(3)]
        outputs = [p.communicate(timeout=300) for p in processes]
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-3000:]
        assert "Traceback" not in err
    snapshots = list(lake.poe_watch_raw.rglob("*.parquet"))
    assert len(snapshots) == 1
    assert sorted("already stored" in out for out, _ in outputs) == [False, True, True]
    assert (lake.dagster_home / "dagster.yaml").exists()

"""The feature store over every development league.

The input, built untimed in each process, is the ``daily_prices`` of all development dumps (24 leagues, or the
bundled subset), the same rows ``refresh_daily_prices`` writes.

- ``features_compute``: ``build_features`` alone, in memory. ``rows_per_s`` = feature rows out / wall seconds
  of the first (cold) call in the process; ``warm_rows_per_s`` is a second call.
- ``features_rebuild``: a full rebuild into an empty lake: ``league_calendar`` plus ``update_features``
  (fingerprints, compute, one zstd Parquet file per league, atomic writes).

Targets (from the issue): >= 1,000,000 feature rows/s of compute; full rebuild < 10 s.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import polars as pl

from benchmarks.harness import check_target, development_dumps_dir, measure, timed
from poe_pipeline.features import build_features, update_features
from poe_pipeline.history import find_dumps
from poe_pipeline.lake import Lake
from poe_pipeline.leagues import league_calendar
from poe_pipeline.prices import daily_from_dump_rows, merge_daily_prices
from poe_pipeline.sources.poe_ninja import read_dump


def development_daily_prices() -> pl.DataFrame:
    directory, _ = development_dumps_dir()
    dumps = find_dumps([directory])
    if not dumps:
        raise RuntimeError(f"no poe.ninja dumps in {directory}")
    return merge_daily_prices(daily_from_dump_rows(pl.concat([read_dump(p) for p in dumps])))


def compute() -> dict:
    daily = development_daily_prices()
    calendar = league_calendar(daily)
    out, wall, cpu = timed(lambda: build_features(daily, calendar))
    _, warm_wall, _ = timed(lambda: build_features(daily, calendar))
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "rows_in": daily.height,
        "rows_out": out.height,
        "columns_out": out.width,
        "leagues": daily["league"].n_unique(),
        "rows_per_s": out.height / wall,
        "warm_wall_s": warm_wall,
        "warm_rows_per_s": out.height / warm_wall,
    }


def rebuild() -> dict:
    daily = development_daily_prices()
    root = Path(tempfile.mkdtemp(prefix="bench-features-"))
    try:
        lake = Lake(root)
        paths, wall, cpu = timed(lambda: update_features(daily, league_calendar(daily), lake))
        if len(paths) != daily["league"].n_unique():
            raise RuntimeError(f"rebuild wrote {len(paths)} files for {daily['league'].n_unique()} leagues")
        return {
            "wall_s": wall,
            "cpu_s": cpu,
            "files": len(paths),
            "parquet_mb": sum(p.stat().st_size for p in paths) / 2**20,
            "rows_out": sum(pl.scan_parquet(p).select(pl.len()).collect().item() for p in paths),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(repeats: int) -> dict:
    comp = measure("features_compute", compute, repeats)
    full = measure("features_rebuild", rebuild, repeats)
    for summary in (comp, full):
        summary["dumps"] = development_dumps_dir()[1]
    issue = "issue: >= 1,000,000 feature rows/s of compute; full rebuild < 10 s"
    return {
        "results": {"compute": comp, "rebuild": full},
        "targets": {
            "compute_rows_per_s": check_target(comp, "rows_per_s", ">=", 1_000_000, issue),
            "full_rebuild_s": check_target(full, "wall_s", "<", 10.0, issue),
        },
    }

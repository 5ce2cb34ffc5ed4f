"""Importing every development dump into a fresh lake, then rebuilding ``daily_prices``.

The dumps are the 24 leagues of ``../shared/data/poe-ninja-dumps`` (the bundled ``sample_data`` subset when
that is absent). ``wall_s``/``cpu_s`` cover ``import_dumps`` plus ``refresh_daily_prices``: the whole import a
first ``historical_prices`` + ``daily_prices`` materialization does. ``reimport_*`` is the same import again
(every file already there: hashing only), as each later run does.

Target (from the issue): whole import < 15 s.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from benchmarks.harness import check_target, development_dumps_dir, measure, timed
from poe_pipeline.history import find_dumps, import_dumps
from poe_pipeline.lake import Lake
from poe_pipeline.prices import refresh_daily_prices


def import_all() -> dict:
    directory, _ = development_dumps_dir()
    dumps = find_dumps([directory])
    if not dumps:
        raise RuntimeError(f"no poe.ninja dumps in {directory}")
    root = Path(tempfile.mkdtemp(prefix="bench-history-"))
    try:
        lake = Lake(root)
        report, import_wall, import_cpu = timed(lambda: import_dumps(lake, dumps))
        if report.rejected:
            raise RuntimeError(f"dumps rejected: {report.rejected}")
        written, daily_wall, daily_cpu = timed(lambda: refresh_daily_prices(lake))
        again, reimport_wall, reimport_cpu = timed(lambda: import_dumps(lake, dumps))
        if again.imported or len(again.already_imported) != len(dumps):
            raise RuntimeError(f"re-import was not a no-op: {again.imported}")
        return {
            "wall_s": import_wall + daily_wall,
            "cpu_s": import_cpu + daily_cpu,
            "import_wall_s": import_wall,
            "import_cpu_s": import_cpu,
            "daily_prices_wall_s": daily_wall,
            "daily_prices_cpu_s": daily_cpu,
            "reimport_wall_s": reimport_wall,
            "dump_files": len(dumps),
            "dumps_mb": sum(p.stat().st_size for p in dumps) / 2**20,
            "leagues": len(report.leagues),
            "rows_imported": report.rows_imported,
            "daily_price_rows": sum(written.values()),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(repeats: int) -> dict:
    summary = measure("history_import", import_all, repeats)
    summary["dumps"] = development_dumps_dir()[1]
    return {
        "results": {"import": summary},
        "targets": {
            "whole_import_s": check_target(summary, "wall_s", "<", 15.0, "issue: whole import < 15 s"),
        },
    }

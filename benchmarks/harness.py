"""Runs each benchmark case in a fresh process, several times: median, min and max, plus peak RSS.

A fresh process per repeat keeps one case's caches and memory out of the next
one's numbers; peak RSS is the child's own ``ru_maxrss``.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
SHARED_DUMPS = REPO.parent / "shared" / "data" / "poe-ninja-dumps"
SAMPLE = REPO / "sample_data"


def development_dumps_dir() -> tuple[Path, str]:
    """All 24 development dumps when they are beside the repo (the developers' machines), else the bundled subset;
    ``POE_BENCH_DUMPS=sample_data`` forces the bundled subset."""
    if os.environ.get("POE_BENCH_DUMPS") == "sample_data":
        return SAMPLE, "sample_data (bundled subset)"
    if SHARED_DUMPS.is_dir():
        return SHARED_DUMPS, "shared/data/poe-ninja-dumps (24 leagues)"
    return SAMPLE, "sample_data (bundled subset)"


def _child(fn: Callable[[], dict], queue) -> None:
    try:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        extra = fn() or {}
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        extra.setdefault("wall_s", wall)
        extra.setdefault("cpu_s", cpu)
        extra["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        queue.put(("ok", extra))
    except BaseException as exc:  # report, don't hang the parent
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def measure(name: str, fn: Callable[[], dict], repeats: int = 3) -> dict:
    """``fn`` (a module-level function) does the work once and may return extra figures."""
    ctx = mp.get_context("spawn")  # a clean interpreter: no inherited threads or caches
    runs: list[dict] = []
    for i in range(repeats):
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(fn, queue))
        proc.start()
        status, payload = queue.get()
        proc.join()
        if status != "ok":
            raise RuntimeError(f"benchmark {name} failed: {payload}")
        runs.append(payload)
        print(f"  {name} [{i + 1}/{repeats}] {payload['wall_s']:.3f}s", file=sys.stderr)
    summary: dict = {"name": name, "repeats": repeats}
    for key in runs[0]:
        values = [r[key] for r in runs if isinstance(r.get(key), int | float)]
        if len(values) == len(runs):
            summary[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        else:
            summary[key] = runs[-1][key]
    return summary


def machine() -> dict:
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.now(UTC).date().isoformat(),
    }


def write_results(results: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{datetime.now(UTC).date().isoformat()}.json"
    existing = json.loads(path.read_text()) if path.exists() else {}
    existing.update(results)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(existing, indent=2, default=str))
    os.replace(tmp, path)
    return path


T = TypeVar("T")


def timed(fn: Callable[[], T]) -> tuple[T, float, float]:
    """``fn()``'s result, wall seconds and CPU seconds (``process_time``: every thread of this process)."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall0, time.process_time() - cpu0


_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def check_target(summary: dict, metric: str, op: str, limit: float, source: str = "") -> dict:
    """Judge the median of ``summary[metric]`` (a ``measure`` result) against ``op limit``."""
    value = summary[metric]["median"] if isinstance(summary[metric], dict) else summary[metric]
    return {
        "metric": f"{summary['name']}.{metric} (median)",
        "value": value,
        "target": f"{op} {limit:g}",
        "met": bool(_OPS[op](value, limit)),
        **({"source": source} if source else {}),
    }

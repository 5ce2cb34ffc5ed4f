"""Training the per-(currency, horizon) ensembles on every development league (current league: the newest).

Setup, untimed in each fresh process: the ``daily_prices`` of all development dumps, their ``league_calendar``,
``build_features`` (or ``update_features`` into a temporary lake) and the ``test``-profile currency universe.

- ``partition_test_<currency>_7d``: ``train_partition`` of one (currency, 7d) in the ``test`` profile, in-process,
  for Divine Orb and for the most liquid eligible currency after it. ``wall_s`` is the partition's own
  ``PartitionResult.seconds`` (tuning, validation, final fit, artifacts).
- ``partition_prod_divine_orb_7d``: the same in the ``prod`` profile (200 Optuna trials, 5 folds). It is slow, so
  it always runs once whatever ``--repeats`` says (``repeats`` is 1 in its summary).
- ``retrain_30x3_test``: ``train_many`` of the 30 most liquid eligible currencies x 1/3/7d in the ``test`` profile
  with 2 worker processes, including every MLflow write (one run per partition, registration, champion alias)
  into a temporary lake's SQLite tracking store. ``wall_s`` is the ``train_many`` call.

"Most liquid": poe.ninja dumps carry no trade volume, so currencies eligible in the current league are ranked by
their High/Medium-confidence share over its last 14 days, then by days observed in the league, then by median
price (descending), then by name; the first 30 are taken.

Memory: ``peak_rss_mb`` is the measuring process's own peak (the parent of the pool). Sampled every 0.2 s with
psutil: ``workers_peak_rss_mb``, the largest RSS of one worker, and ``sampled_total_rss_mb``, the largest sum of
the parent's and its live children's RSS (the machine-wide footprint of a retrain). ``children_ru_maxrss_mb`` is
``getrusage(RUSAGE_CHILDREN)``: an upper bound only, as a spawned worker is forked (at the parent's size) before
it execs. ``loadavg_*`` is ``os.getloadavg()`` (1, 5, 15 min)
before and after each case: the machine has 2 cores and other jobs may be running.

Targets (from the issue): 30 x 3 partitions in the test profile < 5 min; < 60 s per partition in prod;
< 2 GB peak memory.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import polars as pl
import psutil

from benchmarks.bench_features import development_daily_prices
from benchmarks.harness import check_target, development_dumps_dir, measure
from poe_pipeline.names import slug

RETRAIN_CURRENCIES = 30
RETRAIN_WORKERS = 2
HORIZON = 7
FIRST_CURRENCY = "Divine Orb"


def loadavg(prefix: str) -> dict[str, float]:
    one, five, fifteen = os.getloadavg()
    return {f"{prefix}_1m": one, f"{prefix}_5m": five, f"{prefix}_15m": fifteen}


def liquid_currencies(daily: pl.DataFrame, calendar: pl.DataFrame, league: str, n: int) -> list[str]:
    """The ``n`` most liquid currencies eligible in ``league`` (test profile; the rule is in the docstring)."""
    from poe_pipeline.universe import currency_universe

    universe = currency_universe(daily, calendar, league).filter(pl.col("eligible"))
    ranked = universe.sort(
        ["good_confidence_share", "current_days", "median_price_chaos", "currency"],
        descending=[True, True, True, False],
    )
    if ranked.height < n:
        raise RuntimeError(f"only {ranked.height} eligible currencies in {league}, the bench needs {n}")
    return ranked["currency"].head(n).to_list()


class Context:
    """The development data every case starts from: prices, calendar, current league, training leagues."""

    def __init__(self) -> None:
        from poe_pipeline.leagues import current_league_of, league_calendar, training_leagues

        self.daily = development_daily_prices()
        self.calendar = league_calendar(self.daily)
        self.league = current_league_of(self.calendar)
        self.league_order = training_leagues(self.calendar, self.league)

    def features(self) -> pl.DataFrame:
        from poe_pipeline.features import build_features

        return build_features(self.daily, self.calendar)

    def lake_with_features(self, root: Path):
        from poe_pipeline.features import update_features
        from poe_pipeline.lake import Lake

        lake = Lake(root)
        update_features(self.daily, self.calendar, lake)
        return lake


def second_currency() -> str:
    ctx = Context()
    return next(c for c in liquid_currencies(ctx.daily, ctx.calendar, ctx.league, RETRAIN_CURRENCIES)
                if c != FIRST_CURRENCY)


def _partition(currency: str, profile_name: str) -> dict:
    from poe_pipeline.features import FEATURE_COLUMNS
    from poe_pipeline.modeling import limit_threads, train_partition
    from poe_pipeline.settings import get_profile

    limit_threads()
    ctx = Context()
    rows = ctx.features().filter(pl.col("currency") == currency)
    out = Path(tempfile.mkdtemp(prefix="bench-partition-"))
    before = loadavg("loadavg_before")
    cpu0 = time.process_time()
    try:
        result = train_partition(rows, FEATURE_COLUMNS, currency, HORIZON, ctx.league_order, ctx.league,
                                 get_profile(profile_name), out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if not result.trained:
        raise RuntimeError(f"{currency} {HORIZON}d did not train in {profile_name}: {result.reason}")
    return {
        "wall_s": result.seconds,
        "cpu_s": time.process_time() - cpu0,
        "currency": currency,
        "horizon_days": HORIZON,
        "profile": profile_name,
        "league": ctx.league,
        "rows": result.data_window["rows"],
        "oof_rows": result.data_window["oof_rows"],
        "folds": len(result.folds),
        "ensemble_skill": result.metrics["ensemble"].get("skill"),
        **before,
        **loadavg("loadavg_after"),
    }


def partition_test_divine() -> dict:
    return _partition(FIRST_CURRENCY, "test")


def partition_test_second() -> dict:
    return _partition(os.environ["POE_BENCH_SECOND_CURRENCY"], "test")


def partition_prod_divine() -> dict:
    return _partition(FIRST_CURRENCY, "prod")


class RssSampler:
    """The largest sum of RSS over this process and its live descendants, sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak_bytes = 0
        self.child_peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        total = me.memory_info().rss
        for proc in me.children(recursive=True):
            try:
                rss = proc.memory_info().rss
            except psutil.Error:  # a worker that exited between listing and reading
                continue
            total += rss
            self.child_peak_bytes = max(self.child_peak_bytes, rss)
        self.peak_bytes = max(self.peak_bytes, total)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def retrain() -> dict:
    from poe_pipeline.features import FEATURE_COLUMNS
    from poe_pipeline.settings import HORIZONS_DAYS, get_profile
    from poe_pipeline.training import TrainRequest, load_training_features, train_many

    ctx = Context()
    currencies = liquid_currencies(ctx.daily, ctx.calendar, ctx.league, RETRAIN_CURRENCIES)
    root = Path(tempfile.mkdtemp(prefix="bench-retrain-"))
    try:
        lake = ctx.lake_with_features(root)
        del ctx.daily  # the retrain reads features from the lake, as the asset does
        requests = [TrainRequest(c, h) for c in currencies for h in HORIZONS_DAYS]
        before = loadavg("loadavg_before")
        wall0, cpu0 = time.perf_counter(), time.process_time()
        with RssSampler() as sampler:
            rows = load_training_features(lake, currencies)
            outcomes = train_many(lake, rows, FEATURE_COLUMNS, requests, ctx.league_order, ctx.league,
                                  get_profile("test"), tags={"dagster_run_id": "benchmark"},
                                  workers=RETRAIN_WORKERS, progress=lambda _: None)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        trained = [o for o in outcomes if o.result.trained]
        seconds = sorted(o.result.seconds for o in trained)
        return {
            "wall_s": wall,
            "cpu_s_parent": cpu,  # the workers' CPU is not in here
            "cpu_s": cpu,
            "partitions": len(requests),
            "trained": len(trained),
            "registered": sum(1 for o in outcomes if o.registration is not None),
            "promoted": sum(1 for o in outcomes if o.registration is not None and o.registration.promoted),
            "skipped_reasons": sorted({o.result.reason for o in outcomes if not o.result.trained}),
            "workers": RETRAIN_WORKERS,
            "partition_s_median": seconds[len(seconds) // 2] if seconds else 0.0,
            "partition_s_max": seconds[-1] if seconds else 0.0,
            "partition_s_sum": sum(seconds),
            "wall_s_per_partition": wall / len(requests),
            "workers_peak_rss_mb": sampler.child_peak_bytes / 2**20,
            # the kernel's figure: a spawned worker is forked before exec, so it is at least the parent's RSS then
            "children_ru_maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "sampled_total_rss_mb": sampler.peak_bytes / 2**20,
            "mlflow_db_mb": (root / "mlflow" / "mlflow.db").stat().st_size / 2**20,
            "league": ctx.league,
            "currencies": ",".join(currencies),
            **before,
            **loadavg("loadavg_after"),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(repeats: int) -> dict:
    os.environ["POE_BENCH_SECOND_CURRENCY"] = second = second_currency()  # spawned children inherit it
    second_key = f"partition_test_{slug(second).replace('-', '_')}_7d"
    plan = [
        ("partition_test_divine_orb_7d", partition_test_divine, repeats),
        (second_key, partition_test_second, repeats),
        ("retrain_30x3_test", retrain, repeats),
        ("partition_prod_divine_orb_7d", partition_prod_divine, 1),  # slow: always once
    ]
    cases = {}
    for name, fn, times in plan:
        cases[name] = measure(name, fn, times)
        print(f"  {name}: {json.dumps(cases[name], default=str)}", file=sys.stderr)  # partial results survive
    for summary in cases.values():
        summary["dumps"] = development_dumps_dir()[1]
    full = cases["retrain_30x3_test"]
    prod = cases["partition_prod_divine_orb_7d"]
    peaks = [full["peak_rss_mb"]["max"], full["workers_peak_rss_mb"]["max"], full["sampled_total_rss_mb"]["max"]]
    peaks += [s["peak_rss_mb"]["max"] for s in cases.values()]
    issue = "issue: 30 x 3 partitions (test profile) < 5 min; < 60 s per partition (prod); < 2 GB peak"
    memory = {
        "metric": "max over cases of peak RSS (MB): every partition process, the retrain's parent, its largest "
                  "worker, and the retrain's sampled parent + workers total",
        "value": max(peaks),
        "target": "< 2048",
        "met": max(peaks) < 2048,
        "source": issue,
    }
    return {
        "results": cases,
        "targets": {
            "retrain_30x3_test_s": check_target(full, "wall_s", "<", 300.0, issue),
            "prod_partition_s": check_target(prod, "wall_s", "<", 60.0, issue + " (measured once: repeats 1)"),
            "peak_memory_mb": memory,
        },
    }

"""Training the global models and their currency partitions on every development league (current league: the newest).

Setup (``training_setup``, once, reported but not judged): a temporary lake gets the ``daily_prices`` of all
development dumps turned into features (``league_calendar`` + ``update_features``), and a manifest of the current
league, its training leagues and its eligible currencies (``currency_universe``), most liquid first.

- ``globals_test``: ``train_globals`` for 1/3/7d in the ``test`` profile with 2 worker processes (one job per
  horizon and model kind, then one per weighted final fit, final fits first), pooled over the eligible currencies
  of the current league (all of them, as the ``global_models`` asset passes them), including every MLflow write
  (a parent run, one run, logged model, registration and champion alias per horizon) into the lake's SQLite
  tracking store. ``wall_s`` is
  ``scan_training_features`` (``load_features_s``) + ``train_globals``, as the asset does them. Each repeat starts
  from an empty registry (its MLflow store and ``model_metrics`` are removed first, untimed), so every repeat is a
  lake's first training; the registry as the last repeat left it is kept for the next case.
  ``global_<h>d_s`` is each horizon's ``GlobalResult.seconds``: the sum of its jobs' seconds (tuning and holdout
  of each kind, final fits) in the workers.
- ``currencies_30x3_test``: ``train_currencies`` of the 30 most liquid eligible currencies x 1/3/7d (90
  partitions: a scale of the global champion's out-of-fold forecasts, no tuning) in the ``test`` profile, in the
  process as the asset does, including every MLflow write (a run, logged model, registration and alias per
  partition). Each repeat starts from the registry as ``globals_test`` left it (global champions, no partitions;
  restored untimed). ``wall_s`` is the ``train_currencies`` call; ``fit_s_sum`` is the partitions' own
  ``CurrencyResult.seconds`` (the scale alone), the rest is MLflow.
- ``retrain_prod``: the weekly retrain of the whole eligible universe in the ``prod`` profile, from an empty
  registry: ``train_globals`` for 1/3/7d on 2 workers (200 LightGBM, 100 XGBoost and 20 forest trials per horizon
  over 4 tuning folds, pruned; then the holdout league and the final fits), then ``train_currencies`` of every
  eligible currency x 1/3/7d, MLflow writes included. ``globals_wall_s`` and ``partitions_wall_s`` split
  ``wall_s``; ``global_<h>d_<kind>_*`` are each kind's trials, pruned trials, boosting rounds (forest: trees) and
  job seconds. OPT-IN: only with ``POE_BENCH_PROD=1``, and then once whatever ``--repeats`` says.
- ``retrain_prod_refold`` and ``retrain_prod_weekly`` (``POE_BENCH_PROD=weekly`` instead): the retrains of a
  league after its first. The first tuning of a league is ``retrain_prod``; after it, a retrain keeps the
  champion's tuned parameters (``global_model.reuse_of``). ``retrain_prod_refold`` starts from an empty registry
  with the ``prod`` profile's folds and early stopping but one trial per model kind (``WEEKLY_PROFILE``): the work of
  a retrain that keeps the champion's parameters and forecasts the folds again (one parameter set per kind on
  every fold, the holdout, the final fits; the default parameters stand in for tuned ones), then every eligible
  currency x 1/3/7d partitions. ``retrain_prod_weekly`` then runs the same retrain again on the same rows: each
  horizon keeps its champion as it is (it was fitted on exactly these rows; ``reused_<h>d`` says so), so the
  figure is the partitions' and the checks'. A week of new current-league rows keeps it too (under
  ``global_model.REFIT_MIN_GROWTH`` of the pooled rows); rows that changed by 5 % would fit the final models again.
  Both go through ``train_globals`` and ``train_currencies`` with MLflow, as the weekly schedule does;
  ``reused_*`` records what each horizon kept. Once whatever ``--repeats`` says.
- ``global_prod_7d`` (``POE_BENCH_PROD=7d`` instead): one ``train_global`` for 7d in the ``prod`` profile on
  the same pooled rows (``pooled_rows`` of the eligible currencies), in the process with one thread per model as in
  a training worker; artifacts only, no MLflow. ``wall_s`` is ``GlobalResult.seconds``. Once whatever
  ``--repeats`` says. On the development leagues it pools ~181,000 rows, against the ~2,000 rows of one currency
  whose prod fit took 177 s in the per-currency model this replaced (``benchmarks/results/2026-11-23.json``).

"Most liquid": the universe's ``liquidity_rank`` (most days with a High or Medium confidence price in the current
league, then most observed days, then name) among the eligible currencies; the first 30 are taken.

Memory: ``peak_rss_mb`` is the measuring process's own peak (the parent of the pool). Sampled every 0.2 s with
psutil: ``workers_peak_rss_mb``, the largest RSS of one worker, and ``sampled_total_rss_mb``, the largest sum of
the parent's and its live children's RSS (the machine-wide footprint), and ``at_sampled_peak_*`` what the parent and
each child held at that peak and when (seconds from the case's start). ``children_ru_maxrss_mb`` is
``getrusage(RUSAGE_CHILDREN)``: an upper bound only, as a spawned worker is forked (at the parent's size) before
it execs. ``cpu_s`` is the measuring process's CPU; ``cpu_s_workers`` the pool workers' (``RUSAGE_CHILDREN``).
``loadavg_*`` is ``os.getloadavg()`` (1, 5, 15 min) before and after each case: the machine has 2 cores and
other jobs may be running.

Targets (from the issue): retraining 30 currencies x 3 horizons in the test profile < 5 min, judged on the total
``globals_test`` + ``currencies_30x3_test`` (medians); < 2 GB peak memory.
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

RETRAIN_CURRENCIES = 30
RETRAIN_WORKERS = 2
PROD_HORIZON = 7
PROD_ENV = "POE_BENCH_PROD"  # "1": also the prod retrain (hours); "weekly": the retrains after it; "7d": one model
WORK_ENV = "POE_BENCH_TRAINING_DIR"
MANIFEST = "bench-manifest.json"
TAGS = {"dagster_run_id": "benchmark"}


def loadavg(prefix: str) -> dict[str, float]:
    one, five, fifteen = os.getloadavg()
    return {f"{prefix}_1m": one, f"{prefix}_5m": five, f"{prefix}_15m": fifteen}


def liquid_currencies(daily: pl.DataFrame, calendar: pl.DataFrame, league: str, n: int | None = None) -> list[str]:
    """The eligible currencies of ``league``, most liquid first (the rule is in the docstring); the first ``n``."""
    from poe_pipeline.universe import currency_universe

    universe = currency_universe(daily, calendar, league).filter(pl.col("eligible"))
    ranked = universe.sort(["liquidity_rank", "currency"])["currency"].to_list()
    return ranked if n is None else ranked[:n]


class Context:
    """The development data every case starts from: prices, calendar, current league, training leagues."""

    def __init__(self) -> None:
        from poe_pipeline.leagues import current_league_of, league_calendar, training_leagues

        self.daily = development_daily_prices()
        self.calendar = league_calendar(self.daily)
        self.league = current_league_of(self.calendar)
        self.league_order = training_leagues(self.calendar, self.league)

    def lake_with_features(self, root: Path):
        from poe_pipeline.features import update_features
        from poe_pipeline.lake import Lake

        lake = Lake(root)
        update_features(self.daily, self.calendar, lake)
        return lake


def prepare_lake(root: Path) -> dict:
    """Features of every development league in the lake at ``root`` and its manifest (``MANIFEST``): the current
    league, its training leagues and its eligible currencies, most liquid first. Returns the manifest."""
    ctx = Context()
    root.mkdir(parents=True, exist_ok=True)
    ctx.lake_with_features(root)
    manifest = {"league": ctx.league, "league_order": ctx.league_order,
                "eligible": liquid_currencies(ctx.daily, ctx.calendar, ctx.league),
                "daily_rows": ctx.daily.height}
    (root / MANIFEST).write_text(json.dumps(manifest))
    return manifest


def read_manifest(root: Path) -> dict:
    return json.loads((root / MANIFEST).read_text())


def train_global_models(lake, manifest: dict, workers: int = RETRAIN_WORKERS, profile="test") -> tuple[list, float]:
    """``scan_training_features`` + ``train_globals`` (1/3/7d, ``profile``: a name or a ``Profile``), as the
    ``global_models`` asset calls them; (outcomes, seconds spent loading the features). Raises unless every horizon
    trained or kept its champion as it is (fitted on exactly these rows)."""
    from poe_pipeline.features import FEATURE_COLUMNS
    from poe_pipeline.settings import HORIZONS_DAYS, get_profile
    from poe_pipeline.training import scan_training_features, train_globals

    t0 = time.perf_counter()
    features = scan_training_features(lake)
    load_s = time.perf_counter() - t0
    outcomes = train_globals(lake, features, FEATURE_COLUMNS, HORIZONS_DAYS, manifest["league_order"],
                             manifest["league"], manifest["eligible"],
                             get_profile(profile) if isinstance(profile, str) else profile, TAGS, workers=workers,
                             progress=lambda _: None)
    if failed := [o for o in outcomes if not o.result.trained and not o.kept]:
        raise RuntimeError("; ".join(f"global {o.horizon}d not trained: {o.result.reason}" for o in failed))
    return outcomes, load_s


def train_partitions(lake, manifest: dict, currencies: list[str], profile: str = "test") -> list:
    """``train_currencies`` of ``currencies`` x 1/3/7d in ``profile``; raises unless every one trained."""
    from poe_pipeline.settings import HORIZONS_DAYS
    from poe_pipeline.training import TrainRequest, train_currencies

    requests = [TrainRequest(c, h) for c in currencies for h in HORIZONS_DAYS]
    outcomes = train_currencies(lake, requests, manifest["league"], profile, TAGS, progress=lambda _: None)
    if failed := [o for o in outcomes if not o.result.trained]:
        raise RuntimeError(f"{len(failed)} of {len(outcomes)} partitions not trained, e.g. "
                           f"{failed[0].request.partition_key}: {failed[0].result.reason}")
    return outcomes


class RssSampler:
    """The largest sum of RSS over this process and its live descendants, sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak_bytes = 0
        self.child_peak_bytes = 0
        self.peak_parts: dict[str, float] = {}  # who held what at the sampled total's peak, and when
        self._started = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        parent = me.memory_info().rss
        children = []
        for proc in me.children(recursive=True):
            try:
                children.append(proc.memory_info().rss)
            except psutil.Error:  # a worker that exited between listing and reading
                continue
        self.child_peak_bytes = max([self.child_peak_bytes, *children])
        total = parent + sum(children)
        if total > self.peak_bytes:
            self.peak_bytes = total
            self.peak_parts = {"at_s": round(time.perf_counter() - self._started, 1), "parent_mb": parent / 2**20,
                               **{f"child_{i}_mb": rss / 2**20 for i, rss in enumerate(sorted(children, reverse=True))}}

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

    def figures(self) -> dict[str, float]:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return {
            "workers_peak_rss_mb": self.child_peak_bytes / 2**20,
            # the kernel's figure: a spawned worker is forked before exec, so it is at least the parent's RSS then
            "children_ru_maxrss_mb": children.ru_maxrss / 1024,
            "sampled_total_rss_mb": self.peak_bytes / 2**20,
            **{f"at_sampled_peak_{k}": v for k, v in self.peak_parts.items()},
            "cpu_s_workers": children.ru_utime + children.ru_stime,
        }


# --- the cases (each runs in a fresh process; the work directory is named by WORK_ENV) ---------------------------


def _work() -> Path:
    return Path(os.environ[WORK_ENV])


def _lake():
    from poe_pipeline.lake import Lake

    return Lake(_work() / "lake")


def _registry_parts(lake) -> list[Path]:
    return [lake.mlflow, lake.model_metrics]


def _snapshot() -> Path:
    return _work() / "registry-after-globals"


def setup() -> dict:
    root = _work() / "lake"
    wall0, cpu0 = time.perf_counter(), time.process_time()
    manifest = prepare_lake(root)
    return {
        "wall_s": time.perf_counter() - wall0,
        "cpu_s": time.process_time() - cpu0,
        "league": manifest["league"],
        "training_leagues": len(manifest["league_order"]),
        "daily_rows": manifest["daily_rows"],
        "eligible": len(manifest["eligible"]),
    }


def globals_test() -> dict:
    lake, manifest = _lake(), read_manifest(_work() / "lake")
    for part in [*_registry_parts(lake), lake.models_staging]:  # every repeat is the lake's first training
        shutil.rmtree(part, ignore_errors=True)
    before = loadavg("loadavg_before")
    wall0, cpu0 = time.perf_counter(), time.process_time()
    with RssSampler() as sampler:
        outcomes, load_s = train_global_models(lake, manifest)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    snapshot = _snapshot()
    shutil.rmtree(snapshot, ignore_errors=True)
    for part in _registry_parts(lake):
        shutil.copytree(part, snapshot / part.name)
    per_horizon = {}
    for o in sorted(outcomes, key=lambda o: o.horizon):
        r = o.result
        per_horizon |= {f"global_{o.horizon}d_s": r.seconds, f"global_{o.horizon}d_rows": r.data_window["rows"],
                        f"global_{o.horizon}d_holdout_skill": r.skill}
    return {
        "wall_s": wall,
        "cpu_s": cpu,  # the parent's: the workers' CPU is cpu_s_workers
        "load_features_s": load_s,
        "train_globals_s": wall - load_s,
        "horizons": len(outcomes),
        "workers": RETRAIN_WORKERS,
        "registered": sum(1 for o in outcomes if o.registration is not None),
        "promoted": sum(1 for o in outcomes if o.registration is not None and o.registration.promoted),
        "pooled_currencies": outcomes[0].result.data_window["currencies"],
        "eligible": len(manifest["eligible"]),
        **per_horizon,
        **sampler.figures(),
        "mlflow_db_mb": lake.mlflow_db.stat().st_size / 2**20,
        "league": manifest["league"],
        "training_leagues": len(manifest["league_order"]),
        **before,
        **loadavg("loadavg_after"),
    }


def currencies_test() -> dict:
    lake, manifest = _lake(), read_manifest(_work() / "lake")
    snapshot = _snapshot()
    if not snapshot.is_dir():
        raise RuntimeError("no registry from globals_test: it must run (and succeed) first")
    for part in _registry_parts(lake):  # the global champions, no partition yet
        shutil.rmtree(part, ignore_errors=True)
        shutil.copytree(snapshot / part.name, part)
    currencies = manifest["eligible"][:RETRAIN_CURRENCIES]
    if len(currencies) < RETRAIN_CURRENCIES:
        raise RuntimeError(f"only {len(currencies)} eligible currencies in {manifest['league']}, "
                           f"the bench needs {RETRAIN_CURRENCIES}")
    before = loadavg("loadavg_before")
    wall0, cpu0 = time.perf_counter(), time.process_time()
    with RssSampler() as sampler:
        outcomes = train_partitions(lake, manifest, currencies)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    fits = sorted(o.result.seconds for o in outcomes)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "partitions": len(outcomes),
        "trained": sum(1 for o in outcomes if o.result.trained),
        "registered": sum(1 for o in outcomes if o.registration is not None),
        "promoted": sum(1 for o in outcomes if o.registration is not None and o.registration.promoted),
        "own_rows_below_minimum": sum(1 for o in outcomes if o.result.reason),
        "wall_s_per_partition": wall / len(outcomes),
        "fit_s_sum": sum(fits),
        "fit_s_max": fits[-1],
        **sampler.figures(),
        "mlflow_db_mb": lake.mlflow_db.stat().st_size / 2**20,
        "league": manifest["league"],
        "currencies": ",".join(currencies),
        **before,
        **loadavg("loadavg_after"),
    }


def global_prod() -> dict:
    from poe_pipeline.modeling import limit_threads

    limit_threads()  # one thread per model, as in a training worker
    from poe_pipeline.features import FEATURE_COLUMNS
    from poe_pipeline.global_model import pooled_rows, train_global
    from poe_pipeline.settings import get_profile
    from poe_pipeline.training import scan_training_features

    lake, manifest = _lake(), read_manifest(_work() / "lake")
    rows = pooled_rows(scan_training_features(lake), manifest["league_order"], manifest["league"],
                       manifest["eligible"]).collect()
    out = Path(tempfile.mkdtemp(prefix="bench-global-prod-"))
    before = loadavg("loadavg_before")
    cpu0 = time.process_time()
    try:
        with RssSampler() as sampler:
            result = train_global(rows, FEATURE_COLUMNS, PROD_HORIZON, manifest["league_order"], manifest["league"],
                                  get_profile("prod"), out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if not result.trained:
        raise RuntimeError(f"global {PROD_HORIZON}d did not train in prod: {result.reason}")
    return {
        "wall_s": result.seconds,
        "cpu_s": time.process_time() - cpu0,
        "horizon_days": PROD_HORIZON,
        "profile": "prod",
        "rows": result.data_window["rows"],
        "pooled_currencies": result.data_window["currencies"],
        "oof_rows": result.data_window["oof_rows"],
        "folds": len(result.folds),
        "holdout_skill": result.skill,
        **sampler.figures(),
        **before,
        **loadavg("loadavg_after"),
    }


def _timed_retrain(profile, fresh: bool) -> dict:
    """The weekly retrain with ``profile`` (a name or a ``Profile``): the global models of 1/3/7d (2 workers), then
    every eligible currency x 1/3/7d partitions, MLflow included; ``fresh``: from an empty registry."""
    lake, manifest = _lake(), read_manifest(_work() / "lake")
    if fresh:
        for part in [*_registry_parts(lake), lake.models_staging]:
            shutil.rmtree(part, ignore_errors=True)
    before = loadavg("loadavg_before")
    wall0, cpu0 = time.perf_counter(), time.process_time()
    with RssSampler() as sampler:
        outcomes, load_s = train_global_models(lake, manifest, profile=profile)
        globals_s = time.perf_counter() - wall0
        after_globals = loadavg("loadavg_after_globals")
        partitions = train_partitions(lake, manifest, manifest["eligible"], profile="prod")
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    per_horizon = {}
    for o in sorted(outcomes, key=lambda o: o.horizon):
        r = o.result
        if o.kept:
            per_horizon[f"reused_{o.horizon}d"] = r.reason
            continue
        per_horizon |= {f"global_{o.horizon}d_job_s": r.seconds, f"global_{o.horizon}d_rows": r.data_window["rows"],
                        f"global_{o.horizon}d_holdout_skill": r.skill, f"reused_{o.horizon}d": r.data_window["tuning"],
                        **{f"global_{o.horizon}d_{k}_{stat}": v for k, t in r.tuning.items()
                           for stat, v in t.items()}}
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "load_features_s": load_s,
        "globals_wall_s": globals_s,
        "partitions_wall_s": wall - globals_s,
        "partitions": len(partitions),
        "eligible": len(manifest["eligible"]),
        "workers": RETRAIN_WORKERS,
        "profile": "prod",
        "promoted": sum(1 for o in outcomes if o.registration is not None and o.registration.promoted),
        **per_horizon,
        **sampler.figures(),
        "league": manifest["league"],
        **before,
        **after_globals,
        **loadavg("loadavg_after"),
    }


def retrain_prod() -> dict:
    """The weekly retrain in the ``prod`` profile, from an empty registry: a league's first, which tunes."""
    return _timed_retrain("prod", fresh=True)


def _weekly_profile():
    from poe_pipeline.settings import Profile, get_profile

    prod = get_profile("prod")
    return Profile("prod", optuna_trials=1, cv_folds=prod.cv_folds, early_stopping_rounds=prod.early_stopping_rounds)


def retrain_prod_refold() -> dict:
    return _timed_retrain(_weekly_profile(), fresh=True)


def retrain_prod_weekly() -> dict:
    return _timed_retrain(_weekly_profile(), fresh=False)


def run(repeats: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-training-"))
    os.environ[WORK_ENV] = str(work)  # spawned children inherit it
    prod = os.environ.get(PROD_ENV, "")
    plan = [
        ("training_setup", setup, 1),
        ("globals_test", globals_test, repeats),
        ("currencies_30x3_test", currencies_test, repeats),
    ]
    if prod == "1":
        plan.append(("retrain_prod", retrain_prod, 1))  # slow: always once
    elif prod == "weekly":  # these alone: the test-profile cases are another run
        plan = [plan[0], ("retrain_prod_refold", retrain_prod_refold, 1),
                ("retrain_prod_weekly", retrain_prod_weekly, 1)]
    elif prod == "7d":
        plan.append(("global_prod_7d", global_prod, 1))
    else:
        print(f"  retrain_prod skipped: set {PROD_ENV}=1 to run it (hours on 2 cores)", file=sys.stderr)
    cases = {}
    try:
        for name, fn, times in plan:
            cases[name] = measure(name, fn, times)
            print(f"  {name}: {json.dumps(cases[name], default=str)}", file=sys.stderr)  # partial results survive
    finally:
        shutil.rmtree(work, ignore_errors=True)
        os.environ.pop(WORK_ENV, None)
    for summary in cases.values():
        summary["dumps"] = development_dumps_dir()[1]
    trained = [cases[name] for name in ("globals_test", "currencies_30x3_test", "global_prod_7d", "retrain_prod",
                                        "retrain_prod_refold", "retrain_prod_weekly") if name in cases]
    peaks = [s[key]["max"] for s in trained for key in ("peak_rss_mb", "workers_peak_rss_mb", "sampled_total_rss_mb")]
    issue = "issue: retraining 30 currencies x 3 horizons (test profile) < 5 min; < 2 GB peak"
    memory = {"name": "training", "peak_rss_mb": max(peaks)}
    targets = {}
    if "globals_test" in cases:
        medians = [cases[n]["wall_s"]["median"] for n in ("globals_test", "currencies_30x3_test")]
        total = {"name": "retrain_30x3_test", "wall_s": sum(medians)}
        targets["retrain_30x3_test_s"] = {
            **check_target(total, "wall_s", "<", 300.0, issue),
            "metric": "globals_test.wall_s + currencies_30x3_test.wall_s (sum of the medians): the global models "
                      "of 1/3/7d, then 30 currencies x 3 partitions, MLflow writes included",
        }
    if "retrain_prod" in cases:
        targets["retrain_prod_s"] = {
            **check_target(cases["retrain_prod"], "wall_s", "<", 3600.0,
                           "issue: the weekly retrain of the eligible universe in the prod profile < 60 min"),
            "metric": "retrain_prod.wall_s: the global models of 1/3/7d (the prod profile: its trials, 5 folds) on 2 "
                      "workers, then every eligible currency x 3 partitions, MLflow writes included",
        }
    for name, what in (("retrain_prod_refold", "keeping the champion's parameters, the folds forecast again"),
                       ("retrain_prod_weekly", "keeping the champion's whole validation")):
        if name in cases:
            targets[f"{name}_s"] = {
                **check_target(cases[name], "wall_s", "<", 3600.0,
                               "issue: the weekly retrain of the eligible universe in the prod profile < 60 min"),
                "metric": f"{name}.wall_s: a retrain after the league's first ({what}) of the global models of "
                          "1/3/7d on 2 workers, then every eligible currency x 3 partitions, MLflow writes included",
            }
    return {
        "results": cases,
        "targets": {
            **targets,
            "peak_memory_mb": {
                **check_target(memory, "peak_rss_mb", "<", 2048, issue),
                "metric": "max over the training cases of peak RSS (MB): the measuring process, its largest worker, "
                          "and the sampled parent + workers total"
                          + ("" if prod else f" (the prod cases not run: {PROD_ENV} unset)"),
            },
        },
    }

"""Train the global model of each horizon in one process and print its time and nested holdout scores as JSON.

For before/after comparisons of training changes: run it with ``PYTHONPATH`` pointing at each version of the code,
interleaved, on the same machine. ``python benchmarks/compare_global.py --dumps sample --profile test --out x.json``

- ``--dumps sample``: the bundled ``sample_data``; ``dev``: the 24 development dumps beside the repo.
- The current league is the newest; the pool is ``pooled_rows`` of its eligible currencies (as the asset does).
- One thread per model, as in a training worker; horizons one after another, artifacts in a temporary folder.
  ``cpu_s`` (this process's CPU time) is the figure to compare on a busy machine: ``wall_s`` depends on the load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dumps", choices=["sample", "dev"], default="sample")
    parser.add_argument("--profile", default="test")
    parser.add_argument("--horizons", default="1,3,7")
    parser.add_argument("--out", default="")
    parser.add_argument("--log-trials", action="store_true", help="each Optuna trial's end on stderr, with CPU s")
    args = parser.parse_args()
    if args.dumps == "sample":
        os.environ["POE_BENCH_DUMPS"] = "sample_data"
    from poe_pipeline.modeling import limit_threads

    limit_threads()
    if args.log_trials:
        import logging

        import optuna

        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s cpu=%(cpu).1f %(message)s"))
        handler.addFilter(lambda record: setattr(record, "cpu", time.process_time()) or True)
        optuna.logging.set_verbosity(optuna.logging.INFO)
        optuna.logging.disable_default_handler()
        optuna.logging.get_logger("optuna").addHandler(handler)
    import poe_pipeline
    from benchmarks.bench_features import development_daily_prices
    from benchmarks.bench_training import liquid_currencies
    from poe_pipeline.features import FEATURE_COLUMNS, build_features
    from poe_pipeline.global_model import pooled_rows, train_global
    from poe_pipeline.leagues import current_league_of, league_calendar, training_leagues
    from poe_pipeline.settings import get_profile

    daily = development_daily_prices()
    calendar = league_calendar(daily)
    league = current_league_of(calendar)
    order = training_leagues(calendar, league)
    features = build_features(daily, calendar)
    rows = pooled_rows(features, order, league, liquid_currencies(daily, calendar, league))
    out: dict = {"code": str(Path(poe_pipeline.__file__).parent), "dumps": args.dumps, "profile": args.profile,
                 "league": league, "loadavg_before": os.getloadavg(), "horizons": {}}
    for h in (int(x) for x in args.horizons.split(",")):
        tmp = Path(tempfile.mkdtemp(prefix="compare-global-"))
        try:
            t0, c0 = time.perf_counter(), time.process_time()
            r = train_global(rows, FEATURE_COLUMNS, h, order, league, get_profile(args.profile), tmp / "m")
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        hold = r.metrics.get("holdout", {})
        out["horizons"][f"{h}d"] = {
            "wall_s": wall, "cpu_s": cpu, "rows": r.data_window.get("rows"), "folds": r.folds, "weights": r.weights,
            "rounds": r.rounds, "tuning": getattr(r, "tuning", {}), "holdout_skill": r.skill,
            "holdout_mae": {k: v.get("mae_logret") for k, v in hold.items()},
            "holdout_skill_by_model": {k: v.get("skill") for k, v in hold.items()},
            "tuning_mae": {k: v.get("mae_logret") for k, v in r.metrics.get("tuning", {}).items()},
            "loadavg_after": os.getloadavg(),
        }
        print(f"{h}d: {wall:.1f}s wall, {cpu:.1f}s CPU, skill {r.skill:+.4f} weights {r.weights}", file=sys.stderr)
    text = json.dumps(out, indent=1, default=str)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

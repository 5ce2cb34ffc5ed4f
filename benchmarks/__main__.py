"""``python -m benchmarks [--only ingestion,history,features] [--repeats N]``: one JSON document on stdout.

Each bench module has ``run(repeats) -> {"results": {...}, "targets": {name: {..., "met": bool}}}``. To add a
bench, write ``benchmarks/bench_<name>.py`` with that function and add one entry to ``BENCHES``.
Progress goes to stderr; the document is also merged into ``benchmarks/results/<date>.json``
(per bench: a partial run replaces only the benches it ran).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from datetime import UTC, datetime

from benchmarks.harness import RESULTS_DIR, machine, write_results

# name -> module with run(repeats). Order is run order.
BENCHES: dict[str, str] = {
    "ingestion": "benchmarks.bench_ingestion",
    "history": "benchmarks.bench_history",
    "features": "benchmarks.bench_features",
    "accuracy": "benchmarks.bench_accuracy",
    "training": "benchmarks.bench_training",
    "predictions": "benchmarks.bench_predictions",
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help=f"comma-separated benches to run (default all: {','.join(BENCHES)})")
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process runs per case (default 3)")
    args = parser.parse_args(argv)
    selected = [b.strip() for b in args.only.split(",") if b.strip()] or list(BENCHES)
    if unknown := [b for b in selected if b not in BENCHES]:
        parser.error(f"unknown bench {', '.join(unknown)}: known benches are {', '.join(BENCHES)}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    args.selected = list(dict.fromkeys(selected))
    return args


def _merge_with_today(doc: dict) -> dict:
    """Today's stored document with this run's benches replacing their earlier entries."""
    path = RESULTS_DIR / f"{datetime.now(UTC).date().isoformat()}.json"
    try:
        stored = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        stored = {}
    merged = {"machine": doc["machine"]}
    for key in ("results", "targets", "errors"):
        merged[key] = {**(stored.get(key) or {}), **doc[key]}
        for bench in doc["benches"]:
            if bench not in doc[key]:
                merged[key].pop(bench, None)  # a bench that failed now has no stale figures
    merged["all_targets_met"] = not merged["errors"] and all(
        t["met"] for bench in merged["targets"].values() for t in bench.values()
    )
    return merged


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    doc: dict = {
        "machine": machine(),
        "benches": args.selected,
        "repeats": args.repeats,
        "results": {},
        "targets": {},
        "errors": {},
    }
    started = time.perf_counter()
    for name in args.selected:
        print(f"bench {name} (repeats {args.repeats})", file=sys.stderr)
        t0 = time.perf_counter()
        try:
            out = importlib.import_module(BENCHES[name]).run(args.repeats)
        except Exception as exc:  # one broken bench must not hide the others' numbers
            traceback.print_exc(file=sys.stderr)
            doc["errors"][name] = f"{type(exc).__name__}: {exc}"
            continue
        doc["results"][name] = out["results"]
        doc["targets"][name] = out["targets"]
        for target, verdict in out["targets"].items():
            mark = "met" if verdict["met"] else "NOT met"
            value = verdict["value"]
            shown = f"{value:.4g}" if isinstance(value, int | float) else json.dumps(value, default=str)
            print(f"  target {name}.{target}: {shown} {verdict['target']}: {mark}", file=sys.stderr)
        print(f"  {name} took {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    doc["total_s"] = time.perf_counter() - started
    doc["all_targets_met"] = not doc["errors"] and all(
        t["met"] for bench in doc["targets"].values() for t in bench.values()
    )
    print(json.dumps(doc, indent=2, default=str))
    path = write_results(_merge_with_today(doc))
    print(f"written to {path}", file=sys.stderr)
    return 1 if doc["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

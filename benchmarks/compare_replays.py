"""Score kept project replays side by side, on the rows they all forecast, with the accuracy bench's own scoring.

For before/after comparisons of a forecasting change without running the peers again: each argument is a kept
replay (``benchmarks/results/cache/accuracy-*.parquet``, written by ``bench_accuracy``) or several joined by commas
(one per league), optionally named: ``NAME=PATH[,PATH...]``.
Prints JSON: per replay, its wall time and, per horizon, log-MAE, skill, DM p against persistence, coverage, and
skill and coverage per league and league phase.

``.venv/bin/python -m benchmarks.compare_replays before=benchmarks/results/cache/a.parquet after=...``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import polars as pl


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    from benchmarks.bench_accuracy import KEYS, replay_logrets, score, with_context
    from benchmarks.bench_features import development_daily_prices

    replays = {}
    for arg in argv:
        name, _, paths = arg.rpartition("=")
        frames, metas = [], []
        for path in map(Path, paths.split(",")):
            if not path.exists() or not path.with_suffix(".json").exists():
                print(f"compare_replays: {path}: no such kept replay (a .parquet with its .json beside it)",
                      file=sys.stderr)
                return 2
            frames.append(pl.read_parquet(path).cast({"horizon_days": pl.Int32}))
            metas.append(json.loads(path.with_suffix(".json").read_text()))
        replays[name or paths] = (pl.concat(frames), {
            "wall_s": sum(m["wall_s"] for m in metas), "refits": sum(m["refits"] for m in metas),
            "code": sorted({m["config"].get("code", "") for m in metas}), "level": metas[0]["config"]["level"]})
    common = None
    for frame, _ in replays.values():
        keys = frame.filter(pl.col("actual_price").is_not_null() & pl.col("predicted_price").is_not_null()).select(KEYS)
        common = keys if common is None else common.join(keys, on=KEYS)
    if common is None or common.is_empty():
        print("compare_replays: the replays share no scored row (other leagues or universes?)", file=sys.stderr)
        return 2
    prices = development_daily_prices()
    out = {"rows": common.height, "replays": {}}
    for name, (frame, meta) in replays.items():
        rows = with_context(frame.join(common, on=KEYS).select(*KEYS, "current_price", "actual_price"), prices)
        rows = rows.join(replay_logrets(frame), on=KEYS)
        out["replays"][name] = {**{k: meta[k] for k in ("wall_s", "refits", "code")},
                                "scores": score(rows, meta["level"], True)}
    json.dump(out, sys.stdout, indent=1, default=str)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""Replay the league's own adjustments (``forecasting.league_adjustments``) on kept project replays with other priors.

The point shrink and the interval scale learn from the replay's own forecasts that came true, so they can be
replayed without fitting a model: origin by origin, the adjustment each stored forecast got is recomputed with the
priors it was made with (``--made-with SHRINK,SCALE``), which recovers the models' forecast and the half-width before
the scale; the adjustment under ``--prior SHRINK,SCALE`` is then applied to those instead (``none`` for SHRINK: the
point is not shrunk, as in the code since 2026-12-03; replays written before were made with ``120,120``). Each kept
replay (``benchmarks/results/cache/accuracy-*.parquet`` with its ``.json``) is written again into ``--out`` under the
same name, for ``benchmarks.compare_replays`` to score beside the original. Approximate in one way: a half-width that a
shorter horizon's widened (a longer horizon is never narrower) keeps that floor as it was.

``.venv/bin/python -m benchmarks.readjust_replays --made-with 120,120 --prior none,120 --out /tmp/readjusted
benchmarks/results/cache/accuracy-sanctum-*.parquet``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import polars as pl

from poe_pipeline.forecasting import league_adjustments
from poe_pipeline.prices import target_day

Priors = tuple[int | None, int]  # (the point shrink's, None: no shrink; the interval scale's)


def _priors(text: str) -> Priors:
    shrink, _, scale = text.partition(",")
    try:
        return (None if shrink.strip().lower() == "none" else int(shrink)), int(scale)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give SHRINK,SCALE as whole numbers of rows, SHRINK may be none (e.g. none,120)") from None


def _adjustments(resolved: pl.DataFrame, level: float, priors: Priors) -> dict:
    return league_adjustments(resolved, level, prior_rows=priors[1], shrink_prior_rows=priors[0])


def _resolved(fixed: dict[str, np.ndarray], point: np.ndarray, model: np.ndarray, half: np.ndarray,
              scale: np.ndarray, due: np.ndarray) -> pl.DataFrame:
    """The rows of ``due`` as ``league_adjustments`` reads resolved forecasts; ``fixed``: the columns that no
    adjustment changes (horizon, target day, actual log-return)."""
    idx = np.flatnonzero(due)
    return pl.DataFrame({
        **{name: column[idx] for name, column in fixed.items()},
        "predicted_logret": point[idx], "model_logret": model[idx], "upper_logret": point[idx] + half[idx],
        "interval_scale": scale[idx],
    })


def readjust(frame: pl.DataFrame, level: float, made_with: Priors, prior: Priors) -> pl.DataFrame:
    """``frame`` (one league's kept replay) with its forecasts and intervals as ``prior`` would have adjusted them."""
    frame = frame.sort("origin_date", "horizon_days", "currency").with_columns(
        target_day().alias("target_date"),
        (pl.col("predicted_price") / pl.col("current_price")).log().alias("point"),
        (pl.col("pred_upper") / pl.col("predicted_price")).log().alias("half"),
        (pl.col("actual_price") / pl.col("current_price")).log().alias("actual_logret"))
    n = frame.height
    origin, horizon = frame["origin_date"].to_numpy(), frame["horizon_days"].to_numpy()
    target, known = frame["target_date"].to_numpy(), frame["actual_logret"].is_finite().fill_null(False).to_numpy()
    fixed = {"horizon_days": horizon, "target_date": target, "actual_logret": frame["actual_logret"].to_numpy()}
    point, half = frame["point"].to_numpy(), frame["half"].to_numpy()
    model, base = np.full(n, np.nan), np.full(n, np.nan)
    made_scale, new_point, new_half, new_scale = (np.full(n, np.nan) for _ in range(4))
    for day in np.unique(origin):
        rows = origin == day
        due = known & (target <= day)
        made = _adjustments(_resolved(fixed, point, model, half, made_scale, due), level, made_with)
        new = _adjustments(_resolved(fixed, new_point, model, new_half, new_scale, due), level, prior)
        for h in np.unique(horizon[rows]):
            at = rows & (horizon == h)
            m, a = made.get(int(h)), new.get(int(h))
            shrink, scale = (m.point_shrink, m.interval_scale) if m else (1.0, 1.0)
            model[at], base[at], made_scale[at] = point[at] / shrink, half[at] / scale, scale
            new_scale[at] = a.interval_scale if a else 1.0
            new_point[at] = model[at] * (a.point_shrink if a else 1.0)
            new_half[at] = base[at] * new_scale[at]
    price = frame["current_price"].to_numpy() * np.exp(new_point)
    return frame.with_columns(
        pl.Series("predicted_price", price), pl.Series("pred_lower", price * np.exp(-new_half)),
        pl.Series("pred_upper", price * np.exp(new_half)),
    ).drop("target_date", "point", "half", "actual_logret")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.readjust_replays", description=__doc__.split("\n")[0])
    parser.add_argument("--made-with", type=_priors, required=True, metavar="SHRINK,SCALE",
                        help="the priors of the code that wrote the replays (rows of resolved forecasts)")
    parser.add_argument("--prior", type=_priors, required=True, metavar="SHRINK,SCALE", help="the priors to try")
    parser.add_argument("--out", type=Path, required=True, help="folder for the re-adjusted replays")
    parser.add_argument("replays", nargs="+", type=Path, help="kept replays (.parquet, with their .json beside)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in args.replays:
        meta_path = path.with_suffix(".json")
        if not path.exists() or not meta_path.exists():
            print(f"readjust_replays: {path}: no such kept replay (a .parquet with its .json beside it)",
                  file=sys.stderr)
            return 2
        meta = json.loads(meta_path.read_text())
        frame = readjust(pl.read_parquet(path), meta["config"]["level"], args.made_with, args.prior)
        frame.write_parquet(args.out / path.name)
        meta["readjusted"] = {"made_with": list(args.made_with), "prior": list(args.prior), "from": str(path)}
        (args.out / meta_path.name).write_text(json.dumps(meta))
        print(f"{path.name}: {frame.height} rows re-adjusted with priors {args.prior}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

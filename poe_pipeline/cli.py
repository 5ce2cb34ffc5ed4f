"""``poe-pipeline``: run the pipeline in-process, or serve real prices offline.

    poe-pipeline run --history DIR --league L [--currencies "A,B"] [--profile test|dev|prod] [--lake DIR]
    poe-pipeline backtest --history DIR --league L [--refit-every 7] [--retune-every 1] [--profile test]
        [--currencies "A,B"]
    poe-pipeline serve-replay --history DIR --league L [--speed 288] [--port 8765]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from poe_pipeline.settings import PROFILES, REPO_ROOT, resolve_lake_root


class UsageError(Exception):
    """Bad input: printed as one line that names the fix."""


def _split_names(text: str | None) -> list[str]:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


def prepare_dagster_home(lake_root: Path) -> Path:
    """``DAGSTER_HOME`` under the lake (never a temporary directory), seeded with the repo's dagster.yaml."""
    home = Path(os.environ.get("DAGSTER_HOME") or lake_root / ".dagster")
    home.mkdir(parents=True, exist_ok=True)
    template = REPO_ROOT / "dagster.yaml"
    if template.exists() and not (home / "dagster.yaml").exists():
        shutil.copyfile(template, home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def _leagues_in(history_dir: Path) -> list[str]:
    from poe_pipeline.history import find_dumps
    from poe_pipeline.sources.poe_ninja import league_of_dump

    return sorted({league_of_dump(p) for p in find_dumps([history_dir])})


def check_run_inputs(history: Path, league: str) -> None:
    if not history.is_dir():
        raise UsageError(f"--history {history}: no such directory; point it at a folder of poe.ninja dumps, "
                         "e.g. --history sample_data")
    leagues = _leagues_in(history)
    if not leagues:
        raise UsageError(f"--history {history}: no poe.ninja dumps (<League>.currency.csv or .csv.gz) in it; "
                         "copy dumps there or use --history sample_data")
    if league not in leagues:
        raise UsageError(f"Unknown league {league!r}: known leagues in {history} are {', '.join(leagues)}")


def cmd_run(args: argparse.Namespace) -> int:
    history = Path(args.history).expanduser().resolve()
    check_run_inputs(history, args.league)
    lake_root = resolve_lake_root(args.lake)
    os.environ["POE_DATA_LAKE"] = str(lake_root)
    prepare_dagster_home(lake_root)

    from poe_pipeline.jobs import run_pipeline

    summary = run_pipeline(
        lake_root=lake_root,
        history_dirs=[history],
        league=args.league,
        currencies=_split_names(args.currencies),
        profile=args.profile,
    )
    print(summary)
    return 0


def cmd_serve_replay(args: argparse.Namespace) -> int:
    from poe_pipeline.sources.replay import serve_replay

    history = Path(args.history).expanduser().resolve()
    check_run_inputs(history, args.league)
    serve_replay(history, args.league, speed=args.speed, start_day=args.start_day, host=args.host,
                 port=args.port, faults=args.fault or ())
    return 0


def cmd_backtest(args: argparse.Namespace) -> int:
    from poe_pipeline.backtest import run_backtest_cli

    history = Path(args.history).expanduser().resolve()
    check_run_inputs(history, args.league)
    try:
        summary = run_backtest_cli(history, args.league, refit_every=args.refit_every, profile=args.profile,
                                   lake_root=resolve_lake_root(args.lake), currencies=_split_names(args.currencies),
                                   max_origins=args.max_origins, retune_every=args.retune_every)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(summary)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poe-pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="materialize the pipeline in-process on poe.ninja dumps")
    run.add_argument("--history", required=True, help="folder of poe.ninja dumps (<League>.currency.csv[.gz])")
    run.add_argument("--league", required=True, help="the current league: forecasts start from its last day")
    run.add_argument("--currencies", help='limit models and predictions to these, e.g. "Divine Orb,Exalted Orb"')
    run.add_argument("--profile", choices=sorted(PROFILES), default="test", help="training effort (default: test)")
    run.add_argument("--lake", help="lake root (default: $POE_DATA_LAKE or ./data_lake)")
    run.set_defaults(func=cmd_run)

    backtest = sub.add_parser("backtest", help="replay a league day by day: daily forecasts, weekly refits, scores")
    backtest.add_argument("--history", required=True, help="folder of poe.ninja dumps")
    backtest.add_argument("--league", required=True, help="the league to replay")
    backtest.add_argument("--refit-every", type=int, default=7, help="retrain every N days (default: 7)")
    backtest.add_argument("--retune-every", type=int, default=1,
                          help="re-tune hyperparameters every N refits; the refits between only refit the final "
                               "models (default: 1, every refit re-tunes, as the weekly retrain does)")
    backtest.add_argument("--profile", choices=sorted(PROFILES), default="test")
    backtest.add_argument("--currencies", help="limit to these currencies (default: the league's universe)")
    backtest.add_argument("--max-origins", type=int, help="replay at most this many days (the last ones)")
    backtest.add_argument("--lake", help="lake root for the backtest's files (default: $POE_DATA_LAKE or ./data_lake)")
    backtest.set_defaults(func=cmd_backtest)

    replay = sub.add_parser("serve-replay", help="serve a dump's real prices in the poe.watch API shape, offline")
    replay.add_argument("--history", required=True, help="folder of poe.ninja dumps")
    replay.add_argument("--league", required=True, help="the league to replay")
    replay.add_argument("--speed", type=float, default=288.0,
                        help="simulated seconds per real second (288: one league day per 5 minutes; 0: frozen)")
    replay.add_argument("--start-day", type=int, default=0, help="league day the replay starts at (0 = first)")
    replay.add_argument("--host", default="127.0.0.1")
    replay.add_argument("--port", type=int, default=8765)
    replay.add_argument("--fault", action="append",
                        help="inject a fault into the next request: 429, 500, 503, timeout, truncated, malformed, "
                        "drift, missing, extra (repeatable)")
    replay.set_defaults(func=cmd_serve_replay)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"poe-pipeline: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

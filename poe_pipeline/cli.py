"""``poe-pipeline``: run the pipeline, poll once, replay a league as a backtest, or serve real prices offline.

    poe-pipeline run --history DIR --league L [--currencies "A,B"] [--profile test|dev|prod] [--lake DIR]
    poe-pipeline ingest [--league L] [--url URL] [--lake DIR]
    poe-pipeline backtest --history DIR --league L [--refit-every 7] [--retune-every 1] [--profile test]
        [--currencies "A,B"]
    poe-pipeline serve-replay --history DIR --league L [--speed 288] [--port 8765]

``run`` is a Dagster run like any other: it executes the code location's named jobs (prices_job, features_job,
retrain_models_job, forecast_job) with their asset checks, on the lake's Dagster instance, so the UI shows them.
"""

from __future__ import annotations

import argparse
import difflib
import os
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path

from poe_pipeline.settings import DEFAULT_PROFILE, PROFILES, REPO_ROOT, resolve_lake_root

PIPELINE_JOBS = ("prices_job", "features_job", "retrain_models_job", "forecast_job")


class UsageError(Exception):
    """Bad input: printed as one line that names the fix."""


def _split_names(text: str | None, flag: str = "--currencies") -> list[str]:
    if text is None:
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError(f'{flag} {text!r} names no currency: leave {flag} out for every eligible currency, or name '
                         'some, e.g. --currencies "Divine Orb,Chaos Orb"')
    return names


def prepare_dagster_home(lake_root: Path) -> Path:
    """``DAGSTER_HOME`` under the lake (never a temporary directory), seeded with the repo's dagster.yaml."""
    from poe_pipeline.lake import Lake
    from poe_pipeline.settings import Settings

    home = Path(Settings.from_env(lake_root).dagster_home or Lake(lake_root).dagster_home)
    home.mkdir(parents=True, exist_ok=True)
    template = REPO_ROOT / "dagster.yaml"
    if template.exists() and not (home / "dagster.yaml").exists():
        shutil.copyfile(template, home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)  # the Dagster instance reads it
    _create_instance_once(home)
    return home


def _create_instance_once(home: Path) -> None:
    """Create the instance's SQLite storage under a lock: processes that open a brand-new instance at the same time
    race in Dagster's schema migration ("alembic_version has more than one head") and one of them crashes."""
    import fcntl

    import dagster as dg

    with open(home / ".instance.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with dg.DagsterInstance.get():
            pass


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
        close = difflib.get_close_matches(league, leagues, n=3)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise UsageError(f"Unknown league {league!r}{hint}: known leagues in {history} are {', '.join(leagues)}")


def check_lake(lake_root: Path, flag: str = "--lake") -> None:
    """The lake must be a directory we can write (created when missing)."""
    if lake_root.exists() and not lake_root.is_dir():
        raise UsageError(f"{flag} {lake_root}: is a file, not a directory; point it at a folder for the lake, "
                         "e.g. --lake data_lake")
    try:
        lake_root.mkdir(parents=True, exist_ok=True)
        probe = lake_root / ".write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"{flag} {lake_root}: cannot write there ({exc.strerror}); choose a writable folder, "
                         "e.g. --lake ./data_lake") from None


def check_currencies(history: Path, currencies: list[str]) -> None:
    """Every asked-for currency must exist in the dumps (a typo gets its close matches)."""
    from poe_pipeline.history import find_dumps
    from poe_pipeline.names import canonical_currency_name
    from poe_pipeline.sources.poe_ninja import read_dump

    if not currencies:
        return
    known: set[str] = set()
    for path in find_dumps([history]):
        rows = read_dump(path)
        known |= set(rows["get"].unique()) | set(rows["pay"].unique())
    by_key = {k.casefold(): k for k in known}
    for name in currencies:
        if canonical_currency_name(name).casefold() not in by_key:
            close = difflib.get_close_matches(canonical_currency_name(name), sorted(known), n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise UsageError(f"Unknown currency {name!r} in the dumps of {history}.{hint}")


def run_pipeline(lake_root: Path, history_dirs: list[Path], league: str, currencies: list[str], profile: str,
                 echo=print) -> str:
    """Execute the pipeline's named jobs on the lake's Dagster instance; returns the text summary."""
    import dagster as dg

    from poe_pipeline.assets.models import retrain_run_config
    from poe_pipeline.definitions import defs
    from poe_pipeline.lake import Lake
    from poe_pipeline.scope import RunScope
    from poe_pipeline.summary import summarize

    lake = Lake(lake_root)
    scope_config = {"history_dirs": [str(d) for d in history_dirs], "league": league, "currencies": currencies,
                    "profile": profile}
    resources = {"lake": {"config": {"root": str(lake_root)}}, "run_scope": {"config": scope_config}}
    tags = {"poe/league": league, "poe/profile": profile, "poe/trigger": "cli"}
    logging = {"console": {"config": {"log_level": "INFO"}}}
    not_eligible: list[str] = []
    with dg.DagsterInstance.get() as instance:
        for name in PIPELINE_JOBS:
            run_config: dict = {"resources": resources, "loggers": logging}
            if name == "retrain_models_job":
                chosen, not_eligible = RunScope(lake, requested_league=league, currencies=tuple(currencies),
                                                profile_name=profile).chosen()
                if not chosen:
                    raise SystemExit(f"poe-pipeline run: no currency to forecast in {league}: "
                                     + (f"{', '.join(not_eligible)} are not eligible (see the currency_universe view)"
                                        if not_eligible else "none is eligible (see the currency_universe view)"))
                run_config |= retrain_run_config(chosen)
            echo(f"poe-pipeline run: {name}")
            result = defs.resolve_job_def(name).execute_in_process(
                run_config=run_config, instance=instance, tags=tags, raise_on_error=False)
            if not result.success:
                failures = [e.message for e in result.all_events if e.is_step_failure]
                raise SystemExit(f"poe-pipeline run failed in {name} (run {result.run_id}):\n  "
                                 + "\n  ".join(failures or ["see the log above"]))
    return summarize(lake, league, not_eligible)


def cmd_run(args: argparse.Namespace) -> int:
    history = Path(args.history).expanduser().resolve()
    check_run_inputs(history, args.league)
    currencies = _split_names(args.currencies)
    check_currencies(history, currencies)
    lake_root = resolve_lake_root(args.lake)
    check_lake(lake_root, "--lake" if args.lake else "POE_DATA_LAKE")
    prepare_dagster_home(lake_root)
    print(run_pipeline(lake_root, [history], args.league, currencies, args.profile,
                       echo=lambda m: print(m, file=sys.stderr)))
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    """One poll of poe.watch now, as the 5-minute schedule would, recorded on the lake's Dagster instance."""
    from poe_pipeline.definitions import defs
    from poe_pipeline.ingestion import poll_slot

    lake_root = resolve_lake_root(args.lake)
    check_lake(lake_root, "--lake" if args.lake else "POE_DATA_LAKE")
    prepare_dagster_home(lake_root)
    import dagster as dg

    from poe_pipeline.settings import Settings

    settings = Settings.from_env(lake_root)
    poe_watch: dict = {"min_interval_s": 1.0}
    if args.url or settings.poe_watch_url:
        poe_watch["base_url"] = args.url or settings.poe_watch_url
    if args.league or settings.league:
        poe_watch["league"] = args.league or settings.league
    run_config = {"resources": {"lake": {"config": {"root": str(lake_root)}}, "poe_watch": {"config": poe_watch}}}
    with dg.DagsterInstance.get() as instance:
        result = defs.resolve_job_def("ingestion_job").execute_in_process(
            run_config=run_config, instance=instance, raise_on_error=False,
            tags={"poe/trigger": "cli", "poe/scheduled_execution_time": poll_slot(datetime.now(UTC)).isoformat()})
    if not result.success:
        failures = [e.message for e in result.all_events if e.is_step_failure]
        raise SystemExit("poe-pipeline ingest failed:\n  " + "\n  ".join(failures or ["see the log above"]))
    (materialization,) = result.asset_materializations_for_node("price_snapshots")
    meta = {k: v.value for k, v in materialization.metadata.items()}
    stored = "stored in" if meta["written"] else "this slot was already stored in"
    print(f"poe-pipeline ingest: {meta['league']}: {meta['dagster/row_count']} records, {meta['quarantined']} "
          f"quarantined; {stored} {meta['snapshot_path']}")
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
    lake_root = resolve_lake_root(args.lake)
    check_lake(lake_root, "--lake" if args.lake else "POE_DATA_LAKE")
    try:
        summary = run_backtest_cli(history, args.league, refit_every=args.refit_every, profile=args.profile,
                                   lake_root=lake_root, currencies=_split_names(args.currencies) or None,
                                   max_origins=args.max_origins, retune_every=args.retune_every)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(summary)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poe-pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline's jobs on poe.ninja dumps, on the lake's Dagster instance")
    run.add_argument("--history", required=True, help="folder of poe.ninja dumps (<League>.currency.csv[.gz])")
    run.add_argument("--league", required=True, help="the current league: forecasts start from its last day")
    run.add_argument("--currencies", help='limit the partitions and forecasts to these, e.g. "Divine Orb,Exalted Orb"')
    run.add_argument("--profile", choices=sorted(PROFILES), default=DEFAULT_PROFILE,
                     help=f"training effort (default: {DEFAULT_PROFILE})")
    run.add_argument("--lake", help="lake root (default: $POE_DATA_LAKE or ./data_lake)")
    run.set_defaults(func=cmd_run)

    ingest = sub.add_parser("ingest", help="poll poe.watch once now (the 5-minute schedule's run, by hand)")
    ingest.add_argument("--league", help="the league to poll (default: $POE_LEAGUE, else the active one)")
    ingest.add_argument("--url", help="the API's base URL (default: $POE_WATCH_URL, else the live poe.watch)")
    ingest.add_argument("--lake", help="lake root (default: $POE_DATA_LAKE or ./data_lake)")
    ingest.set_defaults(func=cmd_ingest)

    backtest = sub.add_parser("backtest", help="replay a league day by day: daily forecasts, weekly refits, scores")
    backtest.add_argument("--history", required=True, help="folder of poe.ninja dumps")
    backtest.add_argument("--league", required=True, help="the league to replay")
    backtest.add_argument("--refit-every", type=int, default=7, help="retrain every N days (default: 7)")
    backtest.add_argument("--retune-every", type=int, default=1,
                          help="re-tune the global models every N refits; the refits between refit only the final "
                               "models, and only once the pooled rows changed by 5 %% since their fit, as the weekly "
                               "retrain does (default: 1, every refit re-tunes)")
    backtest.add_argument("--profile", choices=sorted(PROFILES), default=DEFAULT_PROFILE)
    backtest.add_argument("--currencies", help="limit to these currencies (default: the league's universe)")
    backtest.add_argument("--max-origins", type=int, help="replay at most this many days (the first ones)")
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

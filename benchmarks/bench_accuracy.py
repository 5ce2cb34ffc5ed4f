"""Accuracy against peers, on one walk-forward backtest over four development leagues.

Every method forecasts the same (league, currency, origin, horizon) rows and is scored on the same rows: those
where this project's backtest made a forecast and the price on ``origin + horizon`` was observed. Log-returns are
relative to the backtest's ``current_price`` (the feature store's forward-filled price at the origin).

- **Data.** All development dumps (``../shared/data/poe-ninja-dumps``). A forecast for league L may use every
  non-event league that started before L plus L itself up to the origin, nothing later.
- **Test leagues and origins.** ``POE_BENCH_LEAGUES`` (default Scourge, Sentinel, Kalandra, Sanctum), each
  origin of ``backtest.backtest_origins`` from league day 7 (``FIRST_ORIGIN_DAY``) to the second-to-last day, or
  only the last ``POE_BENCH_MAX_ORIGINS`` of them (default 0: all; ``POE_BENCH_ORIGIN_SLICE=first``: the first
  ones). Refits every ``POE_BENCH_REFIT_EVERY`` origins (default 7: weekly), horizons 1, 3 and 7 days.
- **Universe, per test league.** The ``POE_BENCH_CURRENCIES`` (default 30) most liquid currencies of that league,
  chosen on what is known on its first origin: the most days with a High or Medium confidence price in its first
  7 days, then in the three non-event leagues before it, then by name. No price floor: cheap bulk currencies are in.
- **Methods.**
  - ``project-<profile>``: ``backtest.run_backtest`` with that profile (``POE_BENCH_PROFILES``, default ``test``;
    ``test,dev`` adds the dev profile): the global model of each horizon and its per-currency partitions,
    refitted on schedule, features rebuilt as of each origin, intervals as live. The first refit of each league
    tunes with Optuna on its league folds; the refits after it keep that tuning (the league folds cannot change
    within a league) and refit the final models on the new data when the pooled rows changed by 5 % since their
    fit, as the weekly retrain does (``global_model.refit_due``; a week of one league's 30 currencies is about
    0.15 %, so a league's global models are fitted once and each scheduled refit says "kept"), unless
    ``POE_BENCH_RETUNE_EVERY`` (refits) asks for more re-tunes. mlforecast never tunes.
  - ``persistence``: log-return 0.
  - ``drift``: league-phase drift (the project's ``seasonal_drift_{h}d`` feature), the median h-day log-return
    of that currency in earlier non-event leagues at league days within +-3 of the origin's league day; fewer
    than 5 such returns: the all-currency median.
  - ``mlforecast``: Nixtla mlforecast, one global LightGBM (``num_threads`` 1) over the universe's series of
    log price (differenced once, so it learns log-returns), lags 1, 2, 3, 5, 7, 14, rolling mean/std/min/max
    over 3, 7 and 14 days of lag 1, weekday; direct horizons (``fit(max_horizon=7)``: one model per step; 1, 3 and
    7 are scored; ``fit(horizons=[1, 3, 7])`` breaks its conformal intervals in mlforecast 1.1.0); conformal
    intervals (``PredictionIntervals``, 2 windows) at 80 %. Refitted on the project's schedule (series too short
    for its conformal windows are left out of a fit); each origin forecasts with ``predict(new_df=...)`` from the
    current league's prices up to it, recalibrating the intervals there; a series with fewer than 23 days (a
    league's first days) gets a point forecast and no interval, and coverage counts only rows with one.
- **Scores.** Per method and horizon: log-MAE, its median, log-MAE without glitch rows (the realised price is a
  1-3 day spike that reverts: ``glitch_rows``), MAPE, skill (1 - log-MAE / persistence's), the Diebold-Mariano
  p-value against persistence (absolute-error loss, averaged over currencies per origin so that same-day errors
  are one observation; rectangular weights over h-1 lags with the Harvey-Leybourne-Newbold correction; one-sided,
  "better than persistence"), directional accuracy on moves of at least 1 % (persistence makes no call: null),
  80 % coverage overall and per league and phase (league days 7-20, 21-55, 56+; skill too) and mean Winkler score in
  log-price (methods with intervals), the share of the league's 30 x 3 (currency, horizon) pairs and of its
  rows that got a forecast, and each method's wall time for the whole backtest.

``repeats`` is ignored: the backtest is deterministic and runs once, in this process. Each league's replay is kept
in ``results/cache/`` as soon as it is done; ``POE_BENCH_REUSE_PROJECT=1`` reads back the leagues that the same
settings and the same source code (a digest of ``poe_pipeline/``) already replayed, with the wall time they took,
so a long run cut short resumes where it stopped. ``POE_BENCH_KEPT_REPLAYS`` (comma-separated kept ``.parquet``
files, each with its ``.json`` beside it) scores kept replays together, whatever code made them, instead of
replaying: runs of two leagues each become one four-league score. Each file must hold the configured leagues with
the same settings and universe, or the bench stops; the peers run as usual, and the JSON names the files, their
settings and, where they recorded it, the source digest that made them. Targets (from the issue),
judged on ``project-test``: skill >= +0.03 at 1 day and >= +0.08 at 3 and 7 days, each with DM p < 0.05; log-MAE
below mlforecast's at every horizon; coverage 75-85 % in every league and phase; at least 95 % of the pairs
forecast; the project's backtest no slower than mlforecast's.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import polars as pl

from benchmarks.harness import RESULTS_DIR, development_dumps_dir
from poe_pipeline import seasonal
from poe_pipeline.backtest import backtest_origins, calendar_as_of, load_history_prices, run_backtest, winkler_score
from poe_pipeline.forecasting import INTERVAL_LEVEL
from poe_pipeline.lake import write_parquet_atomic, write_text_atomic
from poe_pipeline.leagues import league_calendar, training_leagues
from poe_pipeline.modeling import DIRECTION_THRESHOLD, limit_threads
from poe_pipeline.names import slug
from poe_pipeline.prices import target_day
from poe_pipeline.settings import HORIZONS_DAYS
from poe_pipeline.significance import diebold_mariano

DEFAULT_LEAGUES = ("Scourge", "Sentinel", "Kalandra", "Sanctum")
FIRST_ORIGIN_DAY = 7  # "from league day 7 on": the universe is chosen on the first 7 days
UNIVERSE_DAYS = 7
PHASES = ((7, 20, "days 7-20"), (21, 55, "days 21-55"), (56, 10_000, "days 56+"))
GLITCH_JUMP = math.log(3)  # a glitch: the price jumps 3x (or to a third) into a day ...
GLITCH_BACK = math.log(1.5)  # ... and is back within 1.5x of the day before, within 3 days
LIQUIDITY_LEAGUES = 3  # non-event leagues before the first test league that rank liquidity
MLF_LAGS = (1, 2, 3, 5, 7, 14)
MLF_WINDOWS = (3, 7, 14)
MLF_THREADS = 1  # OpenMP threads spin: on a busy 2-core machine 2 threads made a fit ~50x slower
MLF_CONFORMAL_WINDOWS = 2
KEYS = ["league", "currency", "origin_date", "horizon_days"]
# the settings a kept replay must share with the run that reuses it
REPLAY_SETTINGS = ("currencies", "refit_every", "retune_every", "max_origins", "origin_slice", "horizons", "level")


# --- configuration ----------------------------------------------------------------------------------------------


def config_from_env() -> dict:
    """The run's size; the defaults are the issue's full setting."""
    env = os.environ.get
    return {
        "leagues": [x.strip() for x in env("POE_BENCH_LEAGUES", ",".join(DEFAULT_LEAGUES)).split(",") if x.strip()],
        "currencies": int(env("POE_BENCH_CURRENCIES", "30")),
        "refit_every": int(env("POE_BENCH_REFIT_EVERY", "7")),
        "retune_every": int(env("POE_BENCH_RETUNE_EVERY", "1000")),  # in refits: once per league by default
        "max_origins": int(env("POE_BENCH_MAX_ORIGINS", "0")),  # 0: every origin; N: the last N of each league
        "origin_slice": env("POE_BENCH_ORIGIN_SLICE", "last"),  # with max_origins: the "last" or "first" N
        "profiles": [x.strip() for x in env("POE_BENCH_PROFILES", "test").split(",") if x.strip()],
        "workers": int(env("POE_BENCH_WORKERS", "0")) or (os.cpu_count() or 1),
        "horizons": list(HORIZONS_DAYS),
        "level": INTERVAL_LEVEL,
        "kept_replays": [x.strip() for x in env("POE_BENCH_KEPT_REPLAYS", "").split(",") if x.strip()],
    }


def _say(msg: str) -> None:
    print(f"  [accuracy] {msg}", file=sys.stderr, flush=True)


# --- universe and origins ---------------------------------------------------------------------------------------


def liquid_universe(prices: pl.DataFrame, league: str, n: int) -> tuple[list[str], list[str]]:
    """(the ``n`` most liquid currencies of ``league``, the earlier leagues that broke ties); see the docstring."""
    calendar = league_calendar(prices)
    start = calendar.filter(pl.col("league") == league)["start_date"].item()
    before = (calendar.filter(~pl.col("is_event") & (pl.col("start_date") < start))
              .sort("start_date")["league"].to_list()[-LIQUIDITY_LEAGUES:])
    good = pl.col("confidence").is_in(["High", "Medium"])
    first_days = (prices.filter((pl.col("league") == league) & (pl.col("date") < start + timedelta(days=UNIVERSE_DAYS))
                                & good & (pl.col("currency") != "Chaos Orb"))
                  .group_by("currency").len("now"))
    past = prices.filter(pl.col("league").is_in(before) & good).group_by("currency").len("past")
    ranked = (first_days.join(past, on="currency", how="left").fill_null(0)
              .sort(["now", "past", "currency"], descending=[True, True, False]))
    return ranked["currency"].head(n).to_list(), before


def league_origins(prices: pl.DataFrame, league: str, max_origins: int, origin_slice: str = "last") -> list[date]:
    if origin_slice not in ("first", "last"):
        raise ValueError(f"POE_BENCH_ORIGIN_SLICE={origin_slice!r}: use 'first' or 'last'")
    origins = backtest_origins(prices, league, first_day=FIRST_ORIGIN_DAY)
    if not max_origins:
        return origins
    return origins[:max_origins] if origin_slice == "first" else origins[-max_origins:]


# --- this project -----------------------------------------------------------------------------------------------


def project_predictions(prices: pl.DataFrame, cfg: dict, universes: dict[str, list[str]],
                        profile: str) -> tuple[pl.DataFrame, float, int]:
    """(predictions of every test league, wall seconds, refits), league by league (``league_predictions``)."""
    limit_threads()
    frames, wall, refits = [], 0.0, 0
    for league in cfg["leagues"]:
        frame, seconds, league_refits = league_predictions(prices, cfg, league, universes[league], profile)
        frames.append(frame)
        wall += seconds
        refits += league_refits
    return pl.concat(frames), wall, refits


def _replay_league(prices: pl.DataFrame, cfg: dict, league: str, universe: list[str],
                   profile: str) -> tuple[pl.DataFrame, float, int]:
    started = time.perf_counter()
    origins = league_origins(prices, league, cfg["max_origins"], cfg["origin_slice"])
    run = run_backtest(prices, league, origins, universe, cfg["refit_every"], profile, cfg["horizons"],
                       cfg["level"], workers=cfg["workers"], progress=lambda m: _say(f"{league} {m}"),
                       retune_every=cfg["retune_every"])
    frame = run.predictions.select(*KEYS, "current_price", "predicted_price", "pred_lower", "pred_upper",
                                   "actual_price")
    return frame, time.perf_counter() - started, len(run.refits)


def _code_digest() -> str:
    """A digest of the project's source files: kept forecasts are only ever reused by the code that made them."""
    root = Path(__file__).resolve().parent.parent / "poe_pipeline"
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def league_predictions(prices: pl.DataFrame, cfg: dict, league: str, universe: list[str],
                       profile: str) -> tuple[pl.DataFrame, float, int]:
    """One test league's replay (predictions, wall seconds, refits), kept on disk as soon as it exists, so that a
    later league or a peer failing loses nothing. ``POE_BENCH_REUSE_PROJECT=1`` reads it back instead when the
    same configuration was replayed by the same source code (``_code_digest``)."""
    key = json.dumps({k: cfg[k] for k in REPLAY_SETTINGS}
                     | {"league": league, "universe": universe, "profile": profile, "code": _code_digest()},
                     sort_keys=True)
    path = RESULTS_DIR / "cache" / f"accuracy-{slug(league)}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.parquet"
    meta = path.with_suffix(".json")
    if os.environ.get("POE_BENCH_REUSE_PROJECT") == "1" and path.exists() and meta.exists():
        kept = json.loads(meta.read_text())
        _say(f"{league}: reusing {path.name} (wall {kept['wall_s']:.0f}s when measured)")
        return pl.read_parquet(path), kept["wall_s"], kept["refits"]
    frame, wall, refits = _replay_league(prices, cfg, league, universe, profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(frame, path)
    write_text_atomic(json.dumps({"config": json.loads(key), "wall_s": wall, "refits": refits}), meta)
    return frame, wall, refits


def kept_project_predictions(cfg: dict, universes: dict[str, list[str]],
                             profile: str) -> tuple[pl.DataFrame, float, int, list[dict]]:
    """(predictions, wall seconds, refits, where each came from) read from ``cfg["kept_replays"]``, each file
    checked against the run's settings, universes and leagues, so that nothing is scored that this configuration
    would not have replayed and every test league is scored once."""
    frames, wall, refits, sources, seen = [], 0.0, 0, [], set()
    for name in cfg["kept_replays"]:
        path = Path(name)
        meta_path = path.with_suffix(".json")
        if not path.exists() or not meta_path.exists():
            raise FileNotFoundError(f"kept replay {path} (and {meta_path.name} beside it) not found")
        meta = json.loads(meta_path.read_text())
        kept = meta["config"]
        leagues = kept["leagues"] if "leagues" in kept else [kept["league"]]
        kept_universes = kept.get("universes") or {kept.get("league"): kept.get("universe")}
        wrong = [k for k in REPLAY_SETTINGS if kept.get(k) != cfg[k]]
        if kept.get("profile") != profile:
            wrong.append("profile")
        wrong += [f"universe of {lg}" for lg in leagues if lg in universes and kept_universes.get(lg) != universes[lg]]
        if wrong:
            raise ValueError(f"kept replay {path.name} was made with other settings: {', '.join(wrong)}")
        if extra := [lg for lg in leagues if lg not in cfg["leagues"]]:  # its wall time would count them
            raise ValueError(f"kept replay {path.name} also holds {', '.join(extra)}, which this run does not test")
        if overlap := seen & set(leagues):
            raise ValueError(f"kept replay {path.name} repeats {', '.join(sorted(overlap))}")
        seen |= set(leagues)
        frames.append(pl.read_parquet(path))
        wall += meta["wall_s"]
        refits += meta["refits"]
        sources.append({"file": path.name, "leagues": leagues, "wall_s": meta["wall_s"], "refits": meta["refits"],
                        "code": kept.get("code")})
        _say(f"kept replay {path.name}: {', '.join(leagues)} (wall {meta['wall_s']:.0f}s when measured)")
    if missing := [lg for lg in cfg["leagues"] if lg not in seen]:
        raise ValueError(f"no kept replay holds {', '.join(missing)}")
    return pl.concat(frames), wall, refits, sources


# --- league-phase drift -----------------------------------------------------------------------------------------


def drift_predictions(prices: pl.DataFrame, base: pl.DataFrame, cfg: dict) -> tuple[pl.DataFrame, float]:
    """The project's league-phase drift feature (``seasonal``) of each row's currency, origin day and horizon, as
    the forecast: the median past-league log-return at that league age."""
    t0 = time.perf_counter()
    calendar = league_calendar(prices)
    rows = seasonal.with_league_day(base.filter(pl.col("league").is_in(cfg["leagues"])), calendar, "origin_date")
    drift = seasonal.seasonal_drift(rows, prices, calendar).with_columns(
        pl.coalesce(pl.when(pl.col("horizon_days") == h).then(pl.col(f"seasonal_drift_{h}d"))
                    for h in HORIZONS_DAYS).fill_null(0.0).alias("pred_logret"))
    return drift.select(*KEYS, "pred_logret"), time.perf_counter() - t0


# --- mlforecast -------------------------------------------------------------------------------------------------


def _daily_log_series(prices: pl.DataFrame, leagues: list[str], currencies: list[str]) -> pl.DataFrame:
    """(unique_id, league, ds, y): log price on a daily grid from each series' first observation to its league's
    last observed day, forward-filled (a fill uses only earlier days, so cutting at an origin later is exact)."""
    rows = prices.filter(pl.col("league").is_in(leagues) & pl.col("currency").is_in(currencies))
    last = rows.group_by("league").agg(pl.col("date").max().alias("last"))
    first = rows.group_by("league", "currency").agg(pl.col("date").min().alias("first")).join(last, on="league")
    grid = (first.with_columns(pl.date_ranges("first", "last", "1d").alias("date")).explode("date")
            .select("league", "currency", "date"))
    return (grid.join(rows.select("league", "currency", "date", "price_chaos"), on=["league", "currency", "date"],
                      how="left")
            .sort("league", "currency", "date")
            .with_columns(pl.col("price_chaos").forward_fill().over("league", "currency"))
            .select((pl.col("league") + "|" + pl.col("currency")).alias("unique_id"), "league", "currency",
                    pl.col("date").alias("ds"), pl.col("price_chaos").log().alias("y")))


def _mlforecast_model():
    import lightgbm as lgb
    from mlforecast import MLForecast
    from mlforecast.lag_transforms import RollingMax, RollingMean, RollingMin, RollingStd
    from mlforecast.target_transforms import Differences

    windows = [t(w) for w in MLF_WINDOWS for t in (RollingMean, RollingStd, RollingMin, RollingMax)]
    model = lgb.LGBMRegressor(n_estimators=300, learning_rate=0.05, num_leaves=31, min_child_samples=50,
                              subsample=0.8, subsample_freq=1, colsample_bytree=0.8, num_threads=MLF_THREADS,
                              verbosity=-1, random_state=42)
    return MLForecast(models={"lgbm": model}, freq="1d", lags=list(MLF_LAGS), lag_transforms={1: windows},
                      date_features=["dayofweek"], target_transforms=[Differences([1])], num_threads=MLF_THREADS)


def mlforecast_predictions(prices: pl.DataFrame, base: pl.DataFrame, cfg: dict,
                           universes: dict[str, list[str]]) -> tuple[pl.DataFrame, float, int]:
    """Walk-forward mlforecast on the project's schedule: (pred_logret, lo, hi per base row, wall s, refits)."""
    from mlforecast.utils import PredictionIntervals

    t0 = time.perf_counter()
    level = round(cfg["level"] * 100)
    horizons = cfg["horizons"]
    out, refits = [], 0
    for league in cfg["leagues"]:
        origins = league_origins(prices, league, cfg["max_origins"], cfg["origin_slice"])
        order = training_leagues(calendar_as_of(prices.filter(pl.col("date") <= origins[0]), origins[0]), league)
        series = _daily_log_series(prices, order, universes[league]).to_pandas()
        current = series[series["league"] == league]
        fcst = None
        for i, origin in enumerate(origins):
            ts = np.datetime64(origin)
            if i % cfg["refit_every"] == 0:
                train = series[(series["league"] != league) | (series["ds"] <= ts)][["unique_id", "ds", "y"]]
                # its conformal windows need every fitted series this long; a current-league series that is
                # shorter (early origins) is still forecast from new_df
                sizes = train.groupby("unique_id")["y"].transform("size")
                train = train[sizes >= max(horizons) * MLF_CONFORMAL_WINDOWS + 1]
                fcst = _mlforecast_model()
                fcst.fit(train, max_horizon=max(horizons),
                         prediction_intervals=PredictionIntervals(n_windows=MLF_CONFORMAL_WINDOWS, h=max(horizons)))
                refits += 1
            # each origin forecasts from the current league's series up to it (the model stays the last refit's);
            # with new_df, mlforecast recalibrates the conformal scores on those series' last windows
            new = current[current["ds"] <= ts][["unique_id", "ds", "y"]]
            # recalibrating the intervals on new_df needs h + windows - 1 + the longest lag + 1 days of a series;
            # shorter series (the first days of a league) get a point forecast and no interval
            sizes = new.groupby("unique_id")["y"].transform("size")
            long_enough = sizes >= max(horizons) + MLF_CONFORMAL_WINDOWS + max(MLF_LAGS)
            parts = []
            if long_enough.any():
                parts.append(pl.from_pandas(fcst.predict(h=max(horizons), level=[level], new_df=new[long_enough])))
            if (~long_enough).any():
                parts.append(pl.from_pandas(fcst.predict(h=max(horizons), new_df=new[~long_enough])))
            pred = pl.concat(parts, how="diagonal_relaxed")
            pred = pred.with_columns(pl.lit(None, pl.Float64).alias(c) for c in
                                     (f"lgbm-lo-{level}", f"lgbm-hi-{level}") if c not in pred.columns)
            last = pl.from_pandas(current[current["ds"] == ts][["unique_id", "y"]])
            pred = (pred.with_columns(pl.col("ds").cast(pl.Date))
                    .with_columns((pl.col("ds") - origin).dt.total_days().cast(pl.Int32).alias("horizon_days"))
                    .filter(pl.col("horizon_days").is_in(horizons))
                    .join(last, on="unique_id")
                    .select(pl.lit(league).alias("league"), pl.col("unique_id").str.split("|").list.get(1)
                            .alias("currency"), pl.lit(origin).alias("origin_date"), "horizon_days",
                            (pl.col("lgbm") - pl.col("y")).alias("pred_logret"),
                            (pl.col(f"lgbm-lo-{level}") - pl.col("y")).alias("lo_logret"),
                            (pl.col(f"lgbm-hi-{level}") - pl.col("y")).alias("hi_logret")))
            out.append(pred)
        _say(f"{league}: mlforecast {len(origins)} origins in {time.perf_counter() - t0:.1f}s so far")
    frame = pl.concat(out).cast({"horizon_days": pl.Int32})
    keys = base.select(KEYS).cast({"horizon_days": pl.Int32})
    return keys.join(frame, on=KEYS, how="left"), time.perf_counter() - t0, refits


# --- scoring ----------------------------------------------------------------------------------------------------


def with_context(base: pl.DataFrame, prices: pl.DataFrame) -> pl.DataFrame:
    """``base`` plus each row's league day and whether its realised price is a glitch: a jump of 3x (or to a
    third) into the target day from the day before it, back within 1.5x of that day before within 3 days. Only
    scoring reads the days after the target."""
    calendar = league_calendar(prices).select("league", "start_date")
    lp = prices.select("league", "currency", "date", pl.col("price_chaos").log().alias("lp"))
    rows = base.with_columns(target_day().alias("_t")).join(calendar, on="league", how="left").with_columns(
        (pl.col("origin_date") - pl.col("start_date")).dt.total_days().cast(pl.Int32).alias("league_day"))
    shifted = {k: lp.with_columns((pl.col("date") - timedelta(days=k)).alias("_t")).select(
        "league", "currency", "_t", pl.col("lp").alias(f"_lp{k}")) for k in (-1, 0, 1, 2, 3)}
    for frame in shifted.values():
        rows = rows.join(frame, on=["league", "currency", "_t"], how="left")
    jump = (pl.col("_lp0") - pl.col("_lp-1")).abs() > GLITCH_JUMP
    back = pl.any_horizontal([(pl.col(f"_lp{k}") - pl.col("_lp-1")).abs() < GLITCH_BACK for k in (1, 2, 3)])
    return rows.with_columns((jump & back).fill_null(False).alias("glitch")).drop(
        "_t", "start_date", *[f"_lp{k}" for k in (-1, 0, 1, 2, 3)])



def replay_logrets(pred: pl.DataFrame) -> pl.DataFrame:
    """A project replay's forecast and interval as log returns from the origin's price (what ``score`` reads)."""
    return pred.cast({"horizon_days": pl.Int32}).select(
        *KEYS, (pl.col("predicted_price") / pl.col("current_price")).log().alias("pred_logret"),
        (pl.col("pred_lower") / pl.col("current_price")).log().alias("lo_logret"),
        (pl.col("pred_upper") / pl.col("current_price")).log().alias("hi_logret"))


def _phase_cells(g: pl.DataFrame) -> list[tuple[str, str, np.ndarray]]:
    """(league, phase, row mask) of each league and phase (``PHASES``), in order; none without ``league_day``."""
    if "league_day" not in g.columns:
        return []
    day, leagues = g["league_day"].to_numpy(), g["league"].to_numpy()
    return [(lg, name, (leagues == lg) & (day >= first) & (day <= last))
            for lg in dict.fromkeys(leagues) for first, last, name in PHASES]


def score(frame: pl.DataFrame, level: float, has_intervals: bool, makes_calls: bool = True) -> list[dict]:
    """``frame``: KEYS, current_price, actual_price, pred_logret[, lo_logret, hi_logret]; one dict per horizon."""
    rows = []
    for (h,), g in sorted(frame.partition_by("horizon_days", as_dict=True).items()):
        g = g.sort("league", "origin_date", "currency")
        actual = np.log(g["actual_price"].to_numpy() / g["current_price"].to_numpy())
        pred = g["pred_logret"].to_numpy()
        err = np.abs(actual - pred)
        base = np.abs(actual)
        mae, pmae = float(err.mean()), float(base.mean())
        # one loss differential per origin (mean over currencies), leagues one after the other in time order
        per_origin = (g.with_columns(pl.Series("_d", err - base))
                      .group_by("league", "origin_date", maintain_order=True).agg(pl.col("_d").mean()))
        stat, p = diebold_mariano(per_origin["_d"].to_numpy(), int(h))
        moved = np.abs(actual) >= DIRECTION_THRESHOLD
        clean = ~g["glitch"].to_numpy() if "glitch" in g.columns else np.ones(g.height, dtype=bool)
        row = {
            "horizon_days": int(h), "n": g.height, "origins": per_origin.height,
            "log_mae": mae, "persistence_log_mae": pmae,
            "skill": 1 - mae / pmae if pmae > 0 else None,
            "median_abs_log_error": float(np.median(err)), "persistence_median_abs_log_error": float(np.median(base)),
            "glitch_rows": int((~clean).sum()),
            "log_mae_no_glitch": float(err[clean].mean()), "persistence_log_mae_no_glitch": float(base[clean].mean()),
            "skill_no_glitch": 1 - float(err[clean].mean()) / float(base[clean].mean()),
            "mape": float(np.mean(np.abs(np.exp(pred - actual) - 1))),
            "dm_stat": stat, "dm_p": p,
            "directional_accuracy": float(np.mean(np.sign(pred[moved]) == np.sign(actual[moved])))
            if makes_calls and moved.any() else None,
            "moves": int(moved.sum()),
            "coverage": None, "mean_winkler": None,
        }
        cells = _phase_cells(g)
        if cells:  # where in a league the skill comes from
            row["skill_by_league_phase"] = [
                {"league": lg, "phase": name, "n": int(m.sum()), "log_mae": float(err[m].mean()),
                 "persistence_log_mae": float(base[m].mean()),
                 "skill": 1 - float(err[m].mean()) / float(base[m].mean()) if base[m].mean() > 0 else None}
                for lg, name, m in cells if m.any()]
        if has_intervals:  # over the rows that have an interval (mlforecast has none on a league's first days)
            lo = g["lo_logret"].cast(pl.Float64).fill_null(np.nan).to_numpy()
            hi = g["hi_logret"].cast(pl.Float64).fill_null(np.nan).to_numpy()
            has = np.isfinite(lo) & np.isfinite(hi)
            row["interval_rows"] = int(has.sum())
            if has.any():
                inside = (actual >= lo) & (actual <= hi)
                row["coverage"] = float(np.mean(inside[has]))
                row["mean_winkler"] = float(np.mean(winkler_score(lo[has], hi[has], actual[has], level)))
                if cells:
                    row["coverage_by_league_phase"] = [
                        {"league": lg, "phase": name, "n": int(m.sum()), "coverage": float(np.mean(inside[m]))}
                        for lg, name, cell in cells if (m := has & cell).any()]
        rows.append(row)
    return rows


# --- the bench --------------------------------------------------------------------------------------------------


def _fmt(value, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def markdown(results: dict) -> str:
    lines = ["| method | h | n | log-MAE | MAPE | skill | DM p | direction | coverage 80% | Winkler | wall s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for method, m in results["methods"].items():
        for r in m["scores"]:
            lines.append(
                f"| {method} | {r['horizon_days']}d | {r['n']} | {_fmt(r['log_mae'], '.4f')} | "
                f"{_fmt(r['mape'], '.2%')} | {_fmt(r['skill'], '+.3f')} | {_fmt(r['dm_p'], '.3g')} | "
                f"{_fmt(r['directional_accuracy'], '.1%')} | {_fmt(r['coverage'], '.1%')} | "
                f"{_fmt(r['mean_winkler'], '.4f')} | {m['wall_s']:.1f} |")
    return "\n".join(lines)


SKILL_TARGETS = {1: 0.03, 3: 0.08, 7: 0.08}


def _targets(results: dict, horizons: list[int]) -> dict:
    methods = results["methods"]
    ours = methods.get("project-test") or next(v for k, v in methods.items() if k.startswith("project-"))
    by_h = {r["horizon_days"]: r for r in ours["scores"]}
    targets: dict = {}
    for h, floor in SKILL_TARGETS.items():
        if h in by_h:
            r = by_h[h]
            targets[f"skill_{h}d"] = {
                "metric": f"project skill vs persistence at {h}d (DM p = {r['dm_p']:.3g})", "value": r["skill"],
                "target": f">= {floor:+.2f} with DM p < 0.05",
                "met": bool(r["skill"] is not None and r["skill"] >= floor and r["dm_p"] < 0.05)}
    if "mlforecast" in methods:
        mlf = {r["horizon_days"]: r for r in methods["mlforecast"]["scores"]}
        for h in horizons:
            if h in by_h and h in mlf:
                ratio = by_h[h]["log_mae"] / mlf[h]["log_mae"]
                targets[f"log_mae_vs_mlforecast_{h}d"] = {
                    "metric": f"project log-MAE / mlforecast log-MAE at {h}d", "value": ratio,
                    "target": "< 1", "met": bool(ratio < 1)}
        ratio = ours["wall_s"] / methods["mlforecast"]["wall_s"]
        targets["wall_vs_mlforecast"] = {"metric": "project backtest wall / mlforecast backtest wall",
                                         "value": ratio, "target": "<= 1", "met": bool(ratio <= 1)}
    for h in horizons:
        cells = (by_h.get(h) or {}).get("coverage_by_league_phase") or []
        if cells:
            worst = max(cells, key=lambda c: abs(c["coverage"] - results["config"]["level"]))
            targets[f"coverage_{h}d_every_league_and_phase"] = {
                "metric": f"80% coverage in each league and phase at {h}d (worst: {worst['league']} "
                          f"{worst['phase']}, {worst['coverage']:.3f} on {worst['n']} rows)",
                "value": [round(c["coverage"], 3) for c in cells], "target": "0.75-0.85 in every cell",
                "met": all(0.75 <= c["coverage"] <= 0.85 for c in cells)}
    share = results["pairs_forecast"]["pairs_share"]
    targets["pairs_forecast"] = {"metric": "share of the 30 x 3 (currency, horizon) pairs of each league forecast",
                                 "value": share, "target": ">= 0.95", "met": bool(share >= 0.95)}
    return targets


def run(repeats: int = 1, **overrides) -> dict:
    """The whole comparison, once (``repeats`` is ignored). Keyword overrides beat the environment."""
    del repeats
    cfg = {**config_from_env(), **overrides}
    directory, source = development_dumps_dir()
    prices = load_history_prices(Path(directory))
    universes, ranked_on = {}, {}
    for league in cfg["leagues"]:
        universes[league], ranked_on[league] = liquid_universe(prices, league, cfg["currencies"])
        _say(f"{league} universe ({len(universes[league])}): {', '.join(universes[league])}")
    methods: dict[str, dict] = {}
    project: dict[str, tuple[pl.DataFrame, float, int]] = {}
    kept_from: list[dict] = []
    if cfg["kept_replays"]:
        if len(cfg["profiles"]) != 1:
            raise ValueError("POE_BENCH_KEPT_REPLAYS scores one profile: set POE_BENCH_PROFILES to it")
        pred, wall, refits, kept_from = kept_project_predictions(cfg, universes, cfg["profiles"][0])
        project[cfg["profiles"][0]] = (pred, wall, refits)
    else:
        for profile in cfg["profiles"]:
            _say(f"project, profile {profile}")
            project[profile] = project_predictions(prices, cfg, universes, profile)
    first = cfg["profiles"][0]
    # the scored rows: the first profile's forecasts whose realised price is known
    base = with_context(project[first][0].filter(pl.col("actual_price").is_not_null()).select(
        *KEYS, "current_price", "actual_price").cast({"horizon_days": pl.Int32}), prices)
    for profile, (pred, wall, refits) in project.items():
        frame = base.join(replay_logrets(pred), on=KEYS, how="inner")
        methods[f"project-{profile}"] = {"frame": frame, "wall_s": wall, "refits": refits, "intervals": True}
    t0 = time.perf_counter()
    methods["persistence"] = {"frame": base.with_columns(pl.lit(0.0).alias("pred_logret")), "intervals": False,
                              "calls": False}
    methods["persistence"]["wall_s"] = time.perf_counter() - t0
    drift, wall = drift_predictions(prices, base, cfg)
    methods["drift"] = {"frame": base.join(drift, on=KEYS), "wall_s": wall, "intervals": False}
    _say(f"drift in {wall:.1f}s; mlforecast")
    mlf, wall, refits = mlforecast_predictions(prices, base, cfg, universes)
    methods["mlforecast"] = {"frame": base.join(mlf, on=KEYS), "wall_s": wall, "refits": refits, "intervals": True}
    # every method is scored on the rows every method forecast
    common = base.select(KEYS)
    for m in methods.values():
        common = common.join(m["frame"].filter(pl.col("pred_logret").is_not_null()).select(KEYS), on=KEYS)
    forecast = project[first][0]
    possible = sum(len(universes[lg]) for lg in cfg["leagues"]) * len(cfg["horizons"])
    pairs = forecast.select("league", "currency", "horizon_days").unique().height
    origins = sum(len(league_origins(prices, lg, cfg["max_origins"], cfg["origin_slice"])) * len(universes[lg])
                  for lg in cfg["leagues"]) * len(cfg["horizons"])
    coverage_of_pairs = {"pairs_forecast": pairs, "pairs_possible": possible, "pairs_share": pairs / possible,
                         "rows_forecast": forecast.height, "rows_possible": origins,
                         "rows_share": forecast.height / origins}
    results: dict = {
        "pairs_forecast": coverage_of_pairs,
        "config": {**cfg, "universes": universes, "liquidity_ties_broken_on": ranked_on, "data": source,
                   "origins_per_league": {lg: len(league_origins(prices, lg, cfg["max_origins"], cfg["origin_slice"]))
                                          for lg in cfg["leagues"]},
                   "scored_rows": common.height, "rows_dropped_not_common": base.height - common.height,
                   **({"kept_replays": kept_from} if kept_from else {})},
        "methods": {},
    }
    for name, m in methods.items():
        frame = m["frame"].join(common, on=KEYS)
        results["methods"][name] = {
            "wall_s": m["wall_s"], **({"refits": m["refits"]} if "refits" in m else {}),
            "scores": score(frame, cfg["level"], m["intervals"], m.get("calls", True)),
        }
    print(markdown(results), file=sys.stderr)
    return {"results": results, "targets": _targets(results, cfg["horizons"])}

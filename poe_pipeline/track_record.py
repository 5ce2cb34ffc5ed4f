"""The track record: how the report's past advice turned out.

- **Advice.** Every row of a past report: a currency, a horizon, ``buy`` / ``hold`` / ``sell``, the price then, the
  forecast and its interval, and the plan's allocation. It comes from the stored tables of past investment reports
  (source ``live``) and from a replay of earlier days (source ``backtest``: ``backfill_advice`` refits the
  champions' global models warm, on only the prices known at each origin, and writes the report each day would have
  had). Where both exist for one (league, origin, currency, horizon), the live advice is the one scored.
- **Outcomes** (``advice_outcomes``). Each piece of advice against the daily price on ``origin + horizon``
  (``daily_prices``; none that day: ``not observed``; that day not reached yet: ``pending``).
  ``realized_return`` is ``price_at_horizon / price_at_origin - 1`` (a fraction). A ``buy`` was right when the
  price rose, a ``sell`` when it fell, a ``hold`` when the price stayed inside the forecast's interval (no move
  beyond the noise, so not trading was right). ``beat_no_change``: the forecast's log error was smaller than that
  of "no change".
- **Plans** (``plan_outcomes``). Per (league, source, origin, horizon): the report's picks with their allocation,
  the rest kept in chaos: ``plan_return = sum(allocation_fraction x realized_return)``, against holding chaos
  (0) and an equal-weight basket of every currency the report ranked at that horizon.
- **Cumulative.** Plans chained without overlap: at each horizon, the first scored origin, then the first one at
  least ``horizon`` days after it, and so on, compounding (``cumulative_returns``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import polars as pl

from poe_pipeline.lake import Lake, read_parquet_files, write_parquet_atomic
from poe_pipeline.prices import target_day

SOURCES = ("live", "backtest")
BACKFILL_DAYS = 14  # a new lake's track record: the last two weeks of the league, replayed
# One warm refit for those two weeks: the replay's models are up to 14 days old by its end, older than the weekly
# retrain's would be; each refit costs 30-40 s on two cores.
BACKFILL_REFIT_EVERY = 14

ADVICE_OUTCOMES_SCHEMA: dict[str, pl.DataType] = {
    "league": pl.Utf8,
    "origin_date": pl.Date,
    "horizon_days": pl.Int32,
    "target_date": pl.Date,
    "currency": pl.Utf8,
    "source": pl.Utf8,
    "advice": pl.Utf8,
    "picked": pl.Boolean,
    "allocation_fraction": pl.Float64,
    "price_at_origin": pl.Float64,
    "predicted_price": pl.Float64,
    "pred_lower": pl.Float64,
    "pred_upper": pl.Float64,
    "expected_return": pl.Float64,
    "price_at_horizon": pl.Float64,
    "realized_return": pl.Float64,
    "abs_log_error": pl.Float64,
    "no_change_abs_log_error": pl.Float64,
    "beat_no_change": pl.Boolean,
    "inside_interval": pl.Boolean,
    "advice_right": pl.Boolean,
    "status": pl.Utf8,
    "model_version": pl.Utf8,
}

PLAN_OUTCOMES_SCHEMA: dict[str, pl.DataType] = {
    "league": pl.Utf8,
    "source": pl.Utf8,
    "origin_date": pl.Date,
    "horizon_days": pl.Int32,
    "exit_date": pl.Date,
    "picks": pl.Utf8,
    "invested_fraction": pl.Float64,
    "plan_return": pl.Float64,
    "chaos_return": pl.Float64,
    "basket_return": pl.Float64,
    "basket_size": pl.Int32,
    "status": pl.Utf8,
}


# --- where it lives -----------------------------------------------------------------------------------------------


def backfill_path(lake: Lake, league: str) -> Path:
    return lake.league_path(lake.track_record / "backfill", league, "advice.parquet")


def outcomes_path(lake: Lake, league: str) -> Path:
    return lake.league_path(lake.advice_outcomes, league, "part.parquet")


def plans_path(lake: Lake, league: str) -> Path:
    return lake.league_path(lake.plan_outcomes, league, "part.parquet")


def read_backfill(lake: Lake, league: str) -> pl.DataFrame:
    from poe_pipeline.reporting import REPORT_SCHEMA

    path = backfill_path(lake, league)
    if not path.exists():
        return pl.DataFrame(schema=REPORT_SCHEMA)
    return read_parquet_files([path], "materialize advice_outcomes again: the replay is rebuilt")


def read_outcomes(lake: Lake, league: str | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(advice_outcomes, plan_outcomes) as stored, of one league or all."""
    def read(base, schema):
        files = [p for p in lake.parquet_files(base)
                 if league is None or p.parent.name == f"league={league}"] if base.is_dir() else []
        if not files:
            return pl.DataFrame(schema=schema)
        return read_parquet_files(files, "materialize advice_outcomes again", hive_partitioning=False)

    return read(lake.advice_outcomes, ADVICE_OUTCOMES_SCHEMA), read(lake.plan_outcomes, PLAN_OUTCOMES_SCHEMA)


# --- advice -------------------------------------------------------------------------------------------------------


def league_advice(lake: Lake, league: str) -> pl.DataFrame:
    """Every stored piece of advice of the league (report rows with a ``source``), live over backtest."""
    from poe_pipeline.reporting import read_report_table

    live = read_report_table(lake, league).with_columns(pl.lit("live").alias("source"))
    replayed = read_backfill(lake, league).with_columns(pl.lit("backtest").alias("source"))
    both = pl.concat([live, replayed], how="vertical_relaxed")
    keys = ["league", "origin_date", "currency", "horizon_days"]
    return (both.with_columns(pl.col("source").replace_strict({s: i for i, s in enumerate(SOURCES)},
                                                              return_dtype=pl.Int8).alias("_rank"))
            .sort([*keys, "_rank"]).unique(keys, keep="first", maintain_order=True).drop("_rank"))


def score_advice(advice: pl.DataFrame, daily_prices: pl.DataFrame) -> pl.DataFrame:
    """``advice_outcomes``: each piece of advice (report rows with a ``source``) against ``daily_prices``."""
    if advice.height == 0:
        return pl.DataFrame(schema=ADVICE_OUTCOMES_SCHEMA)
    last_day = daily_prices.group_by("league").agg(pl.col("date").max().alias("_last"))
    realised = daily_prices.select("league", "currency", pl.col("date").alias("target_date"),
                                   pl.col("price_chaos").alias("price_at_horizon"))
    rows = (
        advice.with_columns(
            target_day().alias("target_date"),
            pl.col("current_price").alias("price_at_origin"),
        )
        .join(realised, on=["league", "currency", "target_date"], how="left")
        .join(last_day, on="league", how="left")
    )
    p, p0 = pl.col("price_at_horizon"), pl.col("price_at_origin")
    scored = p.is_not_null()
    out = rows.with_columns(
        (p / p0 - 1).alias("realized_return"),
        (p / pl.col("predicted_price")).log().abs().alias("abs_log_error"),
        (p / p0).log().abs().alias("no_change_abs_log_error"),
        ((p >= pl.col("pred_lower")) & (p <= pl.col("pred_upper"))).alias("inside_interval"),
        pl.when(scored).then(pl.lit("scored"))
        .when(pl.col("target_date") > pl.col("_last").fill_null(date.min)).then(pl.lit("pending"))
        .otherwise(pl.lit("not observed")).alias("status"),
    ).with_columns(
        (pl.col("abs_log_error") < pl.col("no_change_abs_log_error")).alias("beat_no_change"),
        pl.when(pl.col("advice") == "buy").then(p > p0)
        .when(pl.col("advice") == "sell").then(p < p0)
        .otherwise(pl.col("inside_interval")).alias("advice_right"),
    )
    return (out.select([pl.col(c).cast(t) for c, t in ADVICE_OUTCOMES_SCHEMA.items()])
            .sort("origin_date", "horizon_days", "currency", "source"))


def plan_outcomes(outcomes: pl.DataFrame) -> pl.DataFrame:
    """``plan_outcomes``: per (league, source, origin, horizon), the plan's realised return against chaos and the
    equal-weight basket. A plan whose picks are not all scored is ``pending`` or ``not observed``, with no returns."""
    if outcomes.height == 0:
        return pl.DataFrame(schema=PLAN_OUTCOMES_SCHEMA)
    keys = ["league", "source", "origin_date", "horizon_days"]
    picked = pl.col("picked").fill_null(False)
    frac = pl.col("allocation_fraction").fill_null(0.0)
    plans = outcomes.group_by(keys).agg(
        pl.col("target_date").first().alias("exit_date"),
        pl.col("currency").filter(picked & (frac > 0)).alias("_names"),
        frac.filter(picked & (frac > 0)).alias("_fracs"),
        frac.filter(picked).sum().alias("invested_fraction"),
        (frac * pl.col("realized_return")).filter(picked & (frac > 0)).sum().alias("plan_return"),
        pl.col("realized_return").filter(pl.col("status") == "scored").mean().alias("basket_return"),
        (pl.col("status") == "scored").sum().cast(pl.Int32).alias("basket_size"),
        pl.col("status").filter(picked & (frac > 0)).alias("_pick_status"),
        pl.col("status").alias("_all_status"),
    )
    status = (
        pl.when(pl.col("_pick_status").list.eval(pl.element() != "scored").list.any())
        .then(pl.col("_pick_status").list.eval(pl.element().filter(pl.element() != "scored")).list.first())
        .when(pl.col("basket_size") == 0).then(pl.col("_all_status").list.first())
        .otherwise(pl.lit("scored"))
    )
    plans = plans.with_columns(status.alias("status")).with_columns(
        pl.when(pl.col("status") == "scored").then(pl.col(c)).alias(c)
        for c in ("plan_return", "basket_return"))
    plans = plans.with_columns(
        pl.when(pl.col("status") == "scored").then(pl.lit(0.0)).alias("chaos_return"),
        pl.struct("_names", "_fracs").map_elements(
            lambda s: ", ".join(f"{n} {f:.0%}" for n, f in zip(s["_names"], s["_fracs"], strict=True)),
            return_dtype=pl.Utf8).alias("picks"),
    )
    return (plans.select([pl.col(c).cast(t) for c, t in PLAN_OUTCOMES_SCHEMA.items()])
            .sort("league", "horizon_days", "origin_date", "source"))


def cumulative_returns(plans: pl.DataFrame, horizon: int) -> pl.DataFrame:
    """The scored plans of one horizon chained without overlap, with their cumulative returns (fractions)."""
    rows = (plans.filter((pl.col("horizon_days") == horizon) & (pl.col("status") == "scored"))
            .sort("origin_date", "source").unique("origin_date", keep="first", maintain_order=True))
    chosen, next_day = [], None
    for r in rows.iter_rows(named=True):
        if next_day is None or r["origin_date"] >= next_day:
            chosen.append(r)
            next_day = r["origin_date"] + timedelta(days=horizon)
    frame = pl.DataFrame(chosen, schema=PLAN_OUTCOMES_SCHEMA)
    return frame.with_columns(
        ((1 + pl.col(c)).cum_prod() - 1).alias(f"cumulative_{c}")
        for c in ("plan_return", "chaos_return", "basket_return"))


def hit_rates(outcomes: pl.DataFrame) -> pl.DataFrame:
    """Per (currency, horizon): scored forecasts, the share that beat 'no change', and the share of right advice."""
    scored = outcomes.filter(pl.col("status") == "scored")
    return scored.group_by("currency", "horizon_days").agg(
        pl.len().cast(pl.Int32).alias("scored_forecasts"),
        pl.col("beat_no_change").mean().alias("beat_no_change_share"),
        pl.col("advice_right").mean().alias("advice_right_share"),
    ).sort("currency", "horizon_days")


def hit_rate_text(share: float | None, n: int | None) -> str:
    """'beat "no change" on 58 % of 14 past forecasts', or '' without any."""
    if not n or share is None or not math.isfinite(share):
        return ""
    return f"beat 'no change' on {share:.0%} of {n} past forecast{'s' if n != 1 else ''}"


# --- the report's section ----------------------------------------------------------------------------------------


@dataclass
class TrackRecord:
    """What the report shows under "How did past advice do?"."""

    league: str
    outcomes: pl.DataFrame  # ADVICE_OUTCOMES_SCHEMA, scored rows before the report's origin
    plans: pl.DataFrame  # PLAN_OUTCOMES_SCHEMA, scored
    chains: dict[int, pl.DataFrame]  # horizon -> cumulative_returns

    @classmethod
    def build(cls, outcomes: pl.DataFrame, plans: pl.DataFrame, league: str, before: date) -> TrackRecord:
        o = outcomes.filter((pl.col("league") == league) & (pl.col("status") == "scored")
                            & (pl.col("target_date") <= before))
        p = plans.filter((pl.col("league") == league) & (pl.col("status") == "scored")
                         & (pl.col("exit_date") <= before))
        horizons = sorted(p["horizon_days"].unique().to_list())
        return cls(league, o, p, {h: cumulative_returns(p, h) for h in horizons})

    @property
    def empty(self) -> bool:
        return self.outcomes.height == 0

    def summary(self) -> pl.DataFrame:
        """One row per horizon: the numbers of the section."""
        rows = []
        for h, chain in sorted(self.chains.items()):
            o = self.outcomes.filter(pl.col("horizon_days") == h)
            last = chain.row(-1, named=True) if chain.height else {}

            def right(advice: str, o=o) -> str:
                g = o.filter(pl.col("advice") == advice)
                return f"{g['advice_right'].mean():.0%} of {g.height}" if g.height else "none"

            rows.append({
                "horizon": f"{h}d",
                "past origins": o["origin_date"].n_unique(),
                "from": str(o["origin_date"].min()), "to": str(o["origin_date"].max()),
                "forecasts beat 'no change'": f"{o['beat_no_change'].mean():.0%} of {o.height}",
                "buys right (price rose)": right("buy"),
                "sells right (price fell)": right("sell"),
                "holds right (stayed inside the interval)": right("hold"),
                "plans chained": chain.height,
                "plan, cumulative %": round(100 * last.get("cumulative_plan_return", 0.0), 2),
                "equal-weight basket, cumulative %": round(100 * last.get("cumulative_basket_return", 0.0), 2),
                "holding chaos, cumulative %": 0.0,
            })
        return pl.DataFrame(rows)

    def sources_text(self) -> str:
        counts = dict(self.outcomes.group_by("source").len().iter_rows())
        parts = []
        if counts.get("live"):
            parts.append(f"{counts['live']} pieces of advice from past reports")
        if counts.get("backtest"):
            parts.append(f"{counts['backtest']} pieces of advice from a replay of earlier days (the models "
                         "refitted on only the prices known at the time, then forecasting day by day)")
        return "Scored: " + "; ".join(parts) + "." if parts else ""

    def chart(self) -> bytes:
        """Cumulative return of the plans against holding chaos and the basket, one panel per horizon."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from poe_pipeline.reporting import _png

        horizons = sorted(self.chains)
        fig, axes = plt.subplots(1, max(1, len(horizons)), figsize=(4.3 * max(1, len(horizons)), 3.3),
                                 squeeze=False)
        for ax, h in zip(axes.flat, horizons, strict=False):
            chain = self.chains[h]
            if chain.height == 0:
                ax.set_visible(False)
                continue
            xs = [chain["origin_date"][0], *chain["exit_date"].to_list()]
            for col, label, style in (("cumulative_plan_return", "the report's plan", {"color": "#2b8a3e", "lw": 2}),
                                      ("cumulative_basket_return", "equal-weight basket",
                                       {"color": "#1f77b4", "lw": 1.4, "ls": "--"}),
                                      ("cumulative_chaos_return", "holding chaos",
                                       {"color": "#666", "lw": 1.0, "ls": ":"})):
                ax.plot(xs, [0.0, *(chain[col] * 100).to_list()], marker="o", ms=2.5, label=label, **style)
            ax.set_title(f"{h}-day plans, {chain.height} chained", fontsize=9)
            ax.set_ylabel("cumulative return (%)", fontsize=8)
            ax.tick_params(axis="both", labelsize=7)
            ax.tick_params(axis="x", labelrotation=30)
            ax.grid(alpha=0.25)
        axes.flat[0].legend(fontsize=7, loc="best")
        fig.suptitle(f"How did past advice do? {self.league}", fontsize=11)
        fig.tight_layout()
        data = _png(fig)
        plt.close(fig)
        return data


# --- the replay of earlier days -----------------------------------------------------------------------------------


def backfill_origins(daily_prices: pl.DataFrame, league: str, until: date, days: int,
                     covered: Iterable[date]) -> list[date]:
    """The league's days in ``[until - days, until)`` from league day 7 on, without those ``covered`` already."""
    from poe_pipeline.backtest import FIRST_ORIGIN_DAY

    seen = daily_prices.filter(pl.col("league") == league)["date"].unique().sort()
    if seen.is_empty() or days < 1:
        return []
    first = seen[0] + timedelta(days=FIRST_ORIGIN_DAY)
    covered = set(covered)
    return [d for d in seen.to_list() if until - timedelta(days=days) <= d < until and d >= first
            and d not in covered]


def champion_tuning(lake: Lake, horizons: Iterable[int]) -> tuple[dict, list[str]]:
    """(horizon -> the global champion's ``GlobalValidation``, why a horizon has none) for a warm replay."""
    from poe_pipeline.global_model import GlobalValidation
    from poe_pipeline.tracking import ModelTracker, global_model_name

    tracker = ModelTracker(lake)
    tuning, missing = {}, []
    for h in horizons:
        name = global_model_name(h)
        try:
            found = tracker.champion(name)
        except Exception as exc:  # an untrusted or damaged champion: the live forecasts alert on it
            missing.append(f"{name}: {exc}")
            continue
        if found is None:
            missing.append(f"{name}: no champion yet (materialize global_models)")
            continue
        tuning[h] = GlobalValidation.read(found[1])
    return tuning, missing


def backfill_advice(
    lake: Lake,
    league: str,
    currencies: list[str],
    origins: list[date],
    tuning: dict,
    refit_every: int = BACKFILL_REFIT_EVERY,
    workers: int = 1,
    progress: Callable[[str], None] | None = None,
    **report_options,
) -> pl.DataFrame:
    """Replay ``origins`` with the global models refitted warm (``tuning``: horizon -> the champion's
    ``GlobalValidation``) on the prices known each day, write each day's report, and add its rows to the league's
    stored replay. Returns the new rows (``REPORT_SCHEMA``)."""
    from poe_pipeline.backtest import run_backtest
    from poe_pipeline.features import read_features
    from poe_pipeline.prices import read_daily_prices
    from poe_pipeline.reporting import REPORT_FEATURE_COLUMNS, build_report

    stored = read_backfill(lake, league)
    if not origins:
        return stored.clear()
    prices = read_daily_prices(lake)
    run = run_backtest(prices, league, origins, currencies, refit_every=refit_every, horizons=sorted(tuning),
                       workers=workers, progress=progress, tuning=tuning)
    features = read_features(lake, [league]).select(REPORT_FEATURE_COLUMNS)
    tables = []
    for (origin,), day in sorted(run.predictions.partition_by("origin_date", as_dict=True).items()):
        report = build_report(day.drop("actual_price", "refit_date"), features.filter(pl.col("date") <= origin),
                              **report_options)
        tables.append(report.table)
    new = pl.concat(tables) if tables else stored.clear()
    kept = stored.join(new.select("origin_date").unique(), on="origin_date", how="anti")
    write_parquet_atomic(pl.concat([kept, new], how="vertical_relaxed").sort("origin_date", "horizon_days", "rank"),
                         backfill_path(lake, league))
    return new


def write_outcomes(lake: Lake, league: str, outcomes: pl.DataFrame, plans: pl.DataFrame) -> list:
    return [write_parquet_atomic(outcomes, outcomes_path(lake, league)),
            write_parquet_atomic(plans, plans_path(lake, league))]

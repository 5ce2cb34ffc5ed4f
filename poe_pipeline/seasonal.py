"""League-phase drift: how a currency's price moved at the same age of earlier leagues.

Every league starts from the same economic reset, so prices follow the league's age: crafting currencies crash in
the launch week, late leagues slide. ``seasonal_drift_{h}d`` of a row at league day d is the median h-day
log-return of that currency at league days d-3 .. d+3 (``WINDOW``) of earlier non-event leagues; with fewer than
``MIN_RETURNS`` such returns (a currency new to the market) the median over every currency at those days stands in.
Null when no earlier league qualifies.

- **Returns** come from observed prices only (no forward fill): the log price h days later minus today's.
- **No leakage.** A league is a source of league L only when it started at least ``GAP_DAYS`` (the window plus the
  longest horizon) before L. A return at source day d + 3 ends at day d + 3 + 7 of the source, so every return
  used on day d of L was known by that calendar day: the drift of a row depends on nothing dated after it.
- **Measured** in the four-league replay: +0.2 / +0.8 / +2.0 points of skill at 1 / 3 / 7 days (README, "The
  league-phase drift as a feature").
"""

from __future__ import annotations

from datetime import timedelta
from typing import TypeVar

import polars as pl

from poe_pipeline.settings import HORIZONS_DAYS

WINDOW = 3  # league days either side of the row's day whose returns count
MIN_RETURNS = 5  # fewer returns of the currency itself: the all-currency median
GAP_DAYS = WINDOW + max(HORIZONS_DAYS)
COLUMNS = [f"seasonal_drift_{h}d" for h in HORIZONS_DAYS]
DESCRIPTIONS = {
    f"seasonal_drift_{h}d": f"median {h}-day log-return of the currency at league days +-{WINDOW} of this one in "
    f"earlier non-event leagues (the all-currency median with fewer than {MIN_RETURNS} returns)"
    for h in HORIZONS_DAYS
}
KEYS = ["league", "currency", "league_day"]
Frame = TypeVar("Frame", pl.DataFrame, pl.LazyFrame)


def source_leagues(calendar: pl.DataFrame, league: str) -> list[str]:
    """The non-event leagues that started at least ``GAP_DAYS`` before ``league``, oldest first."""
    start = calendar.filter(pl.col("league") == league)["start_date"].item()
    return (
        calendar.filter(~pl.col("is_event") & (pl.col("start_date") <= start - timedelta(days=GAP_DAYS)))
        .sort("start_date")["league"].to_list()
    )


def with_league_day(rows: Frame, calendar: pl.DataFrame, date: str = "date") -> Frame:
    """``rows`` with ``league_day``: days from their league's start (``calendar``) to their ``date`` column."""
    start = calendar.lazy() if isinstance(rows, pl.LazyFrame) else calendar
    return (rows.join(start.select("league", pl.col("start_date").alias("_start")), on="league")
            .with_columns((pl.col(date) - pl.col("_start")).dt.total_days().cast(pl.Int32).alias("league_day"))
            .drop("_start"))


def league_day_returns(prices: pl.DataFrame, calendar: pl.DataFrame, leagues: list[str]) -> pl.DataFrame:
    """(league, currency, league_day, horizon_days, logret) between observed prices of ``leagues``."""
    obs = with_league_day(prices.lazy().filter(pl.col("league").is_in(leagues)), calendar).select(
        "league", "currency", "date", "league_day", pl.col("price_chaos").log().alias("lp"))
    parts = [
        obs.join(obs.select("league", "currency", (pl.col("date") - timedelta(days=h)).alias("date"),
                            pl.col("lp").alias("lp_h")), on=["league", "currency", "date"])
        .select("league", "currency", "league_day", pl.lit(h, dtype=pl.Int32).alias("horizon_days"),
                (pl.col("lp_h") - pl.col("lp")).alias("logret"))
        for h in HORIZONS_DAYS
    ]
    return pl.concat(parts).collect()


_SLOT = 1 << 16  # (league day, horizon) slots per currency code in a packed group key


def _slot(day: pl.Expr, horizon: pl.Expr, first: int) -> pl.Expr:
    return (day - first) * 16 + horizon  # days from ``first`` on (never negative), horizons below 16


def _league_drift(returns: pl.DataFrame, wanted: pl.DataFrame) -> pl.DataFrame:
    """``wanted`` (currency, league_day) of one league with ``COLUMNS``, from its sources' ``returns``. The groups are
    keyed by one packed integer (currency code, day, horizon): medians over string keys took twice as long."""
    lo, hi = wanted["league_day"].min(), wanted["league_day"].max()
    first = lo - 2 * WINDOW  # the earliest day a spread return lands on
    codes = wanted.select(pl.col("currency").unique()).with_row_index("code", offset=1)  # 0: every other currency
    near = (
        returns.filter(pl.col("league_day").is_between(lo - WINDOW, hi + WINDOW))
        .join(codes, on="currency", how="left")
        .select((pl.col("code").fill_null(0).cast(pl.Int64) * _SLOT
                 + _slot(pl.col("league_day").cast(pl.Int64), pl.col("horizon_days").cast(pl.Int64), first))
                .alias("key"), "logret")
    )
    # a return at day d counts for the rows at days d-WINDOW .. d+WINDOW
    spread = pl.concat([near.with_columns(pl.col("key") + 16 * k) for k in range(-WINDOW, WINDOW + 1)])
    pooled = spread.group_by(pl.col("key") % _SLOT).agg(pl.col("logret").median().alias("pooled"))
    own = (spread.filter(pl.col("key") >= _SLOT).group_by("key")
           .agg(pl.col("logret").median().alias("own"), pl.len().alias("n")))
    rows = wanted.join(codes, on="currency").with_columns(pl.col("league_day").cast(pl.Int64).alias("_day"))
    out = wanted
    for h in HORIZONS_DAYS:
        slot = _slot(pl.col("_day"), pl.lit(h, dtype=pl.Int64), first)
        found = (
            rows.with_columns((pl.col("code").cast(pl.Int64) * _SLOT + slot).alias("key"), slot.alias("slot"))
            .join(own, on="key", how="left")
            .join(pooled.rename({"key": "slot"}), on="slot", how="left")
            .select("currency", "league_day", pl.when(pl.col("n") >= MIN_RETURNS).then(pl.col("own"))
                    .otherwise(pl.col("pooled")).alias(f"seasonal_drift_{h}d"))
        )
        out = out.join(found, on=["currency", "league_day"], how="left")
    return out


def drift_table(keys: pl.DataFrame, history: pl.DataFrame, calendar: pl.DataFrame) -> pl.DataFrame:
    """The drift of each (league, currency, league_day) of ``keys``: ``KEYS`` and ``COLUMNS``, learnt from the
    observed prices of ``history`` (``daily_prices`` of any leagues; only each league's sources are read). A value
    depends only on returns dated on or before its row's day, so any ``history`` that holds those gives it."""
    keys = keys.select(KEYS).unique()
    sources = {lg: source_leagues(calendar, lg) for lg in keys["league"].unique().to_list()}
    returns = league_day_returns(history, calendar, sorted({s for ss in sources.values() for s in ss}))
    drift = [
        _league_drift(returns.filter(pl.col("league").is_in(sources[lg])), part.drop("league"))
        .with_columns(pl.lit(lg).alias("league")).select(*KEYS, *COLUMNS)
        for (lg,), part in keys.partition_by("league", as_dict=True).items() if sources[lg]
    ]
    schema = {**keys.schema, **dict.fromkeys(COLUMNS, pl.Float64)}
    return pl.concat(drift).cast(schema) if drift else pl.DataFrame(schema=schema)


def with_drift(rows: pl.DataFrame, table: pl.DataFrame) -> pl.DataFrame:
    """``rows`` with ``COLUMNS`` from ``drift_table`` (null where it has no value)."""
    return rows.join(table.select(*KEYS, *COLUMNS), on=KEYS, how="left", maintain_order="left")


def seasonal_drift(rows: pl.DataFrame, history: pl.DataFrame, calendar: pl.DataFrame) -> pl.DataFrame:
    """``rows`` (with ``league``, ``currency`` and ``league_day``) with ``COLUMNS`` learnt from ``history``."""
    return with_drift(rows, drift_table(rows, history, calendar))

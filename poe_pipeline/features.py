"""The feature store: one row per (league, currency, date), built from ``daily_prices`` with Polars.

Rules (each one chosen once, here):

- **Missing days.** Each (league, currency) series is reindexed to a daily calendar from its first observed
  day to the league's last observed day (the data's "as of" date), not to the series' own last day: that way
  whether a row exists at day t depends only on data up to t (a row that exists only because the currency
  comes back later would be a look-ahead). The price is forward-filled; ``is_imputed`` flags filled days and
  ``days_since_observed`` counts the staleness. Rows staler than ``MAX_STALE_DAYS`` are dropped after all
  windows are computed, so windows always span calendar days. Market fields of a filled day (confidence,
  spread, volume) stay null: nothing was observed.
- **Windows.** All windows are trailing, include day t, count calendar days and restart at the start of each
  series (group by league, currency). At a series' start they are partial: a statistic needs 1 value (2 for a
  return dispersion, 3 for a trend fit). Standard deviations of log price are population ones (ddof 0), so
  window 1 gives 0. Sums over windows are written out over shifted columns, so a row depends on nothing
  outside its window, bit for bit.
- **Outliers.** League-start prices jump. The daily log-return r_t is compared to a robust scale: 1.4826 x the
  median of |r| over the previous 14 days (day t excluded, so a spike cannot hide itself), floored at
  ``OUTLIER_FLOOR_EARLY`` in the first ``OUTLIER_EARLY_DAYS`` league days and at ``OUTLIER_FLOOR`` later.
  ``is_outlier`` marks |r_t| > ``OUTLIER_K`` scales (about 1.3% of the dumps' rows); ``logret_1d_winsorized``
  clips r_t at that bound and feeds momentum and volatility. Prices are never altered and no row is dropped:
  training may filter on ``is_outlier``, inference keeps the current day. A spike flags its jump and usually
  its reversal; a real level shift flags only its first day, and the price level features follow it at once.
- **Targets.** ``target_logret_{h}d`` = log price at t+h minus log price at t, only where day t+h was observed
  (null when t+h was imputed or lies beyond the data). ``target_price_{h}d`` is that observed price and
  ``target_direction_{h}d`` its sign (-1, 0, 1). Targets are never features.
- **No leakage.** A feature at day t uses only rows of its own league with date <= t, but for the league-phase
  drift (``seasonal_drift_{h}d``, ``poe_pipeline.seasonal``): earlier leagues' returns at the same league age,
  from leagues started early enough that each of those returns ended by day t. EWM and cumulative
  functions run forward within a series; cross-currency fields (market median return, normalized volatility,
  price in Divine Orbs) use same-day rows of the same league only, and their medians only observed rows.
  Calendar fields come from ``league_calendar``: ``league_progress`` and ``days_to_league_end`` need a known
  end date (null otherwise), and ``league_recency_rank`` is relative to the set of leagues in the calendar.
- **Phases.** By league day, since the end is often unknown live: early < 14 days, mid < 56 days, late after.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl

from poe_pipeline import seasonal
from poe_pipeline.lake import Lake, is_readable_parquet, read_parquet_files, write_parquet_atomic, write_text_atomic
from poe_pipeline.settings import HORIZONS_DAYS

FEATURES_VERSION = "3"  # bump when a feature's definition changes: every league is rebuilt
KEYS = ["league", "currency", "date"]
SERIES = ["league", "currency"]
DIVINE = "Divine Orb"

log = logging.getLogger(__name__)

LAGS = (1, 2, 3, 5, 7, 14)
ROLL_WINDOWS = (1, 3, 5, 7, 14)
ROLL_STATS = ("mean", "std", "min", "max", "median")
MOMENTUM_WINDOWS = (3, 5, 7)
TREND_WINDOWS = (7, 14)
VOL_WINDOWS = (7, 14)
LIQUIDITY_WINDOW = 7
MAX_STALE_DAYS = 14
EARLY_DAYS, MID_DAYS = 14, 56
OUTLIER_WINDOW, OUTLIER_K = 14, 6.0
OUTLIER_FLOOR_EARLY, OUTLIER_FLOOR = 0.25, 0.05  # flags ~1.3% of the dumps' rows (1.7% in league week 1)
OUTLIER_EARLY_DAYS = 7
MAD_TO_SIGMA = 1.4826
# The market's reference currencies: what expensive items are priced in, so chaos's own value moves with them
# (the Exalted Orb until 3.19, then the Divine Orb).
MARKET_REFERENCES = {"Divine Orb": "divine", "Exalted Orb": "exalted"}
MARKET_REFERENCE_LAGS = (1, 3, 7)


def _describe() -> dict[str, str]:
    d: dict[str, str] = {
        "league_day": "days since the league started (0 on launch day)",
        "league_phase_early": f"league day < {EARLY_DAYS}",
        "league_phase_mid": f"{EARLY_DAYS} <= league day < {MID_DAYS}",
        "league_phase_late": f"league day >= {MID_DAYS}",
        "league_progress": "league day / league length in days; null when the end date is unknown",
        "days_to_league_end": "days until the league's end date; null when unknown",
        "day_of_week": "ISO weekday of the date (1 = Monday)",
        "league_recency_rank": "0 for the newest league in the calendar, 1 for the one before, ...",
        "series_age_days": "days since the currency was first observed in this league",
        "days_since_observed": "days since the price was last observed (0 on an observed day)",
        "is_imputed": "the price was forward-filled: no observation that day",
        "log_price": "ln(price in chaos), forward-filled",
        "logret_1d": "log price change since the previous day (raw)",
        "logret_1d_winsorized": "logret_1d clipped at the outlier bound",
        "logret_1d_robust_z": "logret_1d / robust scale (median |return| of the previous 14 days, floored)",
    }
    for k in LAGS:
        d[f"log_price_lag_{k}"] = f"log price {k} day(s) before"
    for w in ROLL_WINDOWS:
        for s in ROLL_STATS:
            d[f"log_price_roll_{s}_{w}"] = f"rolling {s} of log price over {w} day(s)"
    for w in MOMENTUM_WINDOWS:
        d[f"momentum_{w}"] = f"sum of winsorized daily log-returns over {w} days (outlier-robust momentum)"
        d[f"roc_{w}"] = f"rate of change: price / price {w} days before - 1"
    for w in TREND_WINDOWS:
        d[f"trend_slope_{w}"] = f"OLS slope of log price per day over {w} days"
        d[f"trend_r2_{w}"] = f"R^2 of that fit over {w} days (trend strength); null when flat"
    d |= {
        "ema_12": "exponential moving average of log price, span 12",
        "ema_26": "exponential moving average of log price, span 26",
        "macd": "ema_12 - ema_26",
        "macd_signal": "EMA (span 9) of macd",
        "macd_hist": "macd - macd_signal",
        "rsi_14": "Wilder RSI over 14 days of log-price changes, 0..100 (50 when flat)",
        "bollinger_pct_b_14": "(log price - lower band) / (upper - lower), bands = 14-day mean +- 2 std; "
        "0.5 when flat",
    }
    for w in VOL_WINDOWS:
        d[f"realized_vol_{w}"] = f"std of winsorized daily log-returns over {w} days"
        d[f"normalized_vol_{w}"] = f"realized_vol_{w} / the league's same-day median realized_vol_{w}"
    d |= {
        "vol_of_vol_14": "std of realized_vol_7 over 14 days",
        "drawdown_from_high": "log price - highest log price so far in this league (<= 0)",
        "volume": "traded/listed volume where the source has it (null for poe.ninja dumps)",
        "confidence_level": "source confidence: High 2, Medium 1, Low 0; null when imputed",
        "good_confidence_share_7": "share of the last 7 days observed with High or Medium confidence",
        "observed_share_7": "share of the last 7 days with an observation",
        "has_two_sided": "both sides of the market were quoted (price and reverse price)",
        "spread_log": "ln(price_chaos / reverse_price_chaos): the gap between the two sides of the market",
        "spread_log_abs_mean_7": "mean |spread_log| over the last 7 days",
        "two_sided_share_7": "share of the last 7 days with a two-sided market",
        "log_price_rel_divine": "ln(price in Divine Orbs) that day (0 for the Divine Orb; null without a "
        "Divine price)",
        "market_median_logret_1d": "median logret_1d over the league's observed currencies that day",
        "excess_logret_1d": "logret_1d - market_median_logret_1d",
    }
    for w in MOMENTUM_WINDOWS[::2]:
        d[f"market_median_momentum_{w}"] = f"median momentum_{w} over the league's observed currencies that day"
    d |= {
        "market_median_vol_14": "median realized_vol_14 over the league's observed currencies that day",
        "market_breadth_7": "share of the league's observed currencies whose momentum_7 is above 0 that day",
    }
    for ref, tag in MARKET_REFERENCES.items():
        for k in MARKET_REFERENCE_LAGS:
            d[f"{tag}_logret_{k}"] = f"the {ref}'s log price change over {k} day(s), that day (the whole market's unit)"
    return d | seasonal.DESCRIPTIONS


FEATURE_DESCRIPTIONS: dict[str, str] = _describe()
FEATURE_COLUMNS: list[str] = list(FEATURE_DESCRIPTIONS)
TARGET_COLUMNS: list[str] = [
    f"target_{kind}_{h}d" for h in HORIZONS_DAYS for kind in ("logret", "price", "direction")
]
META_COLUMNS: list[str] = [*KEYS, "price_chaos", "is_outlier"]
OUTPUT_COLUMNS: list[str] = [*META_COLUMNS, *FEATURE_COLUMNS, *TARGET_COLUMNS]
_OWN_LEAGUE_COLUMNS = [c for c in OUTPUT_COLUMNS if c not in seasonal.COLUMNS]  # what _features computes


PAD = max(max(LAGS), OUTLIER_WINDOW, max(ROLL_WINDOWS), max(HORIZONS_DAYS))  # longest look-back or ahead


def _r(expr: pl.Expr) -> pl.Expr:
    """Null on padding rows, so that no window reads into the previous series."""
    return pl.when(pl.col("_real")).then(expr)


# one integer per (league, date): grouping or joining on it is faster than on both columns
_league_day = (pl.col("date").cast(pl.Int64) * (1 << 32) + pl.col("_lid")).alias("_league_day")


def _day(expr: pl.Expr) -> pl.Expr:
    """Over one league's same-day rows (cross-currency context)."""
    return expr.over(_league_day)


def _days(start: pl.Expr, end: pl.Expr) -> pl.Expr:
    """Days from ``start`` to ``end`` (dates), as Int32."""
    return end.cast(pl.Int32) - start.cast(pl.Int32)


def _check_inputs(daily_prices: pl.DataFrame, calendar: pl.DataFrame) -> None:
    needed = {"league", "currency", "date", "price_chaos", "confidence", "volume", "reverse_price_chaos"}
    if missing := needed - set(daily_prices.columns):
        raise ValueError(f"daily_prices lacks columns {sorted(missing)}: build it with poe_pipeline.prices")
    if unknown := set(daily_prices["league"].unique()) - set(calendar["league"]):
        raise ValueError(
            f"Leagues {sorted(unknown)} are not in the calendar: pass league_calendar(daily_prices)"
        )
    price = pl.col("price_chaos")
    if not daily_prices.select((price.is_finite() & (price > 0)).fill_null(False).all()).item():
        raise ValueError("daily_prices has a missing, NaN, infinite or non-positive price: merge_daily_prices drops it")


def _sorted_prices(daily_prices: pl.DataFrame) -> pl.DataFrame:
    rows = daily_prices.select(
        *KEYS, "price_chaos", "confidence", pl.col("volume").cast(pl.Float64), "reverse_price_chaos"
    ).sort(KEYS)
    dup = rows.filter(pl.all_horizontal(pl.col(k) == pl.col(k).shift(1) for k in KEYS))
    if dup.height:
        raise ValueError(
            f"daily_prices has duplicate rows for {dup.row(0)[:3]}: merge sources with merge_daily_prices"
        )
    return rows


def _padded_grid(rows: pl.DataFrame, calendar: pl.DataFrame) -> pl.LazyFrame:
    """Daily rows per series (``rows`` sorted by key), each series preceded by PAD padding rows.

    Each observed row is repeated until the next observation (or the league's last day): that is the
    forward fill, and the repeats are the imputed days. The padding lets plain whole-column windows and
    shifts (much faster than per-group ones) stop at series boundaries: derived columns are null on it.
    """
    # the calendar row of each league, in the order of the leagues' numbers (_lid - 1)
    cal = (
        rows.filter((pl.col("league") != pl.col("league").shift(1)).fill_null(True))
        .select("league")
        .join(calendar, on="league", how="left", maintain_order="left")
        .select("start_date", "end_date", pl.col("recency_rank").cast(pl.Int32).alias("league_recency_rank"))
    )
    new_league = (pl.col("league") != pl.col("league").shift(1)).fill_null(True)
    new_series = new_league | (pl.col("currency") != pl.col("currency").shift(1)).fill_null(True)
    last_of_series = pl.col("_sid") != pl.col("_sid").shift(-1).fill_null(-1)
    return (
        rows.lazy()
        .with_columns(new_series.alias("_new"), new_league.cast(pl.Int32).cum_sum().alias("_lid"))
        .with_columns(
            pl.col("_new").cast(pl.Int32).cum_sum().alias("_sid"),
            pl.col("date").max().over("_lid").alias("_league_last"),
        )
        .with_columns(
            pl.when(last_of_series)
            .then(pl.col("_league_last") + pl.duration(days=1))
            .otherwise(pl.col("date").shift(-1))
            .alias("_until"),
        )
        .with_columns(
            pl.int_ranges(
                pl.when(pl.col("_new")).then(-PAD).otherwise(0),
                (pl.col("_until") - pl.col("date")).dt.total_days(),
                dtype=pl.Int32,
            ).alias("_j"),
            pl.when(pl.col("_new")).then(pl.col("date")).forward_fill().alias("_first"),
        )
        .explode("_j")
        .with_columns(
            (pl.col("_j") >= 0).alias("_real"),
            (pl.col("_j") == 0).alias("_observed"),
            (pl.col("date").cast(pl.Int32) + pl.col("_j")).cast(pl.Date).alias("date"),
            *[pl.lit(cal[c]).gather(pl.col("_lid") - 1).alias(c) for c in cal.columns],  # a join would copy all
        )
    )


# Trailing windows are computed in numpy on the padded grid, where k rows back is a slice and sums grow in place.
# Arrays cover the grid's rows from PAD on: the first PAD rows are the first series' padding, so every slice
# ``x[PAD - k : PAD - k + n]`` below (k <= PAD) exists, and up to PAD rows back never leaves a series.
_BLOCK = 1 << 14  # rows per pass of a sorting network: its wires stay in cache


@functools.cache
def _sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    """Compare-exchange pairs (i < j) of Batcher's odd-even merge sort for the next power of two, keeping those
    within the first n wires (the others would carry +inf and never move anything)."""
    size, pairs, p = 1 << (n - 1).bit_length(), [], 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple((i, j) for i, j in pairs if j < n)


class _Past:
    """A grid column, and whether each value is present (padding and nulls are not), seen k rows back."""

    def __init__(self, values: np.ndarray, present: np.ndarray | None = None) -> None:
        self.values = values
        self.present = ~np.isnan(values) if present is None else present
        self.n = max(len(values) - PAD, 0)  # an empty grid has no padding either

    def value(self, k: int) -> np.ndarray:
        return self.values[PAD - k : PAD - k + self.n]

    def seen(self, k: int) -> np.ndarray:
        return self.present[PAD - k : PAD - k + self.n]

    def median(self, window: int, min_samples: int, lag: int = 0) -> np.ndarray:
        """Median of the values ``lag`` .. ``lag + window - 1`` rows back (NaN where fewer than ``min_samples``
        are present): the order statistics Polars' rolling_median picks and its midpoint ``lo + (hi - lo) * 0.5``.
        A sorting network orders each row's window across columns (wires), missing values (+inf) last."""
        values = np.where(self.present, self.values, np.inf)
        out = np.empty(self.n)
        wires = np.empty((window + 1, _BLOCK))  # the last one is spare
        count = np.empty(_BLOCK, dtype=np.int8)
        for a in range(0, self.n, _BLOCK):
            b = min(a + _BLOCK, self.n)
            w, m = wires[:, : b - a], count[: b - a]
            m.fill(0)
            for k in range(window):
                back = slice(PAD - lag - k + a, PAD - lag - k + b)
                np.copyto(w[k], values[back])
                m += self.present[back]
            at, spare = list(range(window)), window  # at[i]: the row of ``wires`` holding wire i
            for i, j in _sorting_network(window):
                np.minimum(w[at[i]], w[at[j]], out=w[spare])
                np.maximum(w[at[i]], w[at[j]], out=w[at[j]])
                at[i], spare = spare, at[i]
            lo, hi = w[at[(window - 1) // 2]], w[at[window // 2]]
            with np.errstate(invalid="ignore"):  # no value at all: inf - inf, dropped below
                out[a:b] = lo + (hi - lo) * 0.5
                part = np.flatnonzero(m < window)  # a series' first days: fewer values
                rows, n = np.array(at), m[part]
                lo, hi = w[rows[np.maximum(n - 1, 0) // 2], part], w[rows[np.minimum(n // 2, window - 1)], part]
                out[a:b][part] = lo + (hi - lo) * 0.5
            out[a:b][m < min_samples] = np.nan
        return out


class _Running:
    """Folds terms left to right with ``op`` (np.add, np.fmin, np.fmax) and keeps the result after each count in
    ``counts``. For sums, a longer window extends a shorter one with the very additions of a sum written out per
    window: a row depends on nothing outside its window, bit for bit (unlike a sliding-sum kernel). A kept result
    never changes afterwards, since Polars may use its memory as it is."""

    def __init__(self, counts: Iterable[int], op: np.ufunc = np.add) -> None:
        self.counts, self.op, self.n = set(counts), op, 0
        self.total, self.at = np.empty(0), {}

    def add(self, term: np.ndarray) -> None:
        self.n += 1
        if self.n == 1:
            self.total = term.copy()
        elif self.n - 1 in self.at:
            self.total = self.op(self.total, term)  # a new array: the kept one stays as it is
        elif self.n <= max(self.counts):
            self.op(self.total, term, out=self.total)
        if self.n in self.counts:
            self.at[self.n] = self.total


def _at_rows(columns: dict[str, np.ndarray], rows: pl.Series) -> list[pl.Series]:
    """The columns at the kept ``rows``, gathered by Polars in one go: into memory its allocator has freed, where
    new numpy arrays would start on fresh pages. NaN stands for null."""
    return [column.fill_nan(None) if column.dtype.is_float() else column for column in pl.DataFrame(columns)[rows]]


def _price_windows(grid: pl.DataFrame, rows: pl.Series) -> list[pl.Series]:
    """The log price's trailing windows at the kept ``rows`` (counted from the grid's row PAD): sums (of
    differences to today's value, for stability) for the means, deviations and trends, minima, maxima, medians."""
    out: dict[str, np.ndarray] = {}
    lp = _Past(grid["log_price"].to_numpy())
    ws = [w for w in ROLL_WINDOWS if w > 1]
    s1, s2 = _Running([w - 1 for w in ws]), _Running([w - 1 for w in ws])  # k = 1 .. w - 1 days back
    trend = _Running([w - 1 for w in TREND_WINDOWS])  # k times the k-th term
    low, high = _Running(ws, np.fmin), _Running(ws, np.fmax)  # k = 0 .. w - 1; they skip NaN (missing)
    low.add(lp.value(0))
    high.add(lp.value(0))
    d, scratch = np.empty(lp.n), np.empty(lp.n)
    for k in range(1, max(ROLL_WINDOWS)):
        d.fill(0.0)
        np.subtract(lp.value(k), lp.value(0), out=d, where=lp.seen(k))
        s1.add(d)
        s2.add(np.multiply(d, d, out=scratch))
        trend.add(np.multiply(d, k, out=scratch))
        low.add(lp.value(k))
        high.add(lp.value(k))
    for w in ws:
        out |= {f"_s1_{w}": s1.at[w - 1], f"_s2_{w}": s2.at[w - 1]}
        out |= {f"log_price_roll_min_{w}": low.at[w], f"log_price_roll_max_{w}": high.at[w]}
        if w in TREND_WINDOWS:
            out[f"_t_{w}"] = trend.at[w - 1]
        if w > 3:  # the median of 3 follows from the sum, minimum and maximum
            out[f"log_price_roll_median_{w}"] = lp.median(w, 1)
    return _at_rows(out, rows)


def _return_windows(grid: pl.DataFrame, rows: pl.Series) -> list[pl.Series]:
    """The outlier rule, then trailing sums of winsorized returns, of the spread and of realized_vol_7, and the
    liquidity shares, at the kept ``rows`` (counted from the grid's row PAD)."""
    out: dict[str, np.ndarray] = {}
    # the outlier rule: returns against their robust scale over the previous days (day t excluded)
    r = grid["logret_1d"].to_numpy()
    scale = _Past(np.abs(r)).median(OUTLIER_WINDOW, 3, lag=1)
    np.multiply(scale, MAD_TO_SIGMA, out=scale)
    early = grid["league_day"].to_numpy()[PAD:] < OUTLIER_EARLY_DAYS
    np.fmax(scale, np.where(early, OUTLIER_FLOOR_EARLY, OUTLIER_FLOOR), out=scale)  # the floor while no median
    bound = OUTLIER_K * scale
    winsorized = np.clip(r[PAD:], -bound, bound)
    with np.errstate(invalid="ignore"):  # NaN (a missing return) is no outlier
        out |= {
            "logret_1d_robust_z": r[PAD:] / scale,
            "logret_1d_winsorized": winsorized,
            "is_outlier": np.abs(r[PAD:]) > bound,
        }
    wr = np.zeros(len(r))  # winsorized returns, nulls as 0 (the terms of their sums)
    wr[PAD:] = np.where(np.isnan(winsorized), 0.0, winsorized)
    wr = _Past(wr)
    age = grid["series_age_days"].fill_null(-1).to_numpy()[PAD:]
    windows = sorted(set(MOMENTUM_WINDOWS) | set(VOL_WINDOWS))
    r1, r2 = _Running(windows), _Running(VOL_WINDOWS)  # k = 0 .. w - 1 days back
    scratch = np.empty(wr.n)
    for k in range(max(windows)):
        r1.add(wr.value(k))
        r2.add(np.multiply(wr.value(k), wr.value(k), out=scratch))
    out |= {f"_r1_{w}": r1.at[w] for w in windows} | {f"_r2_{w}": r2.at[w] for w in VOL_WINDOWS}

    # realized_vol_7 as the formulas in _features compute it (nulls as 0), for its own dispersion over 14 days
    m = np.minimum(age, 7).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        vol7 = np.sqrt(np.maximum((r2.at[7] - r1.at[7] * r1.at[7] / m) / (m - 1), 0.0))
    vol = np.zeros(len(r))
    np.copyto(vol[PAD:], vol7, where=m >= 2)
    vol = _Past(vol)
    v1, v2 = _Running([14]), _Running([14])
    for k in range(14):
        v1.add(vol.value(k))
        v2.add(np.multiply(vol.value(k), vol.value(k), out=scratch))
    out["_rv1"], out["_rv2"] = v1.at[14], v2.at[14]

    spread_abs = grid["spread_log"].abs()
    spread = _Past(spread_abs.fill_null(0.0).to_numpy(), spread_abs.is_not_null().to_numpy())
    sp = _Running([LIQUIDITY_WINDOW])
    for k in range(LIQUIDITY_WINDOW):
        sp.add(spread.value(k))
    out["_sp_sum"] = sp.at[LIQUIDITY_WINDOW]
    out["_sp_n"] = sum(spread.seen(k) for k in range(LIQUIDITY_WINDOW)).astype(np.int32)

    # shares of the last days with a flag: over the real days of the window where the flag is known
    real = grid["_real"].to_numpy()
    for name, flag in (
        ("good_confidence_share_7", "_good"),
        ("observed_share_7", "_observed"),
        ("two_sided_share_7", "_two_sided"),
    ):
        known = real & grid[flag].is_not_null().to_numpy()
        flags = _Past(grid[flag].fill_null(False).to_numpy() & known, known)
        on = sum(flags.value(k) for k in range(LIQUIDITY_WINDOW))
        with np.errstate(invalid="ignore"):  # no day at all: padding
            out[name] = on / sum(flags.seen(k) for k in range(LIQUIDITY_WINDOW))
    return _at_rows(out, rows)


def _ewm(table: np.ndarray, alpha: float) -> np.ndarray:
    """Polars' ``ewm_mean(alpha=alpha, adjust=False)`` down each column of ``table`` (one series per column, NaN
    before it starts), for all series at once: the first value, then ``y + (x - y) * (alpha / weight)``. Its
    weight is the same every day, since no value is missing inside a series (a daily, forward-filled grid)."""
    if not len(table):
        return table.copy()
    factor = alpha / ((1.0 - alpha) + alpha)
    out, y = np.empty_like(table), table[0].copy()
    out[0] = y
    for t in range(1, len(table)):
        started = ~np.isnan(y)
        np.add(y, (table[t] - y) * factor, out=y, where=started)
        np.copyto(y, table[t], where=~started)
        out[t] = y
    return out


def _recursive_columns(grid: pl.DataFrame, rows: pl.Series) -> list[pl.Series]:
    """EWMs and the running high per series, at the kept ``rows`` (counted from the grid's row PAD). Real rows
    are laid out as a (day of series, series) table, so each recursion runs over all series at once, a day a step."""
    real = np.flatnonzero(grid["_real"].to_numpy())
    day = grid["series_age_days"].to_numpy()[real].astype(np.int64)
    series = grid["_sid"].to_numpy()[real].astype(np.int64) - 1
    shape = (day.max(initial=-1) + 1, series.max(initial=-1) + 1)
    cell = np.full(grid.height, -1)  # each real grid row's cell in the flattened tables
    cell[real] = day * shape[1] + series

    def table(values: np.ndarray) -> np.ndarray:
        t = np.full(shape, np.nan)
        t.ravel()[cell[real]] = values[real]
        return t

    r = grid["logret_1d"].to_numpy()
    gain, loss = np.where(r < 0.0, 0.0, r), np.where(-r < 0.0, 0.0, -r)  # Polars' clip: -0.0 stays -0.0
    lp = table(grid["log_price"].to_numpy())
    ema_12, ema_26 = _ewm(lp, 2 / (12 + 1)), _ewm(lp, 2 / (26 + 1))
    columns = {
        "ema_12": ema_12,
        "ema_26": ema_26,
        "macd_signal": _ewm(ema_12 - ema_26, 2 / (9 + 1)),
        "drawdown_from_high": lp - np.fmax.accumulate(lp, axis=0),
        "_avg_gain": _ewm(table(gain), 1 / 14),
        "_avg_loss": _ewm(table(loss), 1 / 14),
    }
    return _at_rows({name: t.ravel() for name, t in columns.items()}, pl.Series(cell[rows.to_numpy() + PAD]))


def _features(rows: pl.DataFrame, calendar: pl.DataFrame) -> pl.DataFrame:
    observed = pl.col("_observed")
    lp, r = pl.col("log_price"), pl.col("logret_1d")
    age = pl.col("series_age_days")

    # 1. the padded grid: staleness, the filled log price, league time
    grid = (
        _padded_grid(rows, calendar)
        .with_columns(
            _r(pl.col("price_chaos")).alias("_price"),
            _r(~observed).alias("is_imputed"),
            (observed & ((pl.col("confidence") == "High") | (pl.col("confidence") == "Medium"))).alias("_good"),
            (observed & pl.col("reverse_price_chaos").is_not_null()).alias("_two_sided"),
            _r(pl.col("_j")).alias("days_since_observed"),
            _r(_days(pl.col("_first"), pl.col("date"))).alias("series_age_days"),
            _days(pl.col("start_date"), pl.col("date")).alias("league_day"),
            # market fields exist only on observed days
            pl.when(observed).then(pl.col("confidence")).alias("confidence"),
            pl.when(observed).then(pl.col("volume")).alias("volume"),
            pl.when(observed)
            .then(pl.col("price_chaos") / pl.col("reverse_price_chaos"))
            .log()
            .alias("spread_log"),
        )
        .with_columns(pl.col("_price").log().alias("log_price"))
        .with_columns((lp - lp.shift(1)).alias("logret_1d"))
        .collect()
        .rechunk()  # the explode leaves pieces: every operation mixing them with whole columns would copy them
    )
    # the output's rows: real days, not staler than MAX_STALE_DAYS (windows still span every day)
    keep = (pl.col("days_since_observed") <= MAX_STALE_DAYS).fill_null(False)
    kept = grid.select(keep).to_series().slice(PAD).arg_true()  # the first PAD rows are padding

    # 2. windows and recursions run in numpy (which releases the GIL) in threads, while Polars goes on
    with ThreadPoolExecutor(max_workers=3) as pool:
        numpy_parts = [pool.submit(part, grid, kept) for part in (_price_windows, _return_windows, _recursive_columns)]

        targets: list[pl.Expr] = []
        for h in HORIZONS_DAYS:  # the future day must exist and be observed (padding ends each series)
            future_seen = observed.shift(-h).fill_null(False)
            targets += [
                pl.when(future_seen).then(lp.shift(-h) - lp).alias(f"target_logret_{h}d"),
                pl.when(future_seen).then(pl.col("_price").shift(-h)).alias(f"target_price_{h}d"),
            ]
        grid = grid.with_columns(
            *[lp.shift(k).alias(f"log_price_lag_{k}") for k in LAGS],
            *[((lp - lp.shift(w)).exp() - 1.0).alias(f"roc_{w}") for w in MOMENTUM_WINDOWS],
            _r(pl.col("_two_sided")).alias("has_two_sided"),
            pl.when(pl.col("confidence") == "High")
            .then(2)
            .when(pl.col("confidence") == "Medium")
            .then(1)
            .when(pl.col("confidence") == "Low")
            .then(0)
            .cast(pl.Int8)
            .alias("confidence_level"),
            *targets,
        )
        # the reference currencies' own days, stale ones included (all real rows, not only the output's)
        first_rows = grid.filter(pl.col("_j") == -PAD)  # one per series: fewer strings to compare
        reference_series = first_rows.filter(pl.col("currency").is_in([DIVINE, *MARKET_REFERENCES]))["_sid"]
        references = (
            grid.lazy()
            .filter(pl.col("_real") & pl.col("_sid").is_in(reference_series.implode()))
            .group_by(_league_day)
            .agg(
                pl.when(pl.col("currency") == DIVINE).then(lp).max().alias("_divine_lp"),
                *[
                    pl.when(pl.col("currency") == ref)
                    .then(lp - pl.col(f"log_price_lag_{k}"))
                    .max()
                    .alias(f"{tag}_logret_{k}")
                    for ref, tag in MARKET_REFERENCES.items()
                    for k in MARKET_REFERENCE_LAGS
                ],
            )
            .collect()
        )
        length = (pl.col("end_date") - pl.col("start_date")).dt.total_days()
        df = grid.drop(
            "price_chaos", "confidence", "reverse_price_chaos", "_new", "_sid", "_league_last", "_until", "_good"
        ).filter(keep)
        # joined on the keys alone: a join copies every column of its left side
        on_day = df.select(_league_day).join(references, on="_league_day", how="left", maintain_order="left")
        df = (
            df.hstack(on_day.drop("_league_day").get_columns())
            .lazy()
            .with_columns(
                *[
                    pl.col(f"target_logret_{h}d").sign().cast(pl.Int8).alias(f"target_direction_{h}d")
                    for h in HORIZONS_DAYS
                ],
                (lp - pl.col("_divine_lp")).alias("log_price_rel_divine"),
                (pl.col("league_day") < EARLY_DAYS).alias("league_phase_early"),
                pl.col("league_day").is_between(EARLY_DAYS, MID_DAYS, closed="left").alias("league_phase_mid"),
                (pl.col("league_day") >= MID_DAYS).alias("league_phase_late"),
                # times the reciprocal: a constant divisor (one league) takes that path anyway; results never vary
                pl.when(length > 0).then(pl.col("league_day") * (1.0 / length)).alias("league_progress"),
                _days(pl.col("date"), pl.col("end_date")).alias("days_to_league_end"),
                pl.col("date").dt.weekday().alias("day_of_week"),
                pl.col("_price").alias("price_chaos"),
            )
            .collect()
        )
        del grid  # once the threads are done with it too, Polars reuses its memory for the columns below
        df = df.with_columns(*[column for part in numpy_parts for column in part.result()])

    # 3. the formulas on the windows
    gain, loss = pl.col("_avg_gain"), pl.col("_avg_loss")
    features: list[pl.Expr] = [
        (pl.col("ema_12") - pl.col("ema_26")).alias("macd"),
        (pl.col("ema_12") - pl.col("ema_26") - pl.col("macd_signal")).alias("macd_hist"),
        # the ratio first, so rounding never lifts RSI above 100
        pl.when(gain + loss > 0)
        .then(100.0 * (gain / (gain + loss)))
        .when(gain.is_not_null())
        .then(50.0)
        .alias("rsi_14"),
        pl.when(pl.col("_sp_n") > 0).then(pl.col("_sp_sum") / pl.col("_sp_n")).alias("spread_log_abs_mean_7"),
    ]
    for w in ROLL_WINDOWS:
        if w == 1:  # a one-day window is the value itself
            features += [lp.alias(f"log_price_roll_{s}_1") for s in ("mean", "min", "max", "median")]
            features.append(pl.lit(0.0).alias("log_price_roll_std_1"))
            continue
        n = pl.min_horizontal(age + 1, w).cast(pl.Float64)  # days in the window so far
        d_mean = pl.col(f"_s1_{w}") / n
        d_var = (pl.col(f"_s2_{w}") / n - d_mean * d_mean).clip(lower_bound=0.0)
        features += [
            (lp + d_mean).alias(f"log_price_roll_mean_{w}"),
            d_var.sqrt().alias(f"log_price_roll_std_{w}"),
        ]
        if w in TREND_WINDOWS:
            # OLS slope of log price against the day (u = -k for k days ago) over the window, and its R^2
            var_u = (n * n - 1) / 12
            cov = -pl.col(f"_t_{w}") / n + (n - 1) / 2 * d_mean
            features += [
                pl.when(n >= 3).then(cov / var_u).alias(f"trend_slope_{w}"),
                pl.when((n >= 3) & (d_var > 1e-18))
                .then((cov * cov / (var_u * d_var)).clip(0.0, 1.0))
                .alias(f"trend_r2_{w}"),
            ]
    for w in MOMENTUM_WINDOWS:
        features.append(pl.when(age >= 1).then(pl.col(f"_r1_{w}")).alias(f"momentum_{w}"))
    for w in VOL_WINDOWS:
        m = pl.min_horizontal(age, w).cast(pl.Float64)  # returns start on a series' second day
        s1, s2 = pl.col(f"_r1_{w}"), pl.col(f"_r2_{w}")
        features.append(
            pl.when(m >= 2)
            .then(((s2 - s1 * s1 / m) / (m - 1)).clip(lower_bound=0.0).sqrt())
            .alias(f"realized_vol_{w}")
        )
    rv_n = pl.min_horizontal(age - 1, 14).cast(pl.Float64)  # realized_vol_7 starts on a series' third day
    rv1, rv2 = pl.col("_rv1"), pl.col("_rv2")
    features.append(
        pl.when(rv_n >= 2)
        .then(((rv2 - rv1 * rv1 / rv_n) / (rv_n - 1)).clip(lower_bound=0.0).sqrt())
        .alias("vol_of_vol_14"),
    )
    mean14, std14 = pl.col("log_price_roll_mean_14"), pl.col("log_price_roll_std_14")
    seen = ~pl.col("is_imputed")
    return (
        df.lazy()
        .with_columns(features)
        .with_columns(
            pl.when(std14 > 1e-12)
            .then((lp - mean14 + 2 * std14) / (4 * std14))
            .when(lp.is_not_null())
            .then(0.5)
            .alias("bollinger_pct_b_14"),
            # median of 3 = sum - min - max once the window is full
            pl.when(age >= 2)
            .then(3 * pl.col("log_price_roll_mean_3") - pl.col("log_price_roll_min_3") - pl.col("log_price_roll_max_3"))
            .otherwise(pl.col("log_price_roll_mean_3"))
            .alias("log_price_roll_median_3"),
            # 4. cross-currency context from same-day rows only
            _day(pl.when(seen).then(r).median()).alias("market_median_logret_1d"),
            *[
                _day(pl.when(seen).then(pl.col(f"realized_vol_{w}")).median()).alias(f"_market_vol_{w}")
                for w in VOL_WINDOWS
            ],
            *[
                _day(pl.when(seen).then(pl.col(f"momentum_{w}")).median()).alias(f"market_median_momentum_{w}")
                for w in MOMENTUM_WINDOWS[::2]
            ],
            _day(pl.when(seen).then((pl.col("momentum_7") > 0).cast(pl.Float64)).mean()).alias("market_breadth_7"),
        )
        .with_columns(
            (r - pl.col("market_median_logret_1d")).alias("excess_logret_1d"),
            pl.col("_market_vol_14").alias("market_median_vol_14"),
            *[
                pl.when(pl.col(f"_market_vol_{w}") > 0)
                .then(pl.col(f"realized_vol_{w}") / pl.col(f"_market_vol_{w}"))
                .alias(f"normalized_vol_{w}")
                for w in VOL_WINDOWS
            ],
        )
        .select(_OWN_LEAGUE_COLUMNS)
        .collect()
    )


def build_features(daily_prices: pl.DataFrame, calendar: pl.DataFrame, history: pl.DataFrame | None = None,
                   drift: pl.DataFrame | None = None) -> pl.DataFrame:
    """Features, meta columns and targets for every (league, currency, date) of ``daily_prices``.

    ``calendar`` is ``league_calendar`` of every league involved. The league-phase drift (``seasonal``) learns from
    the earlier leagues' prices in ``history`` (default: ``daily_prices`` itself), or comes from ``drift``, a
    ``seasonal.drift_table`` computed beforehand. Output columns: ``OUTPUT_COLUMNS``, sorted by key.
    """
    _check_inputs(daily_prices, calendar)
    own = _features(_sorted_prices(daily_prices), calendar)
    if drift is None:
        drift = seasonal.drift_table(own, daily_prices if history is None else history, calendar)
    out = seasonal.with_drift(own, drift).select(OUTPUT_COLUMNS)
    # NaN/inf would compare unequal to themselves and poison models: they become nulls. A column's sum is
    # finite exactly when all its values are (or it overflowed: then it is cleaned too), so clean only those.
    floats = [c for c, t in out.schema.items() if t == pl.Float64]
    sums = out.select(pl.col(floats).sum()).row(0, named=True)
    dirty = [c for c in floats if not math.isfinite(sums[c])]
    return out.with_columns(pl.when(pl.col(dirty).is_finite()).then(pl.col(dirty))) if dirty else out


def build_league_features(daily_prices: pl.DataFrame, calendar: pl.DataFrame, league: str) -> pl.DataFrame:
    """Features of one league: they depend on that league's prices and calendar row, and on the earlier leagues'
    prices through the league-phase drift."""
    rows = daily_prices.filter(pl.col("league") == league)
    if rows.height == 0:
        known = ", ".join(sorted(daily_prices["league"].unique()))
        raise ValueError(f"Unknown league {league!r}: daily_prices has {known}")
    return build_features(rows, calendar, history=daily_prices)


def feature_path(lake: Lake, league: str) -> Path:
    return lake.league_path(lake.features, league, "part.parquet")


def write_features(df: pl.DataFrame, lake: Lake) -> list[Path]:
    """Write one Parquet file per league atomically, replacing that league's previous file."""
    paths = []
    for (league,), part in df.sort(KEYS).partition_by("league", as_dict=True, maintain_order=True).items():
        paths.append(write_parquet_atomic(part, feature_path(lake, league)))
    return paths


def read_features(lake: Lake, leagues: Iterable[str] | None = None) -> pl.DataFrame:
    """The stored features (all leagues, or those named). A file that cannot be read raises
    ``UnreadableFileError`` naming it (``update_features`` rebuilds such a file)."""
    paths = (
        lake.parquet_files(lake.features) if leagues is None else [feature_path(lake, lg) for lg in leagues]
    )
    if not paths:
        return pl.DataFrame()
    return read_parquet_files(
        paths, "materialize features again: update_features rebuilds a damaged file", hive_partitioning=False
    )


def _fingerprints_path(lake: Lake) -> Path:
    return lake.state / "features_fingerprints.json"


def _stored_fingerprints(lake: Lake) -> dict[str, str]:
    """What each league's file was built from. Unreadable state only costs a rebuild: the files are derived."""
    path = _fingerprints_path(lake)
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("%s cannot be read (%s); rebuilding every league's features", path, exc)
        return {}
    return stored if isinstance(stored, dict) else {}


def _needs_rebuild(lake: Lake, league: str, stored: str | None, current: str) -> bool:
    if stored != current:
        return True
    path = feature_path(lake, league)
    if path.exists() and not is_readable_parquet(path):
        log.warning("%s cannot be read (cut short or overwritten); rebuilding it", path)
        return True
    return not path.exists()


def league_fingerprint(daily_prices: pl.DataFrame, calendar: pl.DataFrame, league: str) -> str:
    """Changes whenever the league's prices, its calendar row, the feature code or Polars change."""
    rows = (
        daily_prices.filter(pl.col("league") == league)
        .select(*KEYS, "price_chaos", "confidence", "volume", "reverse_price_chaos")
        .sort(KEYS)
    )
    cal = calendar.filter(pl.col("league") == league).select("start_date", "end_date", "recency_rank")
    digest = hashlib.sha256(f"{FEATURES_VERSION}|{pl.__version__}|{cal.rows()}|{rows.height}".encode())
    digest.update(rows.hash_rows(seed=0).to_numpy().tobytes())
    return digest.hexdigest()


def update_features(
    daily_prices: pl.DataFrame, calendar: pl.DataFrame, lake: Lake, leagues: Iterable[str] | None = None
) -> list[Path]:
    """Incremental refresh: rebuild only leagues whose inputs changed (or those named); returns files written.

    A new day in the current league rewrites that league's file alone. A new league shifts every
    ``league_recency_rank``, so it rebuilds all leagues (a full rebuild takes a few seconds).
    """
    _check_inputs(daily_prices, calendar)
    state_path = _fingerprints_path(lake)
    stored = _stored_fingerprints(lake)
    present = sorted(daily_prices["league"].unique())
    own = {lg: league_fingerprint(daily_prices, calendar, lg) for lg in present}
    # a league's drift learns from its source leagues: their prices are part of its inputs
    current = {lg: hashlib.sha256("|".join([own[lg], *(own.get(s, "") for s in seasonal.source_leagues(
        calendar, lg))]).encode()).hexdigest() for lg in present}
    if leagues is None:  # a file that no longer reads (cut short, overwritten) is rebuilt like a changed one
        todo = [lg for lg in present if _needs_rebuild(lake, lg, stored.get(lg), current[lg])]
    else:
        todo = list(dict.fromkeys(leagues))
        unknown = set(todo) - set(present)
        if unknown:
            raise ValueError(f"Unknown leagues {sorted(unknown)}: daily_prices has {', '.join(present)}")
    if not todo:
        return []
    paths = write_features(build_features(daily_prices.filter(pl.col("league").is_in(todo)), calendar,
                                          history=daily_prices), lake)
    # Fingerprints are saved after the files: a crash in between only causes a rebuild next time.
    write_text_atomic(
        json.dumps(stored | {lg: current[lg] for lg in todo}, indent=1, sort_keys=True), state_path
    )
    return paths


def features_markdown() -> str:
    """docs/features.md: one line per feature, plus the rules of this module."""
    lines = [
        "# Features",
        "",
        "Generated by `poe_pipeline.features.features_markdown()`.",
        "",
        "## Feature columns",
        "",
    ]
    lines += [f"- `{name}` — {text}" for name, text in FEATURE_DESCRIPTIONS.items()]
    lines += ["", "## Targets (never features)", ""]
    for h in HORIZONS_DAYS:
        lines += [
            f"- `target_logret_{h}d` — log price in {h} day(s) minus today's; null unless that day was seen",
            f"- `target_price_{h}d` — the observed price in chaos {h} day(s) ahead",
            f"- `target_direction_{h}d` — sign of target_logret_{h}d (-1, 0, 1)",
        ]
    lines += [
        "",
        "## Meta columns",
        "",
        "- `league`, `currency`, `date` — the key",
        "- `price_chaos` — the price in chaos (forward-filled on imputed days)",
        "- `is_outlier` — the day's return breaks the outlier rule (training may filter; inference keeps it)",
        "",
        "## Rules",
        "",
        __doc__.split("Rules (each one chosen once, here):", 1)[1].strip(),
        "",
        "## Constants",
        "",
    ]
    constants = [
        "MAX_STALE_DAYS",
        "OUTLIER_WINDOW",
        "OUTLIER_K",
        "OUTLIER_FLOOR_EARLY",
        "OUTLIER_FLOOR",
        "OUTLIER_EARLY_DAYS",
        "EARLY_DAYS",
        "MID_DAYS",
    ]
    lines += [f"- `{name}` = {globals()[name]}" for name in constants] + [""]
    return "\n".join(lines)

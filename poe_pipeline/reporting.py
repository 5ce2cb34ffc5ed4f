"""The investment report: what to buy, sell or leave alone now, per horizon, from the stored predictions.

For each currency and horizon (``m`` the predicted log-return, ``w`` the interval's half-width in log-price):

- **Expected return** ``exp(m) - 1``; **downside** the interval's lower bound as a return, ``pred_lower / price - 1``.
- **Risk-adjusted score** ``confidence x m / (sigma_day x sqrt(h))``: expected return over the currency's volatility
  over the horizon, shrunk by the forecast's confidence, then times the **liquidity** score in [0, 1] (the mean of
  the last week's High/Medium-confidence share, observed share, two-sided-market share, a spread factor
  ``exp(-|spread| / SPREAD_SCALE)`` and, where the source has it, a volume factor), so illiquid items sink.
- **Advice.** ``buy`` only when the whole interval lies above today's price (``pred_lower > price``, i.e. the
  expected move beats the interval noise, ``m > w``) and the forecast is confident and liquid enough;
  ``sell`` when the whole interval lies below it; otherwise ``hold``. When no currency earns a buy or a sell, the
  report says "no confident opportunity" and picks nothing.
- **Suspect quotes.** A buy or sell becomes ``hold`` when today's price is more than ``SUSPECT_QUOTE_FACTOR`` times
  off its 7-day median: the models expect such a price to revert, but on poe.ninja it is nearly always a one-day
  glitch or a thin quote (a Sacred Orb at 0.17 c beside 50-60 c the days around it), not a price a player can
  trade at. The note gives both prices.
- **Diversification.** Buys are taken best score first, skipping a currency whose daily log-returns over the last
  ``CORRELATION_DAYS`` days correlate above ``MAX_CORRELATION`` with one already picked; at most ``top_k``.
- **Allocation.** A fraction of the chaos budget per pick: a quarter-Kelly ``KELLY_FRACTION x confidence x m /
  sigma^2`` with ``sigma = w / z`` (the interval's own spread), capped at ``max_weight`` each and 100 % in total;
  the rest stays in chaos. A pick whose share cannot buy one whole unit gets nothing (its note says what budget
  would) and its share goes to the other picks, none above its own capped quarter-Kelly fraction.
- **Divine Orbs.** Every price and amount also in Divine Orbs at the league's Divine Orb price on the origin day
  (the last observed one before it when that day has none; chaos only when there is none at all).
- **Trust.** Each row says in words how the model did against 'no change' out of sample (its ``skill``).
- **Rebalancing triggers.** With the forecast's price levels held fixed, the advice flips at the interval's bounds:
  below ``pred_lower`` the expected move beats the noise upwards (buy), above ``pred_upper`` downwards (sell).

Outputs: ``reports/<origin_date>/investment_report_<league>.html`` (self-contained, charts inline as base64 PNG),
a Markdown twin with the PNGs beside it, the table as CSV beside them, and the table
``investment_report/league=<L>/origin_date=<D>/part.parquet``. ``new_buys`` compares a report with the league's
previous one: the picks it did not have are the buy signals the asset alerts on.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from statistics import NormalDist

import jinja2
import markupsafe
import numpy as np
import polars as pl

from poe_pipeline.forecasting import FALLBACK_DAILY_VOL, VOL_FLOOR, read_forecast_gaps
from poe_pipeline.lake import Lake, hive_dir, write_bytes_atomic, write_parquet_atomic, write_text_atomic
from poe_pipeline.names import slug
from poe_pipeline.track_record import TrackRecord, hit_rate_text, hit_rates
from poe_pipeline.universe import DEFAULT_RULES

DEFAULT_BUDGET_CHAOS = 10_000.0  # about 40 Divine Orbs in 3.20: enough to buy one unit of the dear currencies
TOP_K = 5
CORRELATION_DAYS = 30
MIN_CORRELATION_DAYS = 10
MAX_CORRELATION = 0.7
MAX_WEIGHT = 0.25
KELLY_FRACTION = 0.25
MIN_PICK_CONFIDENCE = 0.25
MIN_PICK_LIQUIDITY = 0.3
# Each buy the four-league replays called on a price over 2x off its 7-day median was a Sacred Orb or an Orb of
# Annulment quoted 10-300x below it for a day or two: nothing a player could buy at that price.
SUSPECT_QUOTE_FACTOR = 2.0
SPREAD_SCALE = 0.25  # a typical poe.ninja buy/sell gap (median |ln(pay/receive)| of the dumps)
HISTORY_DAYS = 45
NO_CONFIDENT = "no confident opportunity"
DIVINE = "Divine Orb"
NOT_BOUGHT = "not bought: "
MIN_SKILL_TO_MENTION = 0.02  # below this a positive skill is "barely" better than 'no change'
# The feature columns the report reads (liquidity at the origin, return correlations, price history).
REPORT_FEATURE_COLUMNS = [
    "league", "currency", "date", "price_chaos", "is_imputed", "logret_1d", "good_confidence_share_7",
    "observed_share_7", "two_sided_share_7", "spread_log_abs_mean_7", "volume", "log_price_roll_median_7",
]

REPORT_SCHEMA: dict[str, pl.DataType] = {
    "league": pl.Utf8,
    "origin_date": pl.Date,
    "horizon_days": pl.Int32,
    "rank": pl.Int32,
    "currency": pl.Utf8,
    "advice": pl.Utf8,
    "picked": pl.Boolean,
    "current_price": pl.Float64,
    "predicted_price": pl.Float64,
    "pred_lower": pl.Float64,
    "pred_upper": pl.Float64,
    "current_price_divines": pl.Float64,
    "predicted_price_divines": pl.Float64,
    "pred_lower_divines": pl.Float64,
    "pred_upper_divines": pl.Float64,
    "expected_return": pl.Float64,
    "downside_return": pl.Float64,
    "upside_return": pl.Float64,
    "expected_logret": pl.Float64,
    "half_width_logret": pl.Float64,
    "volatility": pl.Float64,
    "confidence": pl.Float64,
    "risk_adjusted_score": pl.Float64,
    "liquidity_score": pl.Float64,
    "score": pl.Float64,
    "allocation_fraction": pl.Float64,
    "allocation_chaos": pl.Float64,
    "units": pl.Int64,
    "allocation_divines": pl.Float64,
    "buy_below": pl.Float64,
    "sell_above": pl.Float64,
    "flip_price": pl.Float64,
    "flip_move": pl.Float64,
    "trigger": pl.Utf8,
    "correlated_with": pl.Utf8,
    "note": pl.Utf8,
    "model_version": pl.Utf8,
    "interval_method": pl.Utf8,
    "interval_level": pl.Float64,
    "skill": pl.Float64,
    "past_forecasts": pl.Int32,
    "beat_no_change_share": pl.Float64,
    "trust": pl.Utf8,
    "budget_chaos": pl.Float64,
    "max_weight": pl.Float64,
    "divine_price_chaos": pl.Float64,
    "divine_price_date": pl.Date,
    "generated_at": pl.Datetime("us", "UTC"),
}


# --- inputs -----------------------------------------------------------------------------------------------------


def markdown_table(frame: pl.DataFrame, decimals: int = 4) -> str:
    """A frame as a GitHub Markdown table, laid out by Polars: floats rounded, nulls blank, pipes escaped."""
    cells = frame.with_columns(pl.col(pl.Float32, pl.Float64).round(decimals)).select(
        pl.all().cast(pl.Utf8).fill_null("").str.replace_all("|", "\\|", literal=True))
    with pl.Config(tbl_formatting="MARKDOWN", tbl_hide_column_data_types=True, tbl_hide_dataframe_shape=True,
                   tbl_rows=-1, tbl_cols=-1, fmt_str_lengths=1000, tbl_width_chars=65_000):
        return str(cells)


def liquidity_scores(origin_rows: pl.DataFrame) -> pl.DataFrame:
    """currency, liquidity_score in [0, 1] from the feature rows at the origin (missing parts are left out)."""
    parts = [
        pl.col("good_confidence_share_7"),
        pl.col("observed_share_7"),
        pl.col("two_sided_share_7"),
        (-pl.col("spread_log_abs_mean_7") / SPREAD_SCALE).exp(),
        ((pl.col("volume").cast(pl.Float64) + 1).log10() / 3).clip(0.0, 1.0),
    ]
    present = [p for p in parts if all(c in origin_rows.columns for c in p.meta.root_names())]
    if not present:
        return origin_rows.select("currency", pl.lit(0.5).alias("liquidity_score"))
    return origin_rows.select(
        "currency",
        pl.mean_horizontal(present).fill_null(0.0).clip(0.0, 1.0).alias("liquidity_score"),
    )


def return_correlations(features: pl.DataFrame, origin: date, currencies: list[str],
                        days: int = CORRELATION_DAYS) -> pl.DataFrame:
    """Pairwise correlations of observed daily log-returns over the ``days`` days up to the origin.

    Columns currency_a, currency_b, correlation, days (overlap); pairs with fewer than ``MIN_CORRELATION_DAYS``
    common days are left out.
    """
    schema = {"currency_a": pl.Utf8, "currency_b": pl.Utf8, "correlation": pl.Float64, "days": pl.Int64}
    recent = features.filter(
        pl.col("currency").is_in(currencies),
        pl.col("date") > origin - timedelta(days=days),
        pl.col("date") <= origin,
        ~pl.col("is_imputed"),
        pl.col("logret_1d").is_not_null(),
    )
    if recent.height == 0:
        return pl.DataFrame(schema=schema)
    wide = recent.pivot(on="currency", index="date", values="logret_1d", aggregate_function="first")
    names = [c for c in wide.columns if c != "date"]
    matrix = wide.select(names).to_numpy().astype(np.float64)
    rows = []
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            both = np.isfinite(matrix[:, i]) & np.isfinite(matrix[:, j])
            n = int(both.sum())
            if n < MIN_CORRELATION_DAYS:
                continue
            x, y = matrix[both, i], matrix[both, j]
            if x.std() == 0 or y.std() == 0:
                continue
            r = float(np.corrcoef(x, y)[0, 1])
            rows += [(a, names[j], r, n), (names[j], a, r, n)]
    return pl.DataFrame(rows, schema=schema, orient="row")


# --- the report -------------------------------------------------------------------------------------------------


@dataclass
class InvestmentReport:
    league: str
    origin_date: date
    budget_chaos: float
    interval_level: float
    table: pl.DataFrame  # REPORT_SCHEMA, one row per currency x horizon
    correlations: pl.DataFrame
    generated_at: datetime
    notes: list[str] = field(default_factory=list)
    max_weight: float = MAX_WEIGHT
    divine_price_chaos: float | None = None  # chaos per Divine Orb; None: the report is in chaos only
    divine_price_date: date | None = None
    track_record: TrackRecord | None = None  # how past advice did; None: not looked up
    gaps: pl.DataFrame | None = None  # the origin's pairs without a forecast (forecasting.forecast_gaps); None: unknown

    @property
    def horizons(self) -> list[int]:
        return sorted(self.table["horizon_days"].unique().to_list())

    def picks(self, horizon: int | None = None) -> pl.DataFrame:
        rows = self.table.filter(pl.col("picked"))
        return rows.filter(pl.col("horizon_days") == horizon) if horizon is not None else rows

    def sells(self) -> pl.DataFrame:
        return self.table.filter(pl.col("advice") == "sell")

    @property
    def confident(self) -> bool:
        """Some currency's expected move beats its interval noise (a pick or a sell)."""
        return self.picks().height > 0 or self.sells().height > 0

    def headline(self) -> str:
        level = f"{self.interval_level:.0%}"
        if not self.confident:
            return (f"{NO_CONFIDENT.capitalize()}: for no currency at {_horizon_list(self.horizons)} does the "
                    f"expected move beat its {level} prediction interval. Keep your chaos; nothing here is worth "
                    "a trade on these forecasts.")
        parts = []
        for h in self.horizons:
            picks = self.picks(h)
            if picks.height:
                names = ", ".join(f"{r['currency']} ({r['expected_return']:+.1%})" for r in picks.iter_rows(named=True))
                parts.append(f"{h}d: buy {names}")
        sells = self.sells()
        if sells.height:
            names = ", ".join(sorted({r["currency"] for r in sells.iter_rows(named=True)}))
            parts.append(f"sell if you hold: {names}")
        return "Confident opportunities (the whole interval is on one side of today's price): " + "; ".join(parts)

    def top(self, n: int = 10) -> pl.DataFrame:
        """The n best rows across horizons, by score, for a quick look."""
        return (
            self.table.sort("score", descending=True, nulls_last=True)
            .head(n)
            .select(
                "currency", pl.col("horizon_days").alias("h"), "advice", pl.col("current_price").alias("price"),
                pl.col("predicted_price").alias("forecast"), (pl.col("expected_return") * 100).alias("exp_%"),
                (pl.col("downside_return") * 100).alias("downside_%"), "confidence",
                pl.col("liquidity_score").alias("liquidity"), "score", pl.col("allocation_chaos").alias("chaos"),
            )
        )


def _horizon_list(horizons: list[int]) -> str:
    names = [f"{h} day{'s' if h != 1 else ''}" for h in horizons]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else (names[0] if names else "any horizon")


def _z(level: float) -> float:
    return NormalDist().inv_cdf(0.5 + level / 2)


def _fmt_price(p: float) -> str:
    return f"{p:,.0f}" if p >= 1000 else f"{p:,.1f}" if p >= 100 else f"{p:.3g}" if p < 10 else f"{p:.1f}"


def _fmt_divines(d: float) -> str:
    return f"{d:,.0f}" if d >= 100 else f"{d:.1f}" if d >= 10 else f"{d:.2f}" if d >= 1 else f"{d:.2g}"


def _money(chaos: float, divine: float | None) -> str:
    """``6,720 chaos (28.0 div)``; chaos alone without a Divine Orb price."""
    text = f"{_fmt_price(chaos)} chaos"
    return f"{text} ({_fmt_divines(chaos / divine)} div)" if divine else text


def trust_text(skill: float | None, hit_share: float | None = None, past: int | None = None) -> str:
    """How far to trust a model, in words: its out-of-sample skill against 'no change' and, where past forecasts
    have come true, how often they beat it."""
    if skill is None or not math.isfinite(skill):
        text = "no out-of-sample skill on record: treat as noise"
    elif skill <= 0:
        text = f"no better than 'no change' out of sample (skill {skill:+.2f}): treat as noise"
    elif skill < MIN_SKILL_TO_MENTION:
        text = f"barely beats 'no change' out of sample (by {skill:.1%})"
    else:
        text = f"beats 'no change' by {skill:.0%} out of sample"
    hits = hit_rate_text(hit_share, past)
    return f"{text}; {hits}" if hits else text


def has_skill(skill: float | None) -> bool:
    return skill is not None and math.isfinite(skill) and skill > 0


def divine_price(features: pl.DataFrame, league: str, origin: date) -> tuple[float | None, date | None]:
    """(chaos per Divine Orb, the day it was observed): on the origin day, else the last observed day before it."""
    rows = features.filter(
        (pl.col("league") == league) & (pl.col("currency") == DIVINE) & (pl.col("date") <= origin)
        & pl.col("price_chaos").is_finite() & (pl.col("price_chaos") > 0)
    )
    if "is_imputed" in rows.columns:  # a carried price is the last observed one, which has its own day
        rows = rows.filter(~pl.col("is_imputed").fill_null(False))
    if rows.height == 0:
        return None, None
    last = rows.sort("date").row(-1, named=True)
    return float(last["price_chaos"]), last["date"]


def _trigger(advice: str, price: float, lower: float, upper: float, divine: float | None) -> tuple[float, str]:
    up, down = upper / price - 1, lower / price - 1
    if advice == "buy":
        return lower, (f"edge gone if the price rises above {_money(lower, divine)}, {down:+.1%}; "
                       f"sell above {_money(upper, divine)}, {up:+.1%}")
    if advice == "sell":
        return upper, f"edge gone if the price falls below {_money(upper, divine)}, {up:+.1%}"
    nearest = lower if abs(down) <= abs(up) else upper
    return nearest, (f"buy below {_money(lower, divine)}, {down:+.1%}; sell above {_money(upper, divine)}, "
                     f"{up:+.1%}")


def _suspect_quote(price: float, median: float | None) -> str | None:
    """How far today's price is off its 7-day median ("12x below") when that is beyond ``SUSPECT_QUOTE_FACTOR``."""
    if median is None or not median > 0 or not price > 0:
        return None
    ratio = price / median
    if ratio > SUSPECT_QUOTE_FACTOR:
        return f"{ratio:.0f}x above"
    if ratio < 1 / SUSPECT_QUOTE_FACTOR:
        return f"{1 / ratio:.0f}x below"
    return None


def _kelly(r: dict, z: float, max_weight: float) -> float:
    sigma = max(r["half_width_logret"] / z, 1e-6)
    return min(max_weight, max(0.0, KELLY_FRACTION * r["confidence"] * r["expected_logret"] / sigma**2))


def _whole_units(share: float, budget: float, price: float) -> int:
    return math.floor(share * budget / price + 1e-9)


def _unaffordable(price: float, share: float, budget: float, divine: float | None) -> str:
    need = f": a budget of {_money(price / share, divine)} would buy one" if share > 0 else ""
    return (f"{NOT_BOUGHT}one unit costs {_money(price, divine)}, more than its share of "
            f"{_money(share * budget, divine)}, {share:.0%} of the budget{need}")


def _allocate(picks: list[dict], z: float, budget: float, max_weight: float, divine: float | None) -> None:
    """Set each pick's allocation_fraction, units and allocation_chaos; picks come best score first.

    Shares are the capped quarter-Kelly fractions, scaled down to 100 % when they add up to more. A pick whose
    share buys no whole unit gets nothing and a note; the shares of the others are then worked out again without
    it, so its share goes to them, none above its own capped fraction. The worst-scored such pick goes first.
    """
    kelly = [_kelly(r, z, max_weight) for r in picks]
    funded = list(range(len(picks)))
    while True:
        total = sum(kelly[i] for i in funded)
        share = {i: kelly[i] / total if total > 1.0 else kelly[i] for i in funded}
        short = [i for i in funded if _whole_units(share[i], budget, picks[i]["current_price"]) < 1]
        if not short:
            break
        dropped = picks[short[-1]]
        note = _unaffordable(dropped["current_price"], share[short[-1]], budget, divine)
        dropped["note"] = "; ".join(x for x in (dropped["note"], note) if x)
        funded.remove(short[-1])
    for i, r in enumerate(picks):
        f = share.get(i, 0.0)
        r["allocation_fraction"] = f
        r["units"] = _whole_units(f, budget, r["current_price"]) if f else 0
        r["allocation_chaos"] = r["units"] * r["current_price"]


def build_report(
    predictions: pl.DataFrame,
    features: pl.DataFrame,
    budget_chaos: float = DEFAULT_BUDGET_CHAOS,
    top_k: int = TOP_K,
    generated_at: datetime | None = None,
    max_weight: float = MAX_WEIGHT,
    track_record: TrackRecord | None = None,
    gaps: pl.DataFrame | None = None,
) -> InvestmentReport:
    """Rank, pick and allocate from the predictions of one (league, origin); ``features`` are that league's rows.

    ``max_weight`` caps each pick's share of the budget. ``track_record``: how past advice did; each row's trust
    then also says how often its currency's forecasts beat 'no change'. ``gaps``: the origin's pairs without a
    forecast, with the reason (``forecasting.forecast_gaps``), listed in the report.
    """
    if predictions.height == 0:
        raise ValueError("No predictions to report on: materialize `predictions` first")
    if not budget_chaos > 0 or not math.isfinite(budget_chaos):
        raise ValueError(f"budget {budget_chaos!r} chaos: the budget must be positive, e.g. 1000")
    if not 0 < max_weight <= 1:
        raise ValueError(f"max_weight {max_weight!r}: the per-pick cap must be a fraction in (0, 1], e.g. "
                         f"{MAX_WEIGHT}")
    origins = predictions.select("league", "origin_date").unique()
    if origins.height != 1:
        raise ValueError(f"Predictions span {origins.height} (league, origin) pairs: pass one league and origin")
    league, origin = origins.row(0)
    level = float(predictions["interval_level"][0])
    generated_at = generated_at or datetime.now(UTC)
    league_rows = features.filter(pl.col("league") == league)
    at_origin = league_rows.filter(pl.col("date") == origin)
    currencies = sorted(predictions["currency"].unique().to_list())
    liquidity = liquidity_scores(at_origin)
    median = "log_price_roll_median_7"  # left out, like the liquidity parts, from features without it
    medians = at_origin.select("currency", (pl.col(median).exp() if median in at_origin.columns
                                            else pl.lit(None, pl.Float64)).alias("median_price_7"))
    correlations = return_correlations(league_rows, origin, currencies)
    corr = {(a, b): r for a, b, r, _ in correlations.iter_rows()}
    divine, divine_day = divine_price(league_rows, league, origin)

    base = (
        predictions.join(liquidity, on="currency", how="left").join(medians, on="currency", how="left")
        .with_columns(
            pl.col("liquidity_score").fill_null(0.0),
            (pl.col("predicted_price") / pl.col("current_price")).log().alias("expected_logret"),
            ((pl.col("pred_upper") / pl.col("pred_lower")).log() / 2).alias("half_width_logret"),
            (pl.col("daily_volatility").fill_null(FALLBACK_DAILY_VOL).clip(lower_bound=VOL_FLOOR)
             * pl.col("horizon_days").cast(pl.Float64).sqrt()).alias("volatility"),
        )
        .with_columns(
            (pl.col("expected_logret").exp() - 1).alias("expected_return"),
            (pl.col("pred_lower") / pl.col("current_price") - 1).alias("downside_return"),
            (pl.col("pred_upper") / pl.col("current_price") - 1).alias("upside_return"),
            (pl.col("confidence") * pl.col("expected_logret") / pl.col("volatility")).alias("risk_adjusted_score"),
        )
        .with_columns((pl.col("risk_adjusted_score") * pl.col("liquidity_score")).alias("score"))
    )

    z = _z(level)
    out: list[dict] = []
    for _, group in sorted(base.partition_by("horizon_days", as_dict=True).items()):
        ranked = group.sort("score", descending=True, nulls_last=True).to_dicts()
        picked: list[dict] = []
        for rank, r in enumerate(ranked, 1):
            r["rank"] = rank
            notes = []
            beats_up = r["pred_lower"] > r["current_price"]
            beats_down = r["pred_upper"] < r["current_price"]
            suspect = _suspect_quote(r["current_price"], r["median_price_7"])
            if (beats_up or beats_down) and suspect:
                r["advice"] = "hold"
                notes.append(f"would be a {'buy' if beats_up else 'sell'}, but today's price "
                             f"{_fmt_price(r['current_price'])} c is {suspect} its 7-day median "
                             f"{_fmt_price(r['median_price_7'])} c: likely a glitch or a thin quote")
            elif beats_down:
                r["advice"] = "sell"
                notes.append("the whole interval lies below today's price")
            elif beats_up and r["confidence"] < MIN_PICK_CONFIDENCE:
                r["advice"] = "hold"
                notes.append(f"would be a buy, but confidence {r['confidence']:.2f} < {MIN_PICK_CONFIDENCE}")
            elif beats_up and r["liquidity_score"] < MIN_PICK_LIQUIDITY:
                r["advice"] = "hold"
                notes.append(f"would be a buy, but too illiquid (liquidity {r['liquidity_score']:.2f})")
            elif beats_up:
                r["advice"] = "buy"
            else:
                r["advice"] = "hold"
                notes.append(f"expected move {r['expected_logret']:+.1%} is inside the noise "
                             f"(+-{r['half_width_logret']:.1%})")
            twins = sorted(
                ((o, corr[(r["currency"], o)]) for o in currencies
                 if (r["currency"], o) in corr and corr[(r["currency"], o)] > MAX_CORRELATION),
                key=lambda t: -t[1],
            )
            r["correlated_with"] = ", ".join(f"{o} ({c:.2f})" for o, c in twins)
            r["picked"] = False
            if r["advice"] == "buy":
                clash = [p["currency"] for p in picked if corr.get((r["currency"], p["currency"]), 0) > MAX_CORRELATION]
                if clash:
                    notes.append(f"not picked: moves with {clash[0]} (corr > {MAX_CORRELATION}), already picked")
                elif len(picked) >= top_k:
                    notes.append(f"not picked: the top {top_k} are already chosen")
                else:
                    r["picked"] = True
                    picked.append(r)
            r["note"] = "; ".join(notes)
            flip, text = _trigger(r["advice"], r["current_price"], r["pred_lower"], r["pred_upper"], divine)
            r["buy_below"], r["sell_above"] = r["pred_lower"], r["pred_upper"]
            r["flip_price"], r["flip_move"], r["trigger"] = flip, flip / r["current_price"] - 1, text
            r["allocation_fraction"], r["allocation_chaos"], r["units"] = 0.0, 0.0, 0
        _allocate(picked, z, budget_chaos, max_weight, divine)
        out += ranked

    hits = ({(c, h): (n, share) for c, h, n, share, _ in hit_rates(track_record.outcomes).iter_rows()}
            if track_record is not None else {})
    for r in out:
        r["past_forecasts"], r["beat_no_change_share"] = hits.get((r["currency"], r["horizon_days"]), (None, None))
        for col in ("current_price", "predicted_price", "pred_lower", "pred_upper"):
            r[f"{col}_divines"] = r[col] / divine if divine else None
        r["allocation_divines"] = r["allocation_chaos"] / divine if divine else None
        r["trust"] = trust_text(r["skill"], r["beat_no_change_share"], r["past_forecasts"])
        r["budget_chaos"], r["max_weight"] = budget_chaos, max_weight
        r["divine_price_chaos"], r["divine_price_date"] = divine, divine_day
        r["generated_at"] = generated_at
    table = pl.DataFrame([{k: r.get(k) for k in REPORT_SCHEMA} for r in out], schema=REPORT_SCHEMA)
    report = InvestmentReport(league, origin, budget_chaos, level, table, correlations, generated_at,
                              max_weight=max_weight, divine_price_chaos=divine, divine_price_date=divine_day,
                              track_record=track_record, gaps=gaps)
    if divine is None:
        report.notes.append(f"No {DIVINE} price for {league} up to {origin}: amounts are in chaos only.")
    elif divine_day != origin:
        report.notes.append(f"No {DIVINE} price observed on {origin}: amounts in divines use the last observed "
                            f"one, {_fmt_price(divine)} chaos on {divine_day}.")
    stale = predictions.filter(pl.col("days_since_observed") > 0)
    if stale.height:
        names = ", ".join(sorted(set(stale["currency"])))
        report.notes.append(f"Stale prices (not observed on {origin}, carried forward): {names}.")
    return report


# --- files ------------------------------------------------------------------------------------------------------


@dataclass
class ReportFiles:
    directory: Path
    html: Path
    markdown: Path
    csv: Path
    table: Path
    charts: dict[str, Path]


def report_table_path(lake: Lake, league: str, origin: date) -> Path:
    return hive_dir(lake.investment_report, league=league, origin_date=origin.isoformat()) / "part.parquet"


def report_dir(lake: Lake, origin: date) -> Path:
    return lake.reports / origin.isoformat()


def report_stem(lake: Lake, league: str, origin: date) -> Path:
    """The report's files without their suffix: ``<stem>.html``, ``.md``, ``.csv``."""
    return report_dir(lake, origin) / f"investment_report_{slug(league)}"


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


CHART_MAX_CURRENCIES = 24  # small multiples: every currency of a demo-sized report, the best 24 of a full one


def _chart_currencies(report: InvestmentReport, n: int = CHART_MAX_CURRENCIES) -> tuple[list[str], bool]:
    """Every currency of the report for the fan chart, picks and sells first, then by best score (at most ``n``);
    True if there are picks."""
    ranked = report.table.sort("score", descending=True, nulls_last=True)
    first = [*report.picks().sort("score", descending=True)["currency"].to_list(), *report.sells()["currency"]]
    names = list(dict.fromkeys([*first, *ranked["currency"].to_list()]))[:n]
    return names, report.picks().height > 0


def fan_chart(report: InvestmentReport, features: pl.DataFrame, currencies: list[str], are_picks: bool) -> bytes:
    """Price history with the forecast fan (the interval at each horizon) for each currency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(currencies))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 2.9 * rows), squeeze=False)
    origin = report.origin_date
    for ax, currency in zip(axes.flat, currencies, strict=False):
        hist = features.filter(
            (pl.col("league") == report.league) & (pl.col("currency") == currency)
            & (pl.col("date") > origin - timedelta(days=HISTORY_DAYS)) & (pl.col("date") <= origin)
        ).sort("date")
        dates = hist["date"].to_list()
        ax.plot(dates, hist["price_chaos"].to_list(), color="#1f3b5c", lw=1.6, label="daily price")
        imputed = hist.filter(pl.col("is_imputed"))
        if imputed.height:
            ax.scatter(imputed["date"].to_list(), imputed["price_chaos"].to_list(), s=12, color="#999",
                       label="no observation (carried)", zorder=3)
        fc = report.table.filter(pl.col("currency") == currency).sort("horizon_days")
        price = float(fc["current_price"][0])
        xs = [origin] + [origin + timedelta(days=int(h)) for h in fc["horizon_days"]]
        lower = [price, *fc["pred_lower"].to_list()]
        upper = [price, *fc["pred_upper"].to_list()]
        mid = [price, *fc["predicted_price"].to_list()]
        ax.fill_between(xs, lower, upper, color="#f28e2b", alpha=0.25, label=f"{report.interval_level:.0%} interval")
        ax.plot(xs, mid, color="#d9480f", lw=1.6, ls="--", marker="o", ms=3, label="forecast")
        ax.axvline(origin, color="#666", lw=0.8, ls=":")
        calls = [f"{a} {h}d" for a, h in zip(fc["advice"], fc["horizon_days"], strict=True) if a in ("buy", "sell")]
        ax.set_title(f"{currency} ({', '.join(calls)})" if calls else currency, fontsize=9)
        ax.set_ylabel("chaos", fontsize=8)
        ax.tick_params(axis="both", labelsize=7)
        ax.tick_params(axis="x", labelrotation=30)
        ax.grid(alpha=0.25)
    for ax in list(axes.flat)[len(currencies):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7, loc="best")
    title = ("Every currency of the report, picks first" if are_picks
             else "Every currency of the report, best-ranked first (no confident buy)")
    fig.suptitle(f"{title}: {report.league}, forecasts from {origin}", fontsize=12)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


LABEL_FONT_PT = 7
MAX_LABELS = 12


def _stagger(ys: list[float], gap: float, low: float, high: float) -> list[float]:
    """Label positions near ``ys`` (display units), at least ``gap`` apart, above ``low`` and under ``high`` where
    they fit (the ceiling wins)."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    placed = [0.0] * len(ys)
    last = -math.inf
    for i in order:
        last = max(ys[i], last + gap, low)
        placed[i] = last
    ceiling = high + gap
    for i in reversed(order):  # push the top ones back under the ceiling, keeping the gaps
        ceiling = min(placed[i], ceiling - gap)
        placed[i] = ceiling
    return placed


def risk_return_figure(report: InvestmentReport):
    """Expected return against interval half-width per currency and horizon; above the diagonal beats the noise.

    The y axis spans the data (and 0) with a margin; only picks and sells are labelled, staggered so no two
    labels overlap.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5.6))
    t = report.table.filter(pl.col("half_width_logret").is_finite() & pl.col("expected_logret").is_finite())
    markers = {1: "o", 3: "s", 7: "^"}
    colors = {"buy": "#2b8a3e", "sell": "#c92a2a", "hold": "#868e96"}
    for (h, advice), g in t.group_by("horizon_days", "advice"):
        ax.scatter(
            (g["half_width_logret"] * 100).to_list(), (g["expected_logret"] * 100).to_list(),
            s=(20 + 180 * g["confidence"]).to_list(), marker=markers.get(int(h), "D"), c=colors.get(advice, "#333"),
            alpha=0.75, edgecolors="white", linewidths=0.5, label=f"{h}d {advice}",
        )
    ys = (t["expected_logret"] * 100).to_list() or [0.0]
    xmax = max(max((t["half_width_logret"] * 100).to_list(), default=0.0) * 1.1, 1.0)
    y_lo, y_hi = min(min(ys), 0.0), max(max(ys), 0.0)
    margin = max(0.15 * (y_hi - y_lo), 0.5)
    ax.plot([0, xmax], [0, xmax], color="#2b8a3e", lw=0.8, ls="--")
    ax.plot([0, xmax], [0, -xmax], color="#c92a2a", lw=0.8, ls="--")
    ax.axhline(0, color="#444", lw=0.6)
    ax.set_xlim(0, xmax)
    ax.set_ylim(y_lo - margin, y_hi + margin)
    ax.set_xlabel(f"noise: half-width of the {report.interval_level:.0%} interval (% log-price)")
    ax.set_ylabel("expected return (% log-price)")
    ax.set_title("Risk and return: only points outside the dashed wedge beat their noise", fontsize=11)
    ax.grid(alpha=0.25)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: labels[i])
    ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=7, loc="upper left",
              bbox_to_anchor=(1.01, 1.0), markerscale=0.6, frameon=False)
    fig.tight_layout()

    labelled = pl.concat([
        t.filter(pl.col("picked")).sort("score", descending=True, nulls_last=True),
        t.filter(pl.col("advice") == "sell").sort("score", nulls_last=True),
    ]).head(MAX_LABELS)
    if labelled.height:
        points = ax.transData.transform(np.column_stack([labelled["half_width_logret"].to_numpy() * 100,
                                                         labelled["expected_logret"].to_numpy() * 100]))
        box = ax.get_window_extent()
        gap = LABEL_FONT_PT * fig.dpi / 72 * 1.6
        label_ys = _stagger(points[:, 1].tolist(), gap, box.y0 + gap / 2, box.y1 - gap / 2)
        to_data = ax.transData.inverted()
        for r, (px, _), ly in zip(labelled.iter_rows(named=True), points, label_ys, strict=True):
            left = px > (box.x0 + box.x1) / 2  # labels point inwards, away from the legend
            tx, ty = to_data.transform((px - 10 if left else px + 10, ly))
            ax.annotate(f"{r['currency']} {r['horizon_days']}d", (r["half_width_logret"] * 100,
                        r["expected_logret"] * 100), xytext=(tx, ty), textcoords="data", fontsize=LABEL_FONT_PT,
                        va="center", ha="right" if left else "left",
                        arrowprops={"arrowstyle": "-", "color": "#888", "lw": 0.5})
    return fig


def risk_return_chart(report: InvestmentReport) -> bytes:
    import matplotlib.pyplot as plt

    fig = risk_return_figure(report)
    data = _png(fig)
    plt.close(fig)
    return data


def _divines(column: str) -> pl.Expr:
    return pl.col(column).map_elements(_fmt_divines, return_dtype=pl.Utf8)


def _sections(report: InvestmentReport) -> list[tuple[str, pl.DataFrame, str]]:
    """(title, table, caption) blocks shared by the HTML and the Markdown."""
    div = report.divine_price_chaos is not None
    blocks = []
    for h in report.horizons:
        rows = report.table.filter(pl.col("horizon_days") == h).sort("rank")
        view = rows.select(
            "rank", "currency", "advice", pl.col("current_price").alias("price (chaos)"),
            *([_divines("current_price_divines").alias("price (div)")] if div else []),
            pl.col("predicted_price").alias("forecast (chaos)"),
            *([_divines("predicted_price_divines").alias("forecast (div)")] if div else []),
            (pl.col("expected_return") * 100).round(2).alias("expected %"),
            (pl.col("downside_return") * 100).round(2).alias("downside %"),
            (pl.col("upside_return") * 100).round(2).alias("upside %"),
            pl.col("confidence").round(2), pl.col("liquidity_score").round(2).alias("liquidity"),
            pl.col("score").round(3), "units", pl.col("allocation_chaos").round(0).alias("allocate (chaos)"),
            *([_divines("allocation_divines").alias("allocate (div)")] if div else []),
            "trust", "trigger", "note",
        )
        picks = rows.filter(pl.col("picked"))
        caption = (f"{picks.height} pick(s): " + ", ".join(picks["currency"]) if picks.height
                   else "No pick at this horizon: nothing beats its interval noise.")
        blocks.append((f"{h}-day horizon", view, caption))
    return blocks


PAST_ADVICE_TITLE = "How did past advice do?"
PAST_ADVICE_CHART = "past advice"


def _past_advice(report: InvestmentReport) -> dict:
    """The text and table of the report's track-record section."""
    track = report.track_record
    if track is None or track.empty:
        return {"text": "No past advice of this league has come true yet: the section fills as forecasts reach "
                        "their horizon (or after a replay of earlier days, see advice_outcomes).", "table": None}
    text = (f"Every past piece of advice in {report.league} whose horizon has come, scored against the price on "
            "that day. A plan is a horizon's picks with their allocation, the rest kept in chaos; plans are chained "
            "without overlap (the next starts when the last ends) and compounded. " + track.sources_text())
    return {"text": text, "table": track.summary()}


GAPS_TITLE = "Not forecast"


def _gaps(report: InvestmentReport) -> dict | None:
    """The text and table of the section on the pairs without a forecast; None when they were not recorded."""
    if report.gaps is None:
        return None
    if report.gaps.height == 0:
        return {"text": "Every one of the league's most liquid currencies has a forecast at every horizon.",
                "table": None}
    view = (report.gaps.group_by("currency", "liquidity_rank", "reason", maintain_order=True)
            .agg(pl.col("horizon_days").sort().cast(pl.Utf8).str.join(", ").alias("horizons (days)"))
            .select(pl.col("liquidity_rank").alias("liquidity rank"), "currency", "horizons (days)", "reason"))
    n, top = report.gaps.height, DEFAULT_RULES.top_liquid
    liquid = report.gaps.filter(pl.col("liquidity_rank") <= top)["currency"].n_unique()
    text = (f"{liquid} of the league's {top} most liquid currencies lack a forecast at one horizon or more"
            if liquid else f"Each of the league's {top} most liquid currencies has a forecast at every horizon")
    others = report.gaps.filter(pl.col("liquidity_rank").is_null() | (pl.col("liquidity_rank") > top)).height
    if others:
        text += f"; {others} other (currency, horizon) pair(s) could not be forecast"
    return {"text": f"{text}. All {n} pairs and their reasons are in the warehouse view forecast_gaps.", "table": view}


def allocation_plan(report: InvestmentReport, horizon: int) -> str:
    """One line: what to buy at this horizon, in whole units, and the chaos kept ("" without picks)."""
    picks = report.picks(horizon)
    if picks.height == 0:
        return ""
    d = report.divine_price_chaos
    items = []
    for r in picks.iter_rows(named=True):
        if r["units"]:
            item = (f"{r['currency']}: {r['units']:,} x {_money(r['current_price'], d)} = "
                    f"{_money(r['allocation_chaos'], d)}, {r['allocation_fraction']:.0%} of the budget")
        else:
            item = f"{r['currency']}: none, since {(r['note'] or 'its share buys no unit').removeprefix(NOT_BOUGHT)}"
        items.append(item if has_skill(r["skill"]) else f"{item} [model {r['trust']}]")
    kept = report.budget_chaos - float(picks["allocation_chaos"].sum())
    return "; ".join(items) + f". Keep {_money(kept, d)}."


def _model_quality(report: InvestmentReport) -> pl.DataFrame:
    return (
        report.table.select("currency", "horizon_days", "skill", "trust", "interval_method", "model_version")
        .sort("currency", "horizon_days")
        .rename({"horizon_days": "h", "skill": "validation skill vs no-change"})
    )


def method_text(report: InvestmentReport) -> list[str]:
    return [
        "Forecasts are log-returns from an ensemble (LightGBM, XGBoost, RandomForest) shrunk towards 'no change'. "
        "On daily PoE prices, 'no change' is very hard to beat: most models here are barely better than it, and "
        "some are worse (see the trust column: a model no better than 'no change' is noise, whatever it says).",
        "Intervals are split-conformal from the models' out-of-fold errors, scaled by each currency's recent "
        "volatility. They are built to contain the realised price about as often as their level says, not more.",
        "A buy needs the whole interval above today's price. Allocation is a capped quarter-Kelly fraction "
        f"(at most {report.max_weight:.0%} per currency), scaled by confidence; a pick whose share cannot buy one "
        "whole unit gets nothing and its share goes to the other picks; the rest stays in chaos.",
        "Divine Orb amounts use one Divine Orb price for every row, that of the origin day (see the top), also for "
        "forecasts: they are chaos amounts restated, not a forecast of the Divine Orb.",
        "Triggers assume the forecast's price levels hold. After a big move, re-run the forecast rather than "
        "trading on a stale trigger.",
        "This is not financial advice, and it is a game: prices react to patch notes and league events that no "
        "model sees coming.",
    ]


def meta_line(report: InvestmentReport) -> str:
    d = report.divine_price_chaos
    rate = (f" 1 {DIVINE} = {_fmt_price(d)} chaos (price of {report.divine_price_date})." if d
            else f" No {DIVINE} price: chaos only.")
    return (f"Prices in chaos as of {report.origin_date}.{rate} Budget {_money(report.budget_chaos, d)}, at most "
            f"{report.max_weight:.0%} per pick. Intervals at {report.interval_level:.0%}. Generated "
            f"{report.generated_at:%Y-%m-%d %H:%M} UTC.")


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def _html_table(df: pl.DataFrame) -> markupsafe.Markup:
    """A table of the report, buy rows green and sell rows red (escaped by the template's autoescape)."""
    advice = df.columns.index("advice") if "advice" in df.columns else None
    return _TEMPLATES.get_template("report_table.html.j2").module.table(
        df.columns, [([_cell(v) for v in row], row[advice] if advice is not None else "") for row in df.rows()])


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1250px;color:#222;
line-height:1.45;padding:0 1em}h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
.headline{padding:.8em 1em;border-radius:6px;background:#fff4e6;border:1px solid #f08c00;font-size:1.05em}
.headline.ok{background:#ebfbee;border-color:#2b8a3e}table{border-collapse:collapse;font-size:.82em;margin:.6em 0}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:right;vertical-align:top}th{background:#f1f3f5}
td:nth-child(2),td:nth-child(3),td:last-child,td:nth-last-child(2),td:nth-last-child(3){text-align:left}
td:nth-last-child(-n+3){min-width:14em}.wide{overflow-x:auto}
tr.buy{background:#ebfbee}tr.sell{background:#fff5f5}img{max-width:100%;border:1px solid #eee}
.meta{color:#666;font-size:.9em}
"""


# autoescape: currency names and notes come from the data; nothing in them is markup
_TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("poe_pipeline", "templates"),
                                autoescape=jinja2.select_autoescape(["html", "j2"]), trim_blocks=True)


def render_html(report: InvestmentReport, charts: dict[str, bytes]) -> str:
    """The self-contained HTML report (templates/investment_report.html.j2), charts inline as base64 PNG."""
    plans = [(h, plan) for h in report.horizons if (plan := allocation_plan(report, h))] if report.picks().height \
        else []
    past = charts.get(PAST_ADVICE_CHART)
    return _TEMPLATES.get_template("investment_report.html.j2").render(
        report=report, css=markupsafe.Markup(CSS), plans=plans, meta=meta_line(report),
        charts=[(name, base64.b64encode(data).decode()) for name, data in charts.items() if name != PAST_ADVICE_CHART],
        past=_past_advice(report), past_chart=base64.b64encode(past).decode() if past else None,
        sections=[{"title": t, "table": table, "caption": c} for t, table, c in _sections(report)],
        quality=_model_quality(report), method=method_text(report), table=_html_table, gaps=_gaps(report),
        gaps_title=GAPS_TITLE,
    )


def render_markdown(report: InvestmentReport, chart_files: dict[str, str]) -> str:
    lines = [
        f"# Investment report: {report.league}, {report.origin_date}",
        "",
        meta_line(report),
        "",
        f"**{report.headline()}**",
        "",
        *[f"{n}\n" for n in report.notes],
    ]
    if report.picks().height:
        lines += ["## Suggested allocation", ""]
        lines += [f"- **{h}-day plan**: {plan}" for h in report.horizons if (plan := allocation_plan(report, h))]
        lines.append("")
    lines += ["## Charts", ""] + [f"![{name}]({file})" for name, file in chart_files.items()
                                  if name != PAST_ADVICE_CHART] + [""]
    past = _past_advice(report)
    lines += [f"## {PAST_ADVICE_TITLE}", "", past["text"], ""]
    if past["table"] is not None:
        lines += [markdown_table(past["table"]), ""]
    if PAST_ADVICE_CHART in chart_files:
        lines += [f"![{PAST_ADVICE_CHART}]({chart_files[PAST_ADVICE_CHART]})", ""]
    for title, table, caption in _sections(report):
        lines += [f"## {title}", "", caption, "", markdown_table(table), ""]
    if (gaps := _gaps(report)) is not None:
        lines += [f"## {GAPS_TITLE}", "", gaps["text"], ""]
        if gaps["table"] is not None:
            lines += [markdown_table(gaps["table"]), ""]
    lines += ["## Model quality", "", markdown_table(_model_quality(report)), "", "## How to read this", ""]
    lines += [f"- {t}" for t in method_text(report)] + [""]
    return "\n".join(lines)


def write_report(lake: Lake, report: InvestmentReport, features: pl.DataFrame) -> ReportFiles:
    """The HTML and Markdown reports with their charts, the CSV and the Parquet table, each written atomically."""
    directory = report_dir(lake, report.origin_date)
    stem = report_stem(lake, report.league, report.origin_date).name
    names, are_picks = _chart_currencies(report)
    charts = {
        "forecast fan": fan_chart(report, features, names, are_picks),
        "risk and return": risk_return_chart(report),
    }
    if report.track_record is not None and not report.track_record.empty:
        charts[PAST_ADVICE_CHART] = report.track_record.chart()
    chart_paths = {name: write_bytes_atomic(data, directory / f"{stem}_{slug(name)}.png")
                   for name, data in charts.items()}
    html_path = write_text_atomic(render_html(report, charts), directory / f"{stem}.html")
    md_path = write_text_atomic(render_markdown(report, {k: p.name for k, p in chart_paths.items()}),
                                directory / f"{stem}.md")
    csv_path = write_text_atomic(report.table.write_csv(), directory / f"{stem}.csv")
    table_path = write_parquet_atomic(report.table, report_table_path(lake, report.league, report.origin_date))
    return ReportFiles(directory, html_path, md_path, csv_path, table_path, chart_paths)


def _as_report_schema(frame: pl.DataFrame) -> pl.DataFrame:
    """A stored table in today's REPORT_SCHEMA: columns an older report lacks are null."""
    return frame.select([pl.col(c).cast(t) if c in frame.columns else pl.lit(None, dtype=t).alias(c)
                         for c, t in REPORT_SCHEMA.items()])


def read_report_table(lake: Lake, league: str | None = None) -> pl.DataFrame:
    files = lake.parquet_files(lake.investment_report)
    if league is not None:
        files = [p for p in files if p.parent.parent.name == f"league={league}"]
    if not files:
        return pl.DataFrame(schema=REPORT_SCHEMA)
    return pl.concat([_as_report_schema(pl.read_parquet(p, hive_partitioning=False)) for p in files])


def _report_from_table(league: str, table: pl.DataFrame) -> InvestmentReport:
    first = table.row(0, named=True)
    return InvestmentReport(
        league, first["origin_date"], first["budget_chaos"], first["interval_level"], table, pl.DataFrame(),
        first["generated_at"], max_weight=first["max_weight"] or MAX_WEIGHT,
        divine_price_chaos=first["divine_price_chaos"], divine_price_date=first["divine_price_date"])


def latest_report(lake: Lake, league: str, before: date | None = None) -> InvestmentReport | None:
    """The stored report of the league's latest origin (before ``before`` if given), rebuilt from its table; None
    when there is none."""
    table = read_report_table(lake, league)
    if before is not None:
        table = table.filter(pl.col("origin_date") < before)
    if table.height == 0:
        return None
    return _report_from_table(league, table.filter(pl.col("origin_date") == table["origin_date"].max()))


def new_buys(lake: Lake, report: InvestmentReport) -> pl.DataFrame:
    """The report's picks (confident buys) that the league's previous stored report did not pick at the same horizon.

    "Previous" is the latest stored origin before this report's, so re-running a report finds the same new buys.
    Every pick is new when there is no earlier report.
    """
    previous = latest_report(lake, report.league, before=report.origin_date)
    picks = report.picks().sort("horizon_days", "rank")
    if previous is None:
        return picks
    before = previous.picks().select("currency", "horizon_days").unique()
    return picks.join(before, on=["currency", "horizon_days"], how="anti", maintain_order="left")


def buy_signal_text(row: dict, interval_level: float) -> tuple[str, str]:
    """(title, message) of the alert for one new buy, a row of the report's table."""
    d = row["divine_price_chaos"]
    h = row["horizon_days"]
    days = f"{h} day{'s' if h != 1 else ''}"
    title = f"New buy signal: {row['currency']}, {h}-day horizon ({row['league']})"
    if row["units"]:
        plan = f"Suggested: {row['units']:,} unit(s) for {_money(row['allocation_chaos'], d)} of the budget."
    else:
        plan = f"Not bought at this budget: {(row['note'] or 'its share buys no unit').removeprefix(NOT_BOUGHT)}."
    message = (
        f"Buy {row['currency']} for {days}: expected move {row['expected_return']:+.1%}, from "
        f"{_money(row['current_price'], d)} to {_money(row['predicted_price'], d)}; {interval_level:.0%} interval "
        f"{_money(row['pred_lower'], d)} to {_money(row['pred_upper'], d)}, all above today's price. {plan} "
        f"Model: {row['trust']}. {row['trigger'].capitalize()}. Forecast from {row['origin_date']}."
    )
    return title, message


def report_summary(lake: Lake, league: str, top: int = 10) -> str:
    """A few lines for the command line: the headline, the top rows and where the reports are."""
    report = latest_report(lake, league)
    if report is None:
        return f"No investment report for {league} yet: materialize `investment_report`."
    stem = report_stem(lake, league, report.origin_date)
    lines = [f"Investment report for {league}, prices of {report.origin_date}:", report.headline(), ""]
    lines += [f"{h}-day plan: {plan}" for h in report.horizons if (plan := allocation_plan(report, h))]
    lines += ["", f"Top {top} by risk-adjusted score (advice 'hold' means no edge beyond the noise):",
              markdown_table(report.top(top)), ""]
    gaps = read_forecast_gaps(lake, league, report.origin_date)
    if gaps is not None and gaps.height:
        lines += [f"Not forecast: {gaps['currency'].n_unique()} currencies at one horizon or more, each with the "
                  "reason (view forecast_gaps), e.g. " + f"{gaps['currency'][0]}: {gaps['reason'][0]}", ""]
    lines += [f"Report: {stem}.html", f"         {stem}.md", f"         {stem}.csv"]
    return "\n".join(lines)

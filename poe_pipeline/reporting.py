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
- **Diversification.** Buys are taken best score first, skipping a currency whose daily log-returns over the last
  ``CORRELATION_DAYS`` days correlate above ``MAX_CORRELATION`` with one already picked; at most ``top_k``.
- **Allocation.** A fraction of the chaos budget per pick: a quarter-Kelly ``KELLY_FRACTION x confidence x m /
  sigma^2`` with ``sigma = w / z`` (the interval's own spread), capped at ``MAX_WEIGHT`` each and 100 % in total;
  the rest stays in chaos.
- **Rebalancing triggers.** With the forecast's price levels held fixed, the advice flips at the interval's bounds:
  below ``pred_lower`` the expected move beats the noise upwards (buy), above ``pred_upper`` downwards (sell).

Outputs: ``reports/<origin_date>/investment_report_<league>.html`` (self-contained, charts inline as base64 PNG),
a Markdown twin with the PNGs beside it, and the table ``investment_report/league=<L>/origin_date=<D>/part.parquet``.
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

from poe_pipeline.forecasting import FALLBACK_DAILY_VOL, VOL_FLOOR
from poe_pipeline.lake import Lake, hive_dir, write_bytes_atomic, write_parquet_atomic, write_text_atomic
from poe_pipeline.names import slug

DEFAULT_BUDGET_CHAOS = 10_000.0  # about 40 Divine Orbs in 3.20: enough to buy one unit of the dear currencies
TOP_K = 5
CORRELATION_DAYS = 30
MIN_CORRELATION_DAYS = 10
MAX_CORRELATION = 0.7
MAX_WEIGHT = 0.25
KELLY_FRACTION = 0.25
MIN_PICK_CONFIDENCE = 0.25
MIN_PICK_LIQUIDITY = 0.3
SPREAD_SCALE = 0.25  # a typical poe.ninja buy/sell gap (median |ln(pay/receive)| of the dumps)
HISTORY_DAYS = 45
NO_CONFIDENT = "no confident opportunity"
# The feature columns the report reads (liquidity at the origin, return correlations, price history).
REPORT_FEATURE_COLUMNS = [
    "league", "currency", "date", "price_chaos", "is_imputed", "logret_1d", "good_confidence_share_7",
    "observed_share_7", "two_sided_share_7", "spread_log_abs_mean_7", "volume",
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
    "budget_chaos": pl.Float64,
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


def _trigger(advice: str, price: float, lower: float, upper: float) -> tuple[float, str]:
    up, down = upper / price - 1, lower / price - 1
    if advice == "buy":
        return lower, (f"edge gone if the price rises above {_fmt_price(lower)} ({lower / price - 1:+.1%}); "
                       f"sell above {_fmt_price(upper)} ({up:+.1%})")
    if advice == "sell":
        return upper, f"edge gone if the price falls below {_fmt_price(upper)} ({up:+.1%})"
    nearest = lower if abs(down) <= abs(up) else upper
    return nearest, (f"buy below {_fmt_price(lower)} ({down:+.1%}), sell above {_fmt_price(upper)} ({up:+.1%})")


def _allocation(rows: list[dict], z: float) -> list[float]:
    raw = []
    for r in rows:
        sigma = max(r["half_width_logret"] / z, 1e-6)
        raw.append(min(MAX_WEIGHT, max(0.0, KELLY_FRACTION * r["confidence"] * r["expected_logret"] / sigma**2)))
    total = sum(raw)
    return [f / total for f in raw] if total > 1.0 else raw


def build_report(
    predictions: pl.DataFrame,
    features: pl.DataFrame,
    budget_chaos: float = DEFAULT_BUDGET_CHAOS,
    top_k: int = TOP_K,
    generated_at: datetime | None = None,
) -> InvestmentReport:
    """Rank, pick and allocate from the predictions of one (league, origin); ``features`` are that league's rows."""
    if predictions.height == 0:
        raise ValueError("No predictions to report on: materialize `predictions` first")
    if budget_chaos <= 0:
        raise ValueError(f"budget {budget_chaos!r} chaos: the budget must be positive, e.g. 1000")
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
    correlations = return_correlations(league_rows, origin, currencies)
    corr = {(a, b): r for a, b, r, _ in correlations.iter_rows()}

    base = (
        predictions.join(liquidity, on="currency", how="left")
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
            if beats_down:
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
            flip, text = _trigger(r["advice"], r["current_price"], r["pred_lower"], r["pred_upper"])
            r["buy_below"], r["sell_above"] = r["pred_lower"], r["pred_upper"]
            r["flip_price"], r["flip_move"], r["trigger"] = flip, flip / r["current_price"] - 1, text
            r["allocation_fraction"], r["allocation_chaos"], r["units"] = 0.0, 0.0, 0
        for r, f in zip(picked, _allocation(picked, z), strict=True):
            units = math.floor(f * budget_chaos / r["current_price"])
            r["allocation_fraction"], r["units"] = f, units
            r["allocation_chaos"] = units * r["current_price"]
            if units == 0:
                r["note"] = "; ".join(x for x in (r["note"], (
                    f"one costs {_fmt_price(r['current_price'])} chaos, more than its share "
                    f"({f * budget_chaos:,.0f} chaos) of the budget: a larger budget could buy it")) if x)
        out += ranked

    for r in out:
        r["budget_chaos"] = budget_chaos
        r["generated_at"] = generated_at
    table = pl.DataFrame([{k: r.get(k) for k in REPORT_SCHEMA} for r in out], schema=REPORT_SCHEMA)
    report = InvestmentReport(league, origin, budget_chaos, level, table, correlations, generated_at)
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
    table: Path
    charts: dict[str, Path]


def report_table_path(lake: Lake, league: str, origin: date) -> Path:
    return hive_dir(lake.investment_report, league=league, origin_date=origin.isoformat()) / "part.parquet"


def report_dir(lake: Lake, origin: date) -> Path:
    return lake.reports / origin.isoformat()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _chart_currencies(report: InvestmentReport, n: int = 4) -> tuple[list[str], bool]:
    """The top picks (or, with none, the best-scored currencies) for the fan chart; True if they are picks."""
    picks = report.picks().sort("score", descending=True)
    names = list(dict.fromkeys(picks["currency"].to_list()))[:n]
    if names:
        return names, True
    ranked = report.table.sort("score", descending=True, nulls_last=True)["currency"].to_list()
    return list(dict.fromkeys(ranked))[:n], False


def fan_chart(report: InvestmentReport, features: pl.DataFrame, currencies: list[str], are_picks: bool) -> bytes:
    """Price history with the forecast fan (the interval at each horizon) for each currency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(currencies))
    cols = min(2, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 3.6 * rows), squeeze=False)
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
        ax.set_title(currency, fontsize=11)
        ax.set_ylabel("chaos")
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.grid(alpha=0.25)
    for ax in list(axes.flat)[len(currencies):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7, loc="best")
    title = "Top picks" if are_picks else "Best-ranked currencies (not recommendations: no confident opportunity)"
    fig.suptitle(f"{title}: {report.league}, forecasts from {origin}", fontsize=12)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def risk_return_chart(report: InvestmentReport) -> bytes:
    """Expected return against interval half-width per currency and horizon; above the diagonal beats the noise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5.6))
    t = report.table
    markers = {1: "o", 3: "s", 7: "^"}
    colors = {"buy": "#2b8a3e", "sell": "#c92a2a", "hold": "#868e96"}
    for (h, advice), g in t.group_by("horizon_days", "advice"):
        ax.scatter(
            (g["half_width_logret"] * 100).to_list(), (g["expected_logret"] * 100).to_list(),
            s=(20 + 180 * g["confidence"]).to_list(), marker=markers.get(int(h), "D"), c=colors.get(advice, "#333"),
            alpha=0.75, edgecolors="white", linewidths=0.5, label=f"{h}d {advice}",
        )
    xmax = float(max(t["half_width_logret"].max() * 100 * 1.1, 1.0))
    ax.plot([0, xmax], [0, xmax], color="#2b8a3e", lw=0.8, ls="--")
    ax.plot([0, xmax], [0, -xmax], color="#c92a2a", lw=0.8, ls="--")
    ax.axhline(0, color="#444", lw=0.6)
    for r in t.sort("score", descending=True, nulls_last=True).head(8).iter_rows(named=True):
        ax.annotate(f"{r['currency']} {r['horizon_days']}d", (r["half_width_logret"] * 100, r["expected_logret"] * 100),
                    fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel(f"noise: half-width of the {report.interval_level:.0%} interval (% log-price)")
    ax.set_ylabel("expected return (% log-price)")
    ax.set_title("Risk and return: only points outside the dashed wedge beat their noise", fontsize=11)
    ax.grid(alpha=0.25)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: labels[i])
    ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=7, ncol=3, loc="best",
              markerscale=0.6)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def _sections(report: InvestmentReport) -> list[tuple[str, pl.DataFrame, str]]:
    """(title, table, caption) blocks shared by the HTML and the Markdown."""
    blocks = []
    for h in report.horizons:
        rows = report.table.filter(pl.col("horizon_days") == h).sort("rank")
        view = rows.select(
            "rank", "currency", "advice", pl.col("current_price").alias("price"),
            pl.col("predicted_price").alias("forecast"),
            (pl.col("expected_return") * 100).round(2).alias("expected %"),
            (pl.col("downside_return") * 100).round(2).alias("downside %"),
            (pl.col("upside_return") * 100).round(2).alias("upside %"),
            pl.col("confidence").round(2), pl.col("liquidity_score").round(2).alias("liquidity"),
            pl.col("score").round(3), "units", pl.col("allocation_chaos").round(0).alias("allocate (chaos)"),
            pl.col("trigger"), pl.col("note"),
        )
        picks = rows.filter(pl.col("picked"))
        caption = (f"{picks.height} pick(s): " + ", ".join(picks["currency"]) if picks.height
                   else "No pick at this horizon: nothing beats its interval noise.")
        blocks.append((f"{h}-day horizon", view, caption))
    return blocks


def allocation_plan(report: InvestmentReport, horizon: int) -> str:
    """One line: what to buy at this horizon, in whole units, and the chaos kept ("" without picks)."""
    picks = report.picks(horizon)
    if picks.height == 0:
        return ""
    items = []
    for r in picks.iter_rows(named=True):
        share = r["allocation_fraction"] * report.budget_chaos
        if r["units"]:
            items.append(f"{r['currency']}: {r['units']:,} x {_fmt_price(r['current_price'])} = "
                         f"{r['allocation_chaos']:,.0f} chaos ({r['allocation_fraction']:.0%} of the budget)")
        else:
            items.append(f"{r['currency']}: none; one costs {_fmt_price(r['current_price'])} chaos, more than its "
                         f"{share:,.0f}-chaos share ({r['allocation_fraction']:.0%}) of this budget")
    kept = report.budget_chaos - float(picks["allocation_chaos"].sum())
    return "; ".join(items) + f". Keep {kept:,.0f} chaos."


def _model_quality(report: InvestmentReport) -> pl.DataFrame:
    return (
        report.table.select("currency", "horizon_days", "skill", "interval_method", "model_version")
        .sort("currency", "horizon_days")
        .rename({"horizon_days": "h", "skill": "validation skill vs no-change"})
    )


METHOD_TEXT = [
    "Forecasts are log-returns from an ensemble (LightGBM, XGBoost, RandomForest) shrunk towards 'no change'. "
    "On daily PoE prices, 'no change' is very hard to beat: most models here are barely better than it, and some "
    "are worse (see the skill column).",
    "Intervals are split-conformal from the models' out-of-fold errors, scaled by each currency's recent "
    "volatility. They are built to contain the realised price about as often as their level says, not more.",
    "A buy needs the whole interval above today's price. Allocation is a capped quarter-Kelly fraction "
    f"(at most {MAX_WEIGHT:.0%} per currency), scaled by confidence; the rest stays in chaos.",
    "Triggers assume the forecast's price levels hold. After a big move, re-run the forecast rather than trading "
    "on a stale trigger.",
    "This is not financial advice, and it is a game: prices react to patch notes and league events that no model "
    "sees coming.",
]


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
td:nth-child(2),td:nth-child(3),td:last-child,td:nth-last-child(2){text-align:left}tr.buy{background:#ebfbee}
tr.sell{background:#fff5f5}img{max-width:100%;border:1px solid #eee}.meta{color:#666;font-size:.9em}
"""


# autoescape: currency names and notes come from the data; nothing in them is markup
_TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("poe_pipeline", "templates"),
                                autoescape=jinja2.select_autoescape(["html", "j2"]), trim_blocks=True)


def render_html(report: InvestmentReport, charts: dict[str, bytes]) -> str:
    """The self-contained HTML report (templates/investment_report.html.j2), charts inline as base64 PNG."""
    plans = [(h, plan) for h in report.horizons if (plan := allocation_plan(report, h))] if report.picks().height \
        else []
    return _TEMPLATES.get_template("investment_report.html.j2").render(
        report=report, css=markupsafe.Markup(CSS), plans=plans,
        charts=[(name, base64.b64encode(data).decode()) for name, data in charts.items()],
        sections=[{"title": t, "table": table, "caption": c} for t, table, c in _sections(report)],
        quality=_model_quality(report), method=METHOD_TEXT, table=_html_table,
    )


def render_markdown(report: InvestmentReport, chart_files: dict[str, str]) -> str:
    lines = [
        f"# Investment report: {report.league}, {report.origin_date}",
        "",
        f"Prices in chaos as of {report.origin_date}. Budget {report.budget_chaos:,.0f} chaos. Intervals at "
        f"{report.interval_level:.0%}. Generated {report.generated_at:%Y-%m-%d %H:%M} UTC.",
        "",
        f"**{report.headline()}**",
        "",
        *[f"{n}\n" for n in report.notes],
    ]
    if report.picks().height:
        lines += ["## Suggested allocation", ""]
        lines += [f"- **{h}-day plan**: {plan}" for h in report.horizons if (plan := allocation_plan(report, h))]
        lines.append("")
    lines += ["## Charts", ""] + [f"![{name}]({file})" for name, file in chart_files.items()] + [""]
    for title, table, caption in _sections(report):
        lines += [f"## {title}", "", caption, "", markdown_table(table), ""]
    lines += ["## Model quality", "", markdown_table(_model_quality(report)), "", "## How to read this", ""]
    lines += [f"- {t}" for t in METHOD_TEXT] + [""]
    return "\n".join(lines)


def write_report(lake: Lake, report: InvestmentReport, features: pl.DataFrame) -> ReportFiles:
    """The HTML and Markdown reports with their charts, and the Parquet table, each written atomically."""
    directory = report_dir(lake, report.origin_date)
    stem = f"investment_report_{slug(report.league)}"
    names, are_picks = _chart_currencies(report)
    charts = {
        "forecast fan": fan_chart(report, features, names, are_picks),
        "risk and return": risk_return_chart(report),
    }
    chart_paths = {name: write_bytes_atomic(data, directory / f"{stem}_{slug(name)}.png")
                   for name, data in charts.items()}
    html_path = write_text_atomic(render_html(report, charts), directory / f"{stem}.html")
    md_path = write_text_atomic(render_markdown(report, {k: p.name for k, p in chart_paths.items()}),
                                directory / f"{stem}.md")
    table_path = write_parquet_atomic(report.table, report_table_path(lake, report.league, report.origin_date))
    return ReportFiles(directory, html_path, md_path, table_path, chart_paths)


def read_report_table(lake: Lake, league: str | None = None) -> pl.DataFrame:
    files = lake.parquet_files(lake.investment_report)
    if league is not None:
        files = [p for p in files if p.parent.parent.name == f"league={league}"]
    return pl.read_parquet(files, hive_partitioning=False) if files else pl.DataFrame(schema=REPORT_SCHEMA)


def latest_report(lake: Lake, league: str) -> InvestmentReport | None:
    """The stored report of the league's latest origin, rebuilt from its table (None before the first report)."""
    table = read_report_table(lake, league)
    if table.height == 0:
        return None
    table = table.filter(pl.col("origin_date") == table["origin_date"].max())
    first = table.row(0, named=True)
    return InvestmentReport(league, first["origin_date"], first["budget_chaos"], first["interval_level"], table,
                            pl.DataFrame(), first["generated_at"])


def report_summary(lake: Lake, league: str, top: int = 10) -> str:
    """A few lines for the command line: the headline, the top rows and where the reports are."""
    report = latest_report(lake, league)
    if report is None:
        return f"No investment report for {league} yet: materialize `investment_report`."
    stem = report_dir(lake, report.origin_date) / f"investment_report_{slug(league)}"
    lines = [f"Investment report for {league}, prices of {report.origin_date}:", report.headline(), ""]
    lines += [f"{h}-day plan: {plan}" for h in report.horizons if (plan := allocation_plan(report, h))]
    lines += ["", f"Top {top} by risk-adjusted score (advice 'hold' means no edge beyond the noise):",
              markdown_table(report.top(top)), "", f"Report: {stem}.html", f"         {stem}.md"]
    return "\n".join(lines)

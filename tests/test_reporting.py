"""The investment report on real Sanctum prices: honest refusals, diversified capped picks, triggers, files."""

from __future__ import annotations

import base64
import math
import re
from datetime import UTC, date, datetime
from functools import cache

import duckdb
import numpy as np
import polars as pl
import pytest

from conftest import SAMPLE
from poe_pipeline.features import build_features
from poe_pipeline.forecasting import PREDICTIONS_SCHEMA
from poe_pipeline.leagues import league_calendar
from poe_pipeline.prices import daily_from_dump_rows, merge_daily_prices
from poe_pipeline.reporting import (
    MAX_CORRELATION,
    MAX_WEIGHT,
    NO_CONFIDENT,
    REPORT_FEATURE_COLUMNS,
    build_report,
    report_summary,
    write_report,
)
from poe_pipeline.sources.poe_ninja import read_dump
from poe_pipeline.warehouse import sync_views

ORIGIN = date(2023, 4, 4)  # Sanctum's last day in the dump
CURRENCIES = ["Divine Orb", "Awakened Sextant", "Exalted Orb", "Orb of Annulment", "Chromatic Orb",
              "Orb of Alteration", "Vaal Orb", "Orb of Fusing"]
Z80 = 1.2815515655446004


@cache
def sanctum() -> pl.DataFrame:
    prices = merge_daily_prices(daily_from_dump_rows(read_dump(SAMPLE / "Sanctum.currency.csv.gz")))
    return build_features(prices, league_calendar(prices)).select(REPORT_FEATURE_COLUMNS + [
        "realized_vol_14", "trend_slope_14", "days_since_observed", "target_logret_7d"])


def predictions(expected: dict[str, float], width: dict[str, float] | float | None = None,
                origin: date = ORIGIN, horizons=(1, 3, 7), confidence: float = 0.6) -> pl.DataFrame:
    """Prediction rows at real prices and volatilities; ``expected`` log-returns per currency (all horizons).

    ``width`` is the interval half-width in log-price; by default a normal 80 % interval from the real volatility.
    """
    at = sanctum().filter(pl.col("date") == origin)
    rows = []
    for r in at.filter(pl.col("currency").is_in(list(expected))).iter_rows(named=True):
        vol = math.hypot(r["realized_vol_14"] or 0.0, r["trend_slope_14"] or 0.0)
        for h in horizons:
            m = expected[r["currency"]]
            w = (width.get(r["currency"]) if isinstance(width, dict) else width) or Z80 * vol * math.sqrt(h)
            p = r["price_chaos"]
            rows.append({
                "league": "Sanctum", "currency": r["currency"], "origin_date": origin, "horizon_days": h,
                "current_price": p, "predicted_price": p * math.exp(m), "pred_lower": p * math.exp(m - w),
                "pred_upper": p * math.exp(m + w), "interval_level": 0.8, "confidence": confidence,
                "model_version": "1", "model_name": f"poe-{h}d", "predicted_logret": m, "lower_logret": m - w,
                "upper_logret": m + w, "interval_method": "conformal", "residual_count": 150, "skill": 0.05,
                "r2": 0.02, "daily_volatility": vol, "days_since_observed": r["days_since_observed"],
                "created_at": datetime(2023, 4, 4, tzinfo=UTC),
            })
    return pl.DataFrame(rows, schema=PREDICTIONS_SCHEMA)


def test_no_confident_opportunity_means_no_picks(lake):
    # what the models mostly say on daily PoE prices: almost no change, inside an honest interval
    preds = predictions({c: 0.002 for c in CURRENCIES})
    report = build_report(preds, sanctum(), budget_chaos=1000)
    assert not report.confident
    assert report.picks().height == 0 and report.table["allocation_chaos"].sum() == 0
    assert set(report.table["advice"]) == {"hold"} and not report.table["picked"].any()
    assert NO_CONFIDENT in report.headline().lower()
    # it still ranks everything, per horizon
    assert report.table.height == len(CURRENCIES) * 3
    for h in (1, 3, 7):
        assert sorted(report.table.filter(pl.col("horizon_days") == h)["rank"]) == list(range(1, 9))
    files = write_report(lake, report, sanctum())
    assert NO_CONFIDENT in files.html.read_text().lower() and NO_CONFIDENT in files.markdown.read_text().lower()
    assert "Suggested allocation" not in files.html.read_text()


def test_a_forecast_inside_its_noise_is_never_a_buy():
    # +3 % expected, but the interval is +-4 %: the lower bound is below today's price
    report = build_report(predictions({"Divine Orb": 0.03}, width=0.04), sanctum())
    assert not report.confident and report.table["advice"].unique().to_list() == ["hold"]
    # the same forecast with a +-2 % interval beats its noise
    report = build_report(predictions({"Divine Orb": 0.03}, width=0.02), sanctum())
    assert report.confident and report.picks().height == 3


def _real_correlation(a: str, b: str) -> float:
    rows = sanctum().filter(pl.col("date") > date(2023, 3, 5), ~pl.col("is_imputed"))
    wide = rows.pivot(on="currency", index="date", values="logret_1d").select(a, b).drop_nulls()
    return float(np.corrcoef(wide[a].to_numpy(), wide[b].to_numpy())[0, 1])


def test_picks_are_diversified_and_capped(lake):
    assert _real_correlation("Divine Orb", "Awakened Sextant") > MAX_CORRELATION  # they moved together
    assert abs(_real_correlation("Divine Orb", "Exalted Orb")) < MAX_CORRELATION
    expected = {"Divine Orb": 0.12, "Awakened Sextant": 0.10, "Exalted Orb": 0.08, "Orb of Annulment": -0.15,
                "Vaal Orb": 0.001}
    report = build_report(predictions(expected, width=0.03), sanctum(), budget_chaos=5000, top_k=5)
    for h in (1, 3, 7):
        picks = report.picks(h)
        assert set(picks["currency"]) == {"Divine Orb", "Exalted Orb"}  # the sextant moves with the Divine Orb
        sextant = report.table.filter((pl.col("currency") == "Awakened Sextant") & (pl.col("horizon_days") == h))
        assert sextant["advice"].item() == "buy" and not sextant["picked"].item()
        assert "moves with Divine Orb" in sextant["note"].item()
        assert (picks["allocation_fraction"] <= MAX_WEIGHT + 1e-12).all()
        assert (picks["allocation_chaos"] <= picks["allocation_fraction"] * 5000 + 1e-9).all()
        assert (picks["allocation_chaos"] == picks["units"] * picks["current_price"]).all()
        assert picks["allocation_chaos"].sum() <= 5000
        assert (picks["pred_lower"] > picks["current_price"]).all()
        annul = report.table.filter((pl.col("currency") == "Orb of Annulment") & (pl.col("horizon_days") == h))
        assert annul["advice"].item() == "sell"
    divine = report.picks(7).filter(pl.col("currency") == "Divine Orb")
    assert 100 < divine["current_price"].item() < 300  # a Divine Orb costs 100-300 chaos in Sanctum
    assert "Divine Orb" in report.headline() and "sell if you hold: Orb of Annulment" in report.headline()


def test_an_illiquid_currency_ranks_below_a_liquid_one_with_the_same_forecast():
    at = sanctum().filter(pl.col("date") == ORIGIN)
    ranked = at.sort("good_confidence_share_7", "two_sided_share_7")
    illiquid = ranked.filter(pl.col("realized_vol_14") > 0)["currency"][0]
    report = build_report(predictions({"Divine Orb": 0.05, illiquid: 0.05}, width=0.03), sanctum())
    t = report.table.filter(pl.col("horizon_days") == 1)
    liq = dict(zip(t["currency"], t["liquidity_score"], strict=True))
    assert liq[illiquid] < liq["Divine Orb"]
    risk = dict(zip(t["currency"], t["risk_adjusted_score"], strict=True))
    score = dict(zip(t["currency"], t["score"], strict=True))
    assert score[illiquid] / risk[illiquid] < score["Divine Orb"] / risk["Divine Orb"]


def test_rebalancing_triggers_flip_the_advice():
    expected = {"Divine Orb": 0.06, "Exalted Orb": 0.0}
    report = build_report(predictions(expected, width=0.03), sanctum())
    for r in report.table.filter(pl.col("horizon_days") == 7).iter_rows(named=True):
        assert r["buy_below"] == r["pred_lower"] and r["sell_above"] == r["pred_upper"]
        # move today's price just past the trigger, keep the forecast's levels, and rebuild the advice
        moved = r["flip_price"] * (1.001 if r["flip_price"] > r["current_price"] else 0.999)
        preds = predictions(expected, width=0.03).filter(
            (pl.col("currency") == r["currency"]) & (pl.col("horizon_days") == 7)
        ).with_columns(pl.lit(moved).alias("current_price"))
        after = build_report(preds, sanctum()).table.row(0, named=True)
        assert after["advice"] != r["advice"], (r["currency"], r["advice"], r["trigger"])
    buy = report.table.filter((pl.col("currency") == "Divine Orb") & (pl.col("horizon_days") == 7)).row(0, named=True)
    assert buy["advice"] == "buy" and buy["flip_price"] > buy["current_price"]
    assert "edge gone if the price rises above" in buy["trigger"]


def test_report_files_are_self_contained_and_the_table_is_in_duckdb(lake):
    expected = {"Divine Orb": 0.05, "Exalted Orb": 0.04, "Orb of Fusing": -0.001}
    report = build_report(predictions(expected, width=0.02), sanctum(), budget_chaos=2000)
    files = write_report(lake, report, sanctum())
    assert files.directory == lake.reports / "2023-04-04"
    page = files.html.read_text()
    images = re.findall(r"src=[\"']data:image/png;base64,([^\"']+)[\"']", page)
    assert len(images) == 2 and all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert not re.search(r"(src|href)=['\"]?https?:", page)  # nothing to fetch: it opens offline
    assert "Divine Orb" in page and "Suggested allocation" in page
    md = files.markdown.read_text()
    for name in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):
        assert (files.directory / name).read_bytes()[:4] == b"\x89PNG"
    sync_views(lake)
    with duckdb.connect(str(lake.warehouse), read_only=True) as con:
        rows = con.execute("SELECT currency, horizon_days, advice, picked, allocation_chaos FROM investment_report "
                           "WHERE picked ORDER BY horizon_days, currency").fetchall()
    assert rows and {r[0] for r in rows} == {"Divine Orb", "Exalted Orb"}
    assert all(r[2] == "buy" and r[4] <= MAX_WEIGHT * 2000 for r in rows)
    summary = report_summary(lake, "Sanctum")  # what the command line prints, read back from the table
    assert report.headline() in summary and str(files.html) in summary and "Divine Orb" in summary


def test_bad_inputs_name_the_fix():
    with pytest.raises(ValueError, match="materialize `predictions` first"):
        build_report(pl.DataFrame(schema=PREDICTIONS_SCHEMA), sanctum())
    with pytest.raises(ValueError, match="budget must be positive"):
        build_report(predictions({"Divine Orb": 0.0}), sanctum(), budget_chaos=0)
    two = pl.concat([predictions({"Divine Orb": 0.0}), predictions({"Divine Orb": 0.0}, origin=date(2023, 3, 1))])
    with pytest.raises(ValueError, match="pass one league and origin"):
        build_report(two, sanctum())

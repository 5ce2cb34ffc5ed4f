"""The investment report on real Sanctum prices: honest refusals, diversified capped picks that the budget can buy,
chaos and divines, trust in words, triggers, files (HTML, Markdown, CSV, Parquet) and a readable risk chart."""

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
from matplotlib.text import Text
from polars.testing import assert_frame_equal

from conftest import SAMPLE
from poe_pipeline.features import build_features
from poe_pipeline.forecasting import FORECAST_GAPS_SCHEMA, LEFT_OUT_OF_RUN, PREDICTIONS_SCHEMA, write_forecast_gaps
from poe_pipeline.leagues import league_calendar
from poe_pipeline.prices import daily_from_dump_rows, merge_daily_prices
from poe_pipeline.reporting import (
    MAX_CORRELATION,
    MAX_WEIGHT,
    NO_CONFIDENT,
    REPORT_FEATURE_COLUMNS,
    REPORT_SCHEMA,
    allocation_plan,
    build_report,
    render_markdown,
    report_summary,
    risk_return_figure,
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
    # the table as CSV beside the HTML and the Markdown, the same rows and values as the Parquet table
    assert files.csv == files.directory / "investment_report_sanctum.csv" == files.html.with_suffix(".csv")
    assert_frame_equal(pl.read_csv(files.csv, schema=REPORT_SCHEMA), report.table)
    assert_frame_equal(pl.read_csv(files.csv, schema=REPORT_SCHEMA), pl.read_parquet(files.table))
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
    assert str(files.csv) in summary


def test_bad_inputs_name_the_fix():
    with pytest.raises(ValueError, match="materialize `predictions` first"):
        build_report(pl.DataFrame(schema=PREDICTIONS_SCHEMA), sanctum())
    with pytest.raises(ValueError, match="budget must be positive"):
        build_report(predictions({"Divine Orb": 0.0}), sanctum(), budget_chaos=0)
    with pytest.raises(ValueError, match=r"per-pick cap must be a fraction in \(0, 1\], e.g. 0.25"):
        build_report(predictions({"Divine Orb": 0.0}), sanctum(), max_weight=1.5)
    two = pl.concat([predictions({"Divine Orb": 0.0}), predictions({"Divine Orb": 0.0}, origin=date(2023, 3, 1))])
    with pytest.raises(ValueError, match="pass one league and origin"):
        build_report(two, sanctum())


# --- allocation that uses the budget ----------------------------------------------------------------------------

MIRROR_SHARD_PRICE = 6720.0  # one Mirror Shard in Sanctum on its last day, in chaos


def test_a_pick_the_budget_cannot_buy_gets_nothing_and_its_share_goes_to_the_next_picks():
    # five diversified buys, each at the 25 % cap: 125 % in all, so each gets 20 % of the budget
    expected = {"Mirror Shard": 0.08, "Divine Orb": 0.07, "Exalted Orb": 0.06, "Orb of Fusing": 0.05, "Vaal Orb": 0.04}
    preds = predictions(expected, width=0.02, horizons=(7,))
    assert sanctum().filter((pl.col("date") == ORIGIN) & (pl.col("currency") == "Mirror Shard"))[
        "price_chaos"].item() == MIRROR_SHARD_PRICE
    rich = build_report(preds, sanctum(), budget_chaos=40_000).picks()
    assert rich.height == 5 and rich["allocation_fraction"].to_list() == pytest.approx([0.2] * 5)
    assert rich.filter(pl.col("currency") == "Mirror Shard")["units"].item() == 1  # 8,000 chaos buys one

    # 20 % of 10,000 chaos cannot buy one shard: it gets nothing, and the four others share its 20 %
    report = build_report(preds, sanctum(), budget_chaos=10_000)
    picks = report.picks()
    assert set(picks["currency"]) == set(expected)  # still a confident buy, for a richer player
    shard = picks.filter(pl.col("currency") == "Mirror Shard").row(0, named=True)
    assert shard["units"] == 0 and shard["allocation_chaos"] == 0 and shard["allocation_fraction"] == 0
    assert shard["allocation_divines"] == 0
    assert "one unit costs 6,720 chaos (28.0 div), more than its share of 2,000 chaos" in shard["note"]
    assert "a budget of 33,600 chaos (140 div) would buy one" in shard["note"]  # 6,720 / 20 %
    others = picks.filter(pl.col("currency") != "Mirror Shard")
    assert others["allocation_fraction"].to_list() == pytest.approx([MAX_WEIGHT] * 4)  # 20 % + 20 % / 4 each
    assert others["allocation_fraction"].sum() == pytest.approx(rich["allocation_fraction"].sum())
    assert (others["units"] >= 1).all()
    assert (others["allocation_chaos"] > 0.2 * 10_000).all()  # more than their own 20 % would buy
    plan = allocation_plan(report, 7)
    assert plan.startswith("Mirror Shard: none, since one unit costs 6,720 chaos")
    kept = 10_000 - others["allocation_chaos"].sum()
    assert 100 < kept < 240 and plan.endswith(f"Keep {kept:,.1f} chaos ({kept / 240:.2g} div).")  # whole units


def test_the_number_one_buy_too_dear_for_its_share_says_what_it_needs():
    # what a player saw after the demo: a Mirror Shard buy and a Divine Orb buy, the default 10,000-chaos budget
    report = build_report(predictions({"Mirror Shard": 0.08, "Divine Orb": 0.05}, width=0.02), sanctum())
    for h in (1, 3, 7):
        shard = report.picks(h).filter(pl.col("currency") == "Mirror Shard").row(0, named=True)
        assert shard["rank"] == 1 and shard["units"] == 0
        assert ("one unit costs 6,720 chaos (28.0 div), more than its share of 2,500 chaos (10.4 div), 25% of the "
                "budget: a budget of 26,880 chaos (112 div) would buy one") in shard["note"]
        divine = report.picks(h).filter(pl.col("currency") == "Divine Orb").row(0, named=True)
        assert divine["units"] == 10 and divine["allocation_chaos"] == 2400  # 25 % of 10,000 at 240 chaos
    assert "Keep 7,600 chaos (31.7 div)." in allocation_plan(report, 7)


@pytest.mark.parametrize("budget", [300.0, 2_000.0, 10_000.0, 40_000.0, 500_000.0])
def test_every_funded_pick_buys_at_least_one_whole_unit(budget):
    expected = {"Mirror Shard": 0.08, "Divine Orb": 0.07, "Exalted Orb": 0.06, "Orb of Fusing": 0.05, "Vaal Orb": 0.04,
                "Chromatic Orb": 0.045}
    report = build_report(predictions(expected, width=0.02), sanctum(), budget_chaos=budget)
    picks = report.picks()
    assert picks.height == 15
    assert ((picks["allocation_fraction"] > 0) == (picks["units"] >= 1)).all()
    assert (picks["allocation_chaos"] == picks["units"] * picks["current_price"]).all()
    assert (picks["allocation_chaos"] <= picks["allocation_fraction"] * budget + 1e-9).all()
    assert (picks["allocation_fraction"] <= MAX_WEIGHT + 1e-12).all()
    for h in (1, 3, 7):
        assert report.picks(h)["allocation_chaos"].sum() <= budget
    unfunded = picks.filter(pl.col("units") == 0)
    assert unfunded["note"].str.contains("would buy one").all()
    assert (unfunded["current_price"] > MAX_WEIGHT * budget).all() or budget < 1_000  # dear, or a tiny budget
    # a lower cap is a setting too
    capped = build_report(predictions(expected, width=0.02), sanctum(), budget_chaos=budget, max_weight=0.1)
    assert (capped.picks()["allocation_fraction"] <= 0.1 + 1e-12).all()
    assert capped.table["max_weight"].unique().to_list() == [0.1]


# --- chaos and divines ------------------------------------------------------------------------------------------


def _divine_on(day: date) -> float:
    return sanctum().filter((pl.col("currency") == "Divine Orb") & (pl.col("date") == day))["price_chaos"].item()


def test_every_price_and_allocation_is_also_in_divines(lake):
    report = build_report(predictions({"Divine Orb": 0.05, "Exalted Orb": 0.04, "Orb of Fusing": -0.001},
                                      width=0.02), sanctum(), budget_chaos=2000)
    t = report.table
    divine = _divine_on(ORIGIN)
    assert 100 < divine < 300 and report.divine_price_chaos == divine and report.divine_price_date == ORIGIN
    assert t["divine_price_chaos"].unique().to_list() == [divine]
    assert t["divine_price_date"].unique().to_list() == [ORIGIN]
    assert t["allocation_chaos"].sum() > 0
    for chaos in ("current_price", "predicted_price", "pred_lower", "pred_upper"):
        assert (t[f"{chaos}_divines"] * t["divine_price_chaos"] - t[chaos]).abs().max() < 1e-9
    assert (t["allocation_divines"] * t["divine_price_chaos"] - t["allocation_chaos"]).abs().max() < 1e-9
    assert t.filter(pl.col("currency") == "Divine Orb")["current_price_divines"].to_list() == pytest.approx([1.0] * 3)
    files = write_report(lake, report, sanctum())
    page, md = files.html.read_text(), files.markdown.read_text()
    for text in (page, md):
        assert f"1 Divine Orb = {divine:,.1f} chaos" in text and "Budget 2,000 chaos (8.33 div)" in text
        for column in ("price (div)", "forecast (div)", "allocate (div)"):
            assert column in text
    divine_pick = report.picks(7).filter(pl.col("currency") == "Divine Orb").row(0, named=True)
    assert 100 <= divine_pick["allocation_chaos"] < 1000
    assert (f"Divine Orb: {divine_pick['units']} x {divine:,.1f} chaos (1.00 div) = "
            f"{divine_pick['allocation_chaos']:,.1f} chaos ({divine_pick['allocation_divines']:.2f} div)") in md


def test_without_a_divine_price_that_day_the_last_one_is_used_and_said():
    day_before = date(2023, 4, 3)
    without_today = sanctum().filter(~((pl.col("currency") == "Divine Orb") & (pl.col("date") == ORIGIN)))
    report = build_report(predictions({"Exalted Orb": 0.04}, width=0.02), without_today)
    assert report.divine_price_chaos == _divine_on(day_before) != _divine_on(ORIGIN)
    assert report.table["divine_price_date"].unique().to_list() == [day_before]
    assert any("No Divine Orb price observed on 2023-04-04" in n and "on 2023-04-03" in n for n in report.notes)
    assert "(price of 2023-04-03)" in render_markdown(report, {})

    no_divine = sanctum().filter(pl.col("currency") != "Divine Orb")
    report = build_report(predictions({"Exalted Orb": 0.04}, width=0.02), no_divine)
    assert report.divine_price_chaos is None and report.picks().height == 3
    for column in ("divine_price_chaos", "current_price_divines", "allocation_divines"):
        assert report.table[column].null_count() == report.table.height
    assert any("chaos only" in n for n in report.notes)
    md = render_markdown(report, {})
    assert " div" not in md and "(div)" not in md and "allocate (chaos)" in md


# --- trust, stated ----------------------------------------------------------------------------------------------


def test_each_row_says_how_far_its_model_beat_no_change():
    skills = {"Divine Orb": 0.05, "Exalted Orb": -0.56, "Orb of Fusing": None, "Vaal Orb": 0.004}
    preds = predictions({"Divine Orb": 0.05, "Exalted Orb": 0.04, "Orb of Fusing": 0.0, "Vaal Orb": 0.0},
                        width=0.02).with_columns(pl.col("currency").replace_strict(skills, default=None,
                                                                                     return_dtype=pl.Float64)
                                                 .alias("skill"))
    report = build_report(preds, sanctum())
    trust = dict(zip(report.table["currency"], report.table["trust"], strict=False))
    assert trust["Divine Orb"] == "beats 'no change' by 5% out of sample"
    assert trust["Exalted Orb"] == "no better than 'no change' out of sample (skill -0.56): treat as noise"
    assert trust["Orb of Fusing"] == "no out-of-sample skill on record: treat as noise"
    assert trust["Vaal Orb"].startswith("barely beats 'no change'")
    assert report.table["trust"].null_count() == 0
    plan = allocation_plan(report, 7)  # a pick from a model without skill carries its warning into the plan
    assert "Exalted Orb" in plan and "[model no better than 'no change'" in plan
    assert "Divine Orb: " in plan and plan.count("treat as noise") == 1
    assert "| trust" in render_markdown(report, {})


# --- the risk-and-return chart ----------------------------------------------------------------------------------


def test_the_risk_chart_labels_do_not_overlap_and_its_y_axis_fits_the_data():
    # two buys with the same interval width: six labels on top of each other without the stagger; one wide hold
    # (+-30 %) that used to stretch the y axis to +-33 %
    preds = predictions({"Divine Orb": 0.05, "Exalted Orb": 0.045, "Orb of Fusing": 0.0, "Orb of Annulment": -0.1},
                        width={"Divine Orb": 0.02, "Exalted Orb": 0.02, "Orb of Fusing": 0.3,
                               "Orb of Annulment": 0.02})
    report = build_report(preds, sanctum())
    fig = risk_return_figure(report)
    try:
        ax = fig.axes[0]
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        boxes = {t.get_text(): Text.get_window_extent(t, renderer) for t in ax.texts}  # the text, not its leader
        assert set(boxes) == {f"{c} {h}d" for c in ("Divine Orb", "Exalted Orb", "Orb of Annulment")
                              for h in (1, 3, 7)}  # the picks and the sells, and nothing else
        names = sorted(boxes)
        overlaps = [(a, b) for i, a in enumerate(names) for b in names[i + 1:] if boxes[a].overlaps(boxes[b])]
        assert not overlaps
        lo, hi = ax.get_ylim()
        y = report.table["expected_logret"] * 100
        assert lo < y.min() and hi > y.max()
        assert -20 < lo and hi < 10  # the data span -10 % .. +5 %, with a margin
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_the_fan_chart_has_a_panel_for_every_currency_the_report_shows():
    from poe_pipeline.reporting import CHART_MAX_CURRENCIES, _chart_currencies

    expected = {"Divine Orb": 0.05, "Exalted Orb": 0.04, "Orb of Fusing": -0.001, "Chromatic Orb": 0.0}
    report = build_report(predictions(expected, width=0.02), sanctum(), budget_chaos=2000)
    names, are_picks = _chart_currencies(report)
    assert sorted(names) == sorted(expected) and are_picks == (report.picks().height > 0)
    picked = list(dict.fromkeys(report.picks().sort("score", descending=True)["currency"]))
    assert picked and names[: len(picked)] == picked  # picks first
    assert len(_chart_currencies(report, n=2)[0]) == 2 and CHART_MAX_CURRENCIES >= 15  # the demo's 15 all shown


def test_a_price_far_off_its_week_is_a_suspect_quote_and_no_buy():
    # real Sanctum data: on 2023-02-06 poe.ninja quoted the Sacred Orb at 0.17 c, between days at 50-60 c
    glitch_day = date(2023, 2, 6)
    sacred = sanctum().filter((pl.col("currency") == "Sacred Orb") & (pl.col("date") == glitch_day)).row(0, named=True)
    assert sacred["price_chaos"] < 0.2 and 40 < math.exp(sacred["log_price_roll_median_7"]) < 70
    # a forecast of the reversion whose whole interval lies above that price; the Divine Orb's forecast is sane
    preds = predictions({"Sacred Orb": 5.0, "Divine Orb": 0.06}, width={"Sacred Orb": 0.5, "Divine Orb": 0.03},
                        origin=glitch_day)
    report = build_report(preds, sanctum())
    for r in report.table.iter_rows(named=True):
        if r["currency"] == "Sacred Orb":
            assert r["pred_lower"] > r["current_price"]  # the interval alone would make it a buy
            assert r["advice"] == "hold" and not r["picked"]
            assert "would be a buy" in r["note"] and "below its 7-day median" in r["note"]
        else:
            assert r["advice"] == "buy" and r["picked"]
    assert "Sacred Orb" not in report.headline()


def test_the_report_lists_the_liquid_currencies_it_has_no_forecast_for_and_why(lake):
    preds = predictions({"Divine Orb": 0.0})
    gaps = pl.DataFrame({
        "league": "Sanctum", "origin_date": ORIGIN, "currency": ["Orb of Alteration"] * 3 + ["Vaal Orb"],
        "horizon_days": [1, 3, 7, 7], "liquidity_rank": [2, 2, 2, 9],
        "reason": [LEFT_OUT_OF_RUN] * 3 + ["champion poe-vaal-orb-7d failed to load: truncated"],
    }, schema=FORECAST_GAPS_SCHEMA)
    write_forecast_gaps(lake, gaps, "Sanctum", ORIGIN)
    files = write_report(lake, build_report(preds, sanctum(), gaps=gaps), sanctum())
    md, page = files.markdown.read_text(), files.html.read_text()
    section = md.split("## Not forecast")[1].split("## Model quality")[0]
    assert "2 of the league's 30 most liquid currencies lack a forecast" in section
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("|")]
    assert rows[0] == ["liquidity rank", "currency", "horizons (days)", "reason"]
    assert rows[2:] == [["2", "Orb of Alteration", "1, 3, 7", LEFT_OUT_OF_RUN],
                        ["9", "Vaal Orb", "7", "champion poe-vaal-orb-7d failed to load: truncated"]]
    assert "<h2>Not forecast</h2>" in page and "Orb of Alteration" in page
    assert "Not forecast: 2 currencies" in report_summary(lake, "Sanctum")  # the command line's lines too
    complete = write_report(lake, build_report(preds, sanctum(), gaps=gaps.clear()), sanctum())
    assert "has a forecast at every horizon" in complete.markdown.read_text()
    unknown = write_report(lake, build_report(preds, sanctum()), sanctum())  # an origin from before the view
    assert "Not forecast" not in unknown.markdown.read_text()

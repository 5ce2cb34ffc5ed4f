"""The track record: past advice scored against the prices that came true, and past plans against chaos and the
basket. The rules on small frames first, then the demo as a user runs it: its warehouse and its report in Chromium."""

from __future__ import annotations

import re
from datetime import date, timedelta

import duckdb
import polars as pl
import pytest

from poe_pipeline import track_record as tr
from poe_pipeline.reporting import REPORT_SCHEMA

D0 = date(2023, 3, 1)


def _advice(rows: list[dict]) -> pl.DataFrame:
    base = {c: None for c in REPORT_SCHEMA}
    frame = pl.DataFrame([{**base, "league": "Sanctum", "source": "backtest", "picked": False,
                           "allocation_fraction": 0.0, **r} for r in rows],
                         schema={**REPORT_SCHEMA, "source": pl.Utf8})
    return frame.with_columns(pl.col("current_price").alias("current_price"))


def _prices(rows: list[tuple[str, date, float]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={"currency": pl.Utf8, "date": pl.Date, "price_chaos": pl.Float64},
                        orient="row").with_columns(pl.lit("Sanctum").alias("league"))


def _row(currency, advice, price, pred=None, lo=None, hi=None, h=1, origin=D0, **kw):
    pred = pred if pred is not None else price
    return {"currency": currency, "advice": advice, "current_price": price, "predicted_price": pred,
            "pred_lower": lo if lo is not None else pred * 0.9, "pred_upper": hi if hi is not None else pred * 1.1,
            "horizon_days": h, "origin_date": origin, **kw}


def test_each_advice_is_right_or_wrong_by_its_own_rule():
    advice = _advice([
        _row("Rose", "buy", 10.0, pred=11.0, lo=10.5, hi=11.5, picked=True, allocation_fraction=0.25),
        _row("Fell", "sell", 10.0, pred=9.0, lo=8.5, hi=9.5),
        _row("Calm", "hold", 10.0, lo=9.0, hi=11.0),
        _row("Wild", "hold", 10.0, lo=9.0, hi=11.0),
    ])
    prices = _prices([("Rose", D0 + timedelta(days=1), 12.0), ("Fell", D0 + timedelta(days=1), 9.0),
                      ("Calm", D0 + timedelta(days=1), 10.2), ("Wild", D0 + timedelta(days=1), 13.0)])
    out = {r["currency"]: r for r in tr.score_advice(advice, prices).iter_rows(named=True)}
    assert out["Rose"]["advice_right"] and out["Rose"]["realized_return"] == pytest.approx(0.2)
    assert out["Fell"]["advice_right"] and out["Fell"]["realized_return"] == pytest.approx(-0.1)
    assert out["Calm"]["advice_right"]  # stayed inside its interval
    assert not out["Wild"]["advice_right"]  # moved 30 %: holding missed it
    assert out["Rose"]["beat_no_change"]  # |ln(12/11)| < |ln(12/10)|
    assert not out["Wild"]["beat_no_change"] and out["Wild"]["no_change_abs_log_error"] == pytest.approx(
        abs(__import__("math").log(1.3)))
    assert {r["status"] for r in out.values()} == {"scored"}


def test_pending_and_not_observed_are_told_apart():
    advice = _advice([_row("Gap", "hold", 10.0, h=1), _row("Late", "hold", 10.0, h=7)])
    prices = _prices([("Gap", D0, 10.0), ("Gap", D0 + timedelta(days=3), 10.0)])  # day 1 missing, day 7 ahead
    out = {r["currency"]: r for r in tr.score_advice(advice, prices).iter_rows(named=True)}
    assert out["Gap"]["status"] == "not observed" and out["Gap"]["advice_right"] is None
    assert out["Late"]["status"] == "pending" and out["Late"]["price_at_horizon"] is None


def test_a_plan_returns_its_allocation_weighted_moves_against_chaos_and_the_basket():
    day = D0 + timedelta(days=1)
    advice = _advice([
        _row("A", "buy", 10.0, pred=11.0, lo=10.5, hi=11.6, picked=True, allocation_fraction=0.25),
        _row("B", "buy", 20.0, pred=22.0, lo=21.0, hi=23.0, picked=True, allocation_fraction=0.10),
        _row("C", "hold", 5.0),
    ])
    prices = _prices([("A", day, 11.0), ("B", day, 19.0), ("C", day, 5.5)])
    (plan,) = tr.plan_outcomes(tr.score_advice(advice, prices)).iter_rows(named=True)
    assert plan["status"] == "scored" and plan["invested_fraction"] == pytest.approx(0.35)
    assert plan["plan_return"] == pytest.approx(0.25 * 0.10 + 0.10 * -0.05)
    assert plan["basket_return"] == pytest.approx((0.10 - 0.05 + 0.10) / 3)
    assert plan["chaos_return"] == 0.0 and plan["picks"] == "A 25%, B 10%"


def test_a_plan_with_an_unpriced_pick_is_not_scored():
    advice = _advice([_row("A", "buy", 10.0, pred=11.0, lo=10.5, hi=11.6, picked=True, allocation_fraction=0.25),
                      _row("C", "hold", 5.0)])
    prices = _prices([("C", D0 + timedelta(days=1), 5.5), ("C", D0 + timedelta(days=5), 5.5)])
    (plan,) = tr.plan_outcomes(tr.score_advice(advice, prices)).iter_rows(named=True)
    assert plan["status"] == "not observed" and plan["plan_return"] is None


def test_cumulative_returns_chain_plans_without_overlap():
    rows = []
    prices = []
    for i in range(10):  # a daily 3-day plan, all in one currency that gains 1 % over each 3 days
        origin = D0 + timedelta(days=i)
        rows.append(_row("A", "buy", 10.0, pred=11.0, lo=10.5, hi=11.5, h=3, origin=origin, picked=True,
                         allocation_fraction=0.5))
        prices.append(("A", origin + timedelta(days=3), 10.1))
    plans = tr.plan_outcomes(tr.score_advice(_advice(rows), _prices(prices)))
    chain = tr.cumulative_returns(plans, 3)
    assert chain["origin_date"].to_list() == [D0 + timedelta(days=i) for i in (0, 3, 6, 9)]
    assert chain["cumulative_plan_return"][-1] == pytest.approx(1.005 ** 4 - 1)
    assert chain["cumulative_basket_return"][-1] == pytest.approx(1.01 ** 4 - 1)


def test_live_advice_wins_over_the_replay_of_the_same_day(lake):
    from poe_pipeline.lake import write_parquet_atomic
    from poe_pipeline.reporting import report_table_path

    replay = _advice([_row("A", "hold", 10.0), _row("B", "hold", 10.0)]).drop("source")
    live = _advice([_row("A", "sell", 10.0, pred=9.0, lo=8.5, hi=9.5)]).drop("source")
    write_parquet_atomic(replay, tr.backfill_path(lake, "Sanctum"))
    write_parquet_atomic(live, report_table_path(lake, "Sanctum", D0))
    advice = {r["currency"]: r for r in tr.league_advice(lake, "Sanctum").iter_rows(named=True)}
    assert (advice["A"]["source"], advice["A"]["advice"]) == ("live", "sell")
    assert advice["B"]["source"] == "backtest"


def test_backfill_origins_skip_covered_days_and_the_first_league_week():
    days = [D0 + timedelta(days=i) for i in range(30)]
    prices = _prices([("A", d, 1.0) for d in days])
    got = tr.backfill_origins(prices, "Sanctum", D0 + timedelta(days=10), 14, covered={D0 + timedelta(days=8)})
    assert got == [D0 + timedelta(days=7), D0 + timedelta(days=9)]  # league day 7 on, before the 10th, not the 8th


# --- the demo, as a user runs it ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_advice_outcomes_match_daily_prices_by_hand(demo_lake):
    root, currencies = demo_lake.root, demo_lake.currencies
    assert "How did past advice do? Scored:" in demo_lake.stdout  # the run's summary shows the track record too
    # ... with the same numbers as the report: both count what had come true by the latest forecast
    (report,) = root.glob("reports/*/investment_report_sanctum.md")
    one_day = re.search(r"^\| 1d .*$", report.read_text().split("## How did past advice do?")[1], re.M).group(0)
    assert one_day in demo_lake.stdout
    with duckdb.connect(str(root / "warehouse.duckdb"), read_only=True) as con:
        rows = con.sql("SELECT * FROM advice_outcomes").pl()
        assert rows.filter(pl.col("status") == "scored").height > 0
        assert set(rows["currency"]) == set(currencies) and set(rows["horizon_days"]) == {1, 3, 7}
        one = rows.filter((pl.col("status") == "scored") & (pl.col("currency") == "Divine Orb")
                          & (pl.col("horizon_days") == 7)).row(0, named=True)
        price_on = "SELECT price_chaos FROM daily_prices WHERE league = ? AND currency = ? AND date = ?"
        ((then,),) = con.execute(price_on, ["Sanctum", "Divine Orb", one["origin_date"]]).fetchall()
        week_later = one["origin_date"] + timedelta(days=7)
        ((later,),) = con.execute(price_on, ["Sanctum", "Divine Orb", week_later]).fetchall()
        plans = con.sql("SELECT * FROM plan_outcomes WHERE status = 'scored'").pl()
    assert 100 < then < 400  # a Divine Orb costs a few hundred chaos in Sanctum
    assert one["price_at_origin"] == pytest.approx(then) and one["price_at_horizon"] == pytest.approx(later)
    assert one["realized_return"] == pytest.approx(later / then - 1)
    rose = later > then
    expected = {"buy": rose, "sell": later < then,
                "hold": one["pred_lower"] <= later <= one["pred_upper"]}[one["advice"]]
    assert one["advice_right"] == expected
    assert plans.height > 0 and set(plans["horizon_days"]) == {1, 3, 7}


@pytest.mark.slow
def test_demo_report_in_chromium_shows_prices_charts_plans_and_the_track_record(demo_lake, tmp_path):
    from test_ui_e2e import CHROMEDRIVER, CHROMIUM, CHROMIUM_FLAGS, _require_browser

    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    root, currencies = demo_lake.root, demo_lake.currencies
    (html,) = sorted((root / "reports").glob("*/investment_report_sanctum.html"))[-1:]
    table = pl.read_csv(html.with_suffix(".csv"), try_parse_dates=True)
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.get(html.as_uri())
        driver.set_window_size(1600, 1000)
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1600, min(height + 200, 16000))
        shot = tmp_path / "demo_report.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 50_000
        print(f"screenshot: {shot}")
        images = {img.get_attribute("alt"): img for img in driver.find_elements(By.TAG_NAME, "img")}
        assert {"forecast fan", "risk and return", "past advice"} <= set(images)
        for name, img in images.items():  # each chart decoded and drawn, not a broken image
            assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 300, name
        headings = [h.text for h in driver.find_elements(By.TAG_NAME, "h2")]
        assert "How did past advice do?" in headings
        past = driver.find_element(By.XPATH, "//h2[.='How did past advice do?']/following-sibling::div[1]//table")
        cells = [td.text for td in past.find_elements(By.TAG_NAME, "td")]
        assert any(re.fullmatch(r"\d+% of \d+", c) for c in cells), cells  # hit rates with their counts
        body = driver.find_element(By.TAG_NAME, "body").text
    finally:
        driver.quit()
    # every row a player is shown has its panel in the fan chart, and its price in chaos and in divines
    assert table["currency"].n_unique() <= 24 and set(table["currency"]) == set(currencies)
    assert table["current_price_divines"].null_count() == 0
    divine = table.filter(pl.col("currency") == "Divine Orb")["current_price"][0]
    assert 100 < divine < 400 and "price (div)" in body
    # every pick the budget can afford gets chaos; one it cannot says what budget would
    for pick in table.filter(pl.col("picked")).iter_rows(named=True):
        affordable = pick["current_price"] <= pick["budget_chaos"] * pick["max_weight"]
        assert (pick["allocation_chaos"] > 0) == affordable or "budget" in (pick["note"] or ""), pick
    assert table["trust"].str.contains("beat 'no change' on").any()

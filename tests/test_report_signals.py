"""A new confident buy is a signal: one alert per (league, currency, horizon, origin), never twice."""

from __future__ import annotations

import logging
from datetime import date

import polars as pl
from test_reporting import predictions, sanctum

from poe_pipeline.assets.forecasts import _alert_new_buys
from poe_pipeline.monitoring import read_alerts
from poe_pipeline.reporting import build_report, new_buys, write_report
from poe_pipeline.resources import LakeResource, MonitoringResource

DAY_BEFORE = date(2023, 4, 3)
LOG = logging.getLogger("test_report_signals")


def _day_before() -> pl.DataFrame:
    """Divine Orb and Exalted Orb buys at every horizon, except Divine Orb at 7 days: its interval (+-8 %) is wider
    than its expected move (+5 %)."""
    tight = predictions({"Divine Orb": 0.05, "Exalted Orb": 0.04}, width=0.02, origin=DAY_BEFORE)
    wide = predictions({"Divine Orb": 0.05}, width=0.08, origin=DAY_BEFORE, horizons=(7,))
    return pl.concat([
        tight.filter(~((pl.col("currency") == "Divine Orb") & (pl.col("horizon_days") == 7))), wide,
    ])


def test_new_buys_are_the_picks_the_previous_report_lacked(lake):
    before = build_report(_day_before(), sanctum())
    assert before.picks().height == 5 and before.picks(7)["currency"].to_list() == ["Exalted Orb"]
    assert new_buys(lake, before).height == 5  # the league's first report: every pick is new
    write_report(lake, before, sanctum())

    today = build_report(predictions({"Divine Orb": 0.05, "Exalted Orb": 0.04}, width=0.02), sanctum())
    assert today.picks().height == 6
    fresh = new_buys(lake, today)
    assert fresh.select("currency", "horizon_days").rows() == [("Divine Orb", 7)]
    write_report(lake, today, sanctum())  # its own stored table is not "previous": a re-run finds the same buy
    assert new_buys(lake, today).select("currency", "horizon_days").rows() == [("Divine Orb", 7)]
    # a report on an earlier day is compared with what came before it, not with later reports
    assert new_buys(lake, before).height == 5


def test_a_new_buy_alerts_once_naming_currency_horizon_move_and_interval(lake):
    write_report(lake, build_report(_day_before(), sanctum()), sanctum())
    today = build_report(predictions({"Divine Orb": 0.05, "Exalted Orb": 0.04}, width=0.02), sanctum())
    write_report(lake, today, sanctum())
    resources = LakeResource(root=str(lake.root)), MonitoringResource()
    first = _alert_new_buys(today, *resources, LOG)
    again = _alert_new_buys(today, *resources, LOG)  # a re-run of the asset
    assert first == again == ["buy-signal-Sanctum-Divine Orb-7d-2023-04-04"]

    alerts = read_alerts(lake)
    assert len(alerts) == 1
    alert = alerts[0]
    row = today.picks(7).filter(pl.col("currency") == "Divine Orb").row(0, named=True)
    assert alert["kind"] == "buy_signal" and alert["severity"] == "info"
    assert alert["title"] == "New buy signal: Divine Orb, 7-day horizon (Sanctum)"
    message = alert["message"]
    assert message.startswith(f"Buy Divine Orb for 7 days: expected move {row['expected_return']:+.1%}")
    assert f"{row['expected_return'] * 100:+.1f}%" == "+5.1%"  # exp(0.05) - 1
    # the interval in chaos and in divines (one Divine Orb is 240 chaos on the day)
    assert (f"80% interval {row['pred_lower']:,.1f} chaos ({row['pred_lower_divines']:.2f} div) to "
            f"{row['pred_upper']:,.1f} chaos ({row['pred_upper_divines']:.2f} div)") in message
    assert row["divine_price_chaos"] == 240.0 and "247.3 chaos (1.03 div)" in message
    assert f"Suggested: {row['units']} unit(s)" in message and "Model: beats 'no change'" in message
    details = alert["details"]
    assert details["currency"] == "Divine Orb" and details["horizon_days"] == 7
    assert details["origin_date"] == "2023-04-04" and details["expected_return_pct"] == 5.13
    assert details["hint"].endswith("reports/2023-04-04/investment_report_sanctum.html")

"""The warehouse's public contract in words: what each view holds and what each column means, with its unit.

The warehouse writes these as ``COMMENT ON`` every view and column, and the Dagster layer shows them as each asset's
column schema, so an analyst reads the same text in DuckDB and in the UI. Returns are fractions (0.05 = +5 %)
unless a column's name ends in ``_pct``; log-returns are natural logs; prices are in chaos unless named otherwise.
"""

from __future__ import annotations

import polars as pl

KEY_DOCS = {
    "league": "the challenge league, e.g. 'Sanctum'",
    "currency": "the canonical currency name, e.g. 'Divine Orb'",
    "date": "the UTC day (DATE)",
    "origin_date": "the day the forecast was made from (its latest price)",
    "horizon_days": "the forecast horizon in days: 1, 3 or 7",
}

VIEW_DOCS: dict[str, str] = {
    "price_snapshots": "Every poll of the poe.watch API: one row per record and poll, immutable.",
    "quarantine": "Records and dump rows set aside with the reason: the live API's invalid records and the "
    "poe.ninja dumps' quirky rows (source 'poe_watch' or 'poe_ninja_dump').",
    "historical_prices": "The raw rows of the imported poe.ninja league dumps.",
    "daily_prices": "One daily price per (league, currency) in chaos, with its provenance.",
    "features": "The feature store: one row per (league, currency, date); features use only data up to that day.",
    "currency_universe": "Who gets a forecast in a league, and why not.",
    "model_metrics": "One row per training of a global model or a currency partition, with out-of-sample metrics.",
    "predictions": "Forecasts of every currency and horizon, with 80 % intervals, appended per origin day.",
    "forecast_gaps": "The (currency, horizon) pairs without a forecast at an origin, with the reason: every pair of "
    "the league's 30 most liquid currencies that has none, and every pair a run skipped; no row: nothing missing.",
    "prediction_errors": "Past predictions joined to the price that came true on origin_date + horizon_days.",
    "investment_report": "What to buy, hold or sell per horizon, with allocation and rebalancing triggers.",
    "advice_outcomes": "Every past piece of the report's advice (buy, hold or sell per currency and horizon), scored "
    "against the daily price on origin_date + horizon_days; source 'live' (a past report) or 'backtest' (a replay "
    "of that day on only the prices known then).",
    "plan_outcomes": "Every past plan (a horizon's picks with their allocation, the rest in chaos): its realized "
    "return against holding chaos and an equal-weight basket of the currencies the report ranked.",
}

# A forecast's prices and the report's pick flag, as both the report and the track record carry them
_ADVICE_DOCS = {
    "picked": "one of the report's buys after the diversification rule",
    "predicted_price": "point forecast, in chaos",
    "pred_lower": "lower end of the interval, in chaos", "pred_upper": "upper end of the interval, in chaos",
}

COLUMN_DOCS: dict[str, dict[str, str]] = {
    "daily_prices": {
        "price_chaos": "price of one unit in chaos (the day's close)",
        "confidence": "the source's confidence: High, Medium or Low",
        "volume": "listings per 24 hours where the source has them (null for poe.ninja dumps)",
        "source": "'poe_ninja_dump' or 'poe_watch'; where both have a day, the dump wins",
        "reverse_price_chaos": "the other side of the market, 1 / units one chaos buys, in chaos",
        "observations": "polls reduced to this close (1 for a dump row)",
    },
    "price_snapshots": {
        "polled_at": "the poll's 5-minute slot (UTC)",
        "mean": "mean listed price in chaos", "min": "lowest listed price in chaos",
        "max": "highest listed price in chaos", "mode": "most common listed price in chaos",
        "exalted": "mean price in Exalted Orbs", "daily": "listings per 24 hours",
        "change": "percent change against 7 days ago (percent, not a fraction)",
        "history": "the last 7 daily means in chaos",
    },
    "quarantine": {
        "polled_at": "when the record was set aside (UTC)", "source": "'poe_watch' or 'poe_ninja_dump'",
        "reason": "why it was set aside; for a dump row 'file:line: reason'",
        "record_json": "the record or row as it came, JSON",
    },
    "historical_prices": {
        "get": "the currency received", "pay": "the currency paid",
        "value": "units of pay per unit of get", "kind": "'currency' or 'fragment'",
        "source_file": "the dump file", "imported_at": "when the file was imported (UTC)",
    },
    "currency_universe": {
        "eligible": "gets a forecast", "reason": "'eligible...' or why not",
        "current_days": "observed days in the league",
        "good_confidence_share": "share of the last 14 days with a High or Medium confidence price (0..1)",
        "median_price_chaos": "median price over the last 14 days, in chaos",
        "liquidity_rank": "1 = most days with a High or Medium confidence price in the league",
    },
    "model_metrics": {
        "kind": "'global' (one pooled model per horizon) or 'currency' (a partition)",
        "ensemble_mae_logret": "mean absolute error of the log-return, out of sample (see metrics_scope)",
        "persistence_mae_logret": "the same for 'no change'",
        "ensemble_skill": "1 - ensemble_mae_logret / persistence_mae_logret; above 0 beats 'no change'",
        "metrics_scope": "which rows the metrics are on: 'holdout league (nested)', the league that tuning never saw; "
                         "for a currency without rows there, 'tuning folds (in sample: …)'; 'no rows of its own' "
                         "(no metrics)",
        "scale": "a partition's scale of the global forecast",
        "promoted": "this version became the champion", "promotion_reason": "why it was or was not promoted",
    },
    "predictions": {
        "current_price": "price at the origin, in chaos", "predicted_price": "point forecast, in chaos",
        "pred_lower": "lower end of the interval, in chaos", "pred_upper": "upper end of the interval, in chaos",
        "interval_level": "the interval's nominal coverage (0.8 = 80 %)",
        "confidence": "how much to trust the forecast, 0..1", "model_version": "the registered version used",
        "predicted_logret": "forecast log-return: ln(predicted_price / current_price)",
        "skill": "the model's out-of-sample skill against 'no change' (fraction)",
        "global_model_version": "the global model version the forecast went through",
        "model_logret": "the models' forecast log-return, before the league's point_shrink",
        "point_shrink": "predicted_logret / model_logret (1 = none; towards 0 = towards 'no change'): 1 since "
                        "2026-12-03, when the shrink learnt from the league's forecasts stopped earning its place",
        "interval_scale": "the half-width's scale learnt from this league's forecasts that came true in the "
                          "latest week (1 = as calibrated on past leagues)",
    },
    "forecast_gaps": {
        "liquidity_rank": "the currency's rank by days with a High or Medium confidence price in the league (1 = "
                          "most liquid; view currency_universe)",
        "reason": "why the pair has no forecast",
    },
    "prediction_errors": {
        "realized_price": "the price on origin_date + horizon_days, in chaos",
        "abs_log_error": "|ln(realized_price / predicted_price)|",
        "persistence_abs_log_error": "|ln(realized_price / current_price)|: the error of 'no change'",
        "inside_interval": "the realized price fell inside [pred_lower, pred_upper]",
    },
    "investment_report": {
        "rank": "1 = best score among the league's currencies at this horizon",
        "advice": "'buy' (the whole interval above today's price), 'sell' (below) or 'hold'",
        **_ADVICE_DOCS,
        "current_price": "price at the origin, in chaos",
        "current_price_divines": "current_price in Divine Orbs (current_price / divine_price_chaos)",
        "predicted_price_divines": "predicted_price in Divine Orbs, at the origin's Divine Orb price",
        "pred_lower_divines": "pred_lower in Divine Orbs, at the origin's Divine Orb price",
        "pred_upper_divines": "pred_upper in Divine Orbs, at the origin's Divine Orb price",
        "divine_price_chaos": "chaos per Divine Orb behind every *_divines column: the league's price on "
        "divine_price_date; null when there is none (chaos only)",
        "divine_price_date": "the day of divine_price_chaos: origin_date, or the last observed day before it",
        "expected_logret": "forecast log-return over the horizon (natural log, not percent)",
        "half_width_logret": "half the interval's width in log-price: the forecast's noise",
        "volatility": "the currency's daily log-return volatility scaled to the horizon",
        "confidence": "how much to trust the forecast, 0..1",
        "risk_adjusted_score": "confidence x expected_logret / volatility",
        "liquidity_score": "0..1 from last week's confidence, observed days, two-sided market, spread, volume",
        "score": "risk_adjusted_score x liquidity_score: what the ranking sorts on",
        "buy_below": "below this price the advice turns to buy, in chaos",
        "sell_above": "above this price the advice turns to sell, in chaos",
        "flip_price": "the nearer of the two prices at which the advice changes, in chaos",
        "flip_move": "the move from current_price to flip_price, a fraction",
        "trigger": "the rebalancing rule in words", "correlated_with": "picked currencies it moves with (corr.)",
        "note": "why it was or was not picked, or bought (a pick whose share buys no whole unit: the budget it needs)",
        "skill": "the model's out-of-sample skill against 'no change': 1 - its error / the error of 'no change' "
        "(fraction; above 0 beats 'no change')",
        "trust": "skill in words, and how often past forecasts beat 'no change'; 'treat as noise' when the model is "
        "no better than 'no change' (skill <= 0 or none)",
        "past_forecasts": "the currency's scored past forecasts at this horizon (advice_outcomes); null: none yet",
        "beat_no_change_share": "of those, the share whose error was smaller than 'no change's, 0..1",
        "budget_chaos": "the budget the allocation spreads, in chaos",
        "max_weight": "the cap on each pick's allocation_fraction, 0..1",
        "model_version": "the registered model version behind the forecast",
        "interval_method": "how the interval was built, e.g. 'conformal'",
        "interval_level": "the interval's nominal coverage (0.8 = 80 %)",
        "generated_at": "when the report was written (UTC)",
        "expected_return": "forecast return over the horizon as a fraction (0.05 = +5 %)",
        "downside_return": "return at the interval's lower end, a fraction",
        "upside_return": "return at the interval's upper end, a fraction",
        "allocation_chaos": "suggested amount to put in, in chaos: units x current_price",
        "allocation_divines": "allocation_chaos in Divine Orbs (allocation_chaos / divine_price_chaos)",
        "units": "whole units that amount buys (0: not bought)",
        "allocation_fraction": "share of the budget, 0..1 (0 for a pick whose share could not buy one unit; that "
        "share went to the other picks)",
    },
    "advice_outcomes": {
        "target_date": "origin_date + horizon_days: the day the advice is judged on",
        "source": "'live' (a stored past report) or 'backtest' (a replay; live wins where both exist)",
        "advice": "'buy', 'hold' or 'sell', as the report said",
        **_ADVICE_DOCS,
        "allocation_fraction": "the pick's share of the budget, 0..1",
        "price_at_origin": "price at the origin, in chaos",
        "expected_return": "the forecast's return, a fraction (0.05 = +5 %)",
        "price_at_horizon": "daily_prices' price on target_date, in chaos (null: not observed, or not yet)",
        "realized_return": "price_at_horizon / price_at_origin - 1, a fraction (0.05 = +5 %)",
        "abs_log_error": "|ln(price_at_horizon / predicted_price)|",
        "no_change_abs_log_error": "|ln(price_at_horizon / price_at_origin)|: the error of 'no change'",
        "beat_no_change": "abs_log_error < no_change_abs_log_error",
        "inside_interval": "price_at_horizon fell inside [pred_lower, pred_upper]",
        "advice_right": "buy: the price rose; sell: it fell; hold: it stayed inside the interval",
        "status": "'scored', 'pending' (target_date not reached) or 'not observed' (no price that day)",
        "model_version": "the registered model version behind the forecast (backtest-<refit day> for a replay)",
    },
    "plan_outcomes": {
        "source": "'live' or 'backtest', as in advice_outcomes",
        "exit_date": "origin_date + horizon_days: when the plan is sold back to chaos",
        "picks": "the plan's picks with their share of the budget",
        "invested_fraction": "share of the budget put in, 0..1; the rest stays in chaos",
        "plan_return": "sum of allocation_fraction x realized_return over the picks, a fraction of the budget",
        "chaos_return": "holding chaos: 0",
        "basket_return": "mean realized_return of every scored currency the report ranked, a fraction",
        "basket_size": "currencies in the basket",
        "status": "'scored' once every pick's price at exit_date is known",
    },
}


def column_docs(view: str, columns: list[str]) -> dict[str, str]:
    """A description for every column of ``view`` that has one (keys, the view's own, features' descriptions)."""
    from poe_pipeline.features import FEATURE_DESCRIPTIONS, TARGET_COLUMNS

    own = COLUMN_DOCS.get(view, {})
    docs = {}
    for c in columns:
        text = own.get(c) or KEY_DOCS.get(c)
        if text is None and view == "features":
            text = FEATURE_DESCRIPTIONS.get(c) or (
                f"target: {c.removeprefix('target_').replace('_', ' ')} (never a feature)"
                if c in TARGET_COLUMNS else None)
        if text:
            docs[c] = text
    return docs


def schema_docs(view: str, schema: dict[str, pl.DataType]) -> list[tuple[str, str, str]]:
    """(column, type, description) for every column of a polars schema."""
    docs = column_docs(view, list(schema))
    return [(name, str(dtype), docs.get(name, "")) for name, dtype in schema.items()]

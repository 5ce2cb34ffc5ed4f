"""The text summary that ``poe-pipeline run`` prints: daily prices per league, the last days, the models' skill and
the report's picks, read from the warehouse."""

from __future__ import annotations

import polars as pl

from poe_pipeline.lake import Lake
from poe_pipeline.reporting import markdown_table, report_summary
from poe_pipeline.warehouse import query


def summarize(lake: Lake, league: str, not_eligible: list[str] | None = None) -> str:
    per_league = query(
        lake,
        """
        SELECT league, min(date) AS first_day, max(date) AS last_day, count(DISTINCT currency) AS currencies,
               count(*) AS rows,
               round(arg_max(price_chaos, date) FILTER (WHERE currency = 'Divine Orb'), 1) AS divine_orb_close
        FROM daily_prices GROUP BY league ORDER BY first_day
        """,
    )
    last_week = query(
        lake,
        """
        SELECT date, currency, round(price_chaos, 2) AS price_chaos, confidence, source FROM daily_prices
        WHERE league = ? AND currency IN ('Divine Orb', 'Exalted Orb', 'Orb of Annulment', 'Mirror of Kalandra')
          AND date > (SELECT max(date) - 3 FROM daily_prices WHERE league = ?)
        ORDER BY currency, date
        """,
        [league, league],
    )
    models = query(
        lake,
        """
        SELECT coalesce(currency, '(global model)') AS model, horizon_days AS h, round(ensemble_skill, 3) AS skill,
               round(ensemble_mae_logret, 4) AS mae, round(persistence_mae_logret, 4) AS persistence_mae,
               model_version AS version, promoted,
               CASE WHEN metrics_scope LIKE 'holdout league%' THEN 'holdout'
                    WHEN metrics_scope LIKE 'tuning folds%' OR metrics_scope LIKE 'all folds%' THEN 'in sample'
               END AS scored_on
        FROM model_metrics WHERE league = ? AND trained
        QUALIFY row_number() OVER (PARTITION BY currency, horizon_days ORDER BY trained_at DESC) = 1
        ORDER BY currency NULLS FIRST, h
        """,
        [league],
    ) if lake.parquet_files(lake.model_metrics) else pl.DataFrame()
    skipped = [] if not not_eligible else [
        "", f"Not eligible for a forecast (see currency_universe for why): {', '.join(not_eligible)}"]
    return "\n".join([
        "",
        "daily_prices per league:",
        markdown_table(per_league.with_columns(pl.col("first_day", "last_day").cast(pl.Utf8))),
        "",
        f"Last days of {league}:",
        markdown_table(last_week.with_columns(pl.col("date").cast(pl.Utf8))),
        "",
        *([f"Models trained for {league} (skill on a holdout league that tuning never saw, unless scored_on says "
            "'in sample'; above 0 beats 'no change'):",
           markdown_table(models.head(40)), ""] if models.height else []),
        *skipped,
        report_summary(lake, league),
        "",
        *_track_record_lines(lake, league),
        f"Lake:       {lake.root}",
        f"Warehouse:  {lake.warehouse}   (duckdb -readonly {lake.warehouse})",
        f"Dagster UI: make dev   (DAGSTER_HOME={lake.dagster_home})",
    ])


def _track_record_lines(lake: Lake, league: str) -> list[str]:
    """The report's "How did past advice do?" numbers, per horizon, for the command line."""
    from poe_pipeline.forecasting import latest_origin
    from poe_pipeline.track_record import TrackRecord, read_outcomes

    outcomes, plans = read_outcomes(lake, league)
    if outcomes.height == 0:
        return []
    # what had come true by the latest forecast, as the report counts it
    record = TrackRecord.build(outcomes, plans, league, latest_origin(lake, league) or outcomes["origin_date"].max())
    if record.empty:
        return [f"How did past advice do? Nothing has come true yet ({outcomes.height} pieces of advice pending).", ""]
    return [f"How did past advice do? {record.sources_text()} (view advice_outcomes)",
            markdown_table(record.summary()), ""]

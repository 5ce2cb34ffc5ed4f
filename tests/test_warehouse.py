"""The DuckDB warehouse: views over the lake, readable by an analyst while the pipeline writes."""

from __future__ import annotations

import subprocess
import sys

import duckdb
import polars as pl
import pytest

from conftest import SAMPLE
from poe_pipeline.history import find_dumps, import_dumps
from poe_pipeline.prices import refresh_daily_prices
from poe_pipeline.warehouse import query, sync_views


@pytest.fixture
def filled_lake(lake):
    import_dumps(lake, [p for p in find_dumps([SAMPLE]) if p.name.startswith(("Kalandra", "Sanctum"))])
    refresh_daily_prices(lake)
    sync_views(lake)
    return lake


def test_divine_orb_prices_are_sane(filled_lake):
    rows = query(filled_lake, "SELECT * FROM daily_prices WHERE currency = 'Divine Orb'")
    assert rows.columns[:7] == ["league", "currency", "date", "price_chaos", "confidence", "volume", "source"]
    assert set(rows["league"]) == {"Kalandra", "Sanctum"}
    # After the league-start scramble (two weeks), a Divine Orb costs 100 to 300 chaos in both leagues.
    mid_league = rows.filter(
        pl.col("date").is_between(pl.date(2022, 9, 2), pl.date(2022, 12, 6))
        | pl.col("date").is_between(pl.date(2022, 12, 23), pl.date(2023, 4, 4))
    )
    assert mid_league.height > 150
    assert mid_league["price_chaos"].min() > 100 and mid_league["price_chaos"].max() < 300
    assert query(filled_lake, "SELECT count(*) AS n FROM daily_prices GROUP BY league, currency, date "
                              "HAVING count(*) > 1").height == 0


def test_rebuild_without_change_rewrites_nothing(filled_lake):
    assert refresh_daily_prices(filled_lake) == {}


def test_analyst_reads_while_pipeline_updates(filled_lake):
    """A read-only connection held open by another process does not block the pipeline's writes."""
    script = (
        "import duckdb, sys, time\n"
        f"con = duckdb.connect({str(filled_lake.warehouse)!r}, read_only=True)\n"
        "print(con.execute('SELECT count(*) FROM daily_prices').fetchone()[0], flush=True)\n"
        "sys.stdin.readline()\n"
        "print(con.execute('SELECT count(DISTINCT league) FROM daily_prices').fetchone()[0], flush=True)\n"
    )
    analyst = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)
    try:
        assert int(analyst.stdout.readline()) > 10_000
        # The pipeline adds a league while the analyst is connected: data lands, views already cover it.
        import_dumps(filled_lake, [SAMPLE / "Sentinel.currency.csv.gz"])
        assert "Sentinel" in refresh_daily_prices(filled_lake)
        sync_views(filled_lake)  # no view changed: must not need the write lock
        analyst.stdin.write("\n")
        analyst.stdin.flush()
        assert int(analyst.stdout.readline()) == 3
    finally:
        analyst.kill()


ALL_VIEWS = ["advice_outcomes", "currency_universe", "daily_prices", "features", "forecast_gaps", "historical_prices",
             "investment_report", "model_metrics", "plan_outcomes", "prediction_errors", "predictions",
             "price_snapshots", "quarantine"]


def test_every_view_exists_and_is_documented_before_any_data_lands(lake):
    assert sync_views(lake) == ALL_VIEWS
    with duckdb.connect(str(lake.warehouse), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM prediction_errors").fetchone()[0] == 0
        columns = con.execute("SELECT column_name, data_type, comment FROM duckdb_columns() "
                              "WHERE table_name = 'predictions'").fetchall()
        view_comment = con.execute("SELECT comment FROM duckdb_views() WHERE view_name = 'daily_prices'").fetchone()[0]
    assert ("predicted_price", "DOUBLE", "point forecast, in chaos") in columns
    assert view_comment.startswith("One daily price per (league, currency) in chaos")
    import_dumps(lake, [SAMPLE / "Sentinel.currency.csv.gz"])
    # Sentinel's dump holds 16 quirky rows (e.g. 15,000,000 Tribute to the Goddess per chaos): quarantined
    assert sync_views(lake) == ALL_VIEWS
    with duckdb.connect(str(lake.warehouse), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM historical_prices").fetchone()[0] > 10_000
        assert con.execute("SELECT count(*) FROM quarantine WHERE line > 1").fetchone()[0] == 16
        comment = con.execute("SELECT comment FROM duckdb_columns() WHERE table_name = 'quarantine' "
                              "AND column_name = 'reason'").fetchone()[0]
    assert "file:line" in comment

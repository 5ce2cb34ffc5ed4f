"""``warehouse.duckdb``: the analysts' door, views over the lake's Parquet files.

Views read the Parquet globs at query time, so new data shows up without
touching the database. The pipeline opens the file read-write only when a view
is missing or changed, and only for a moment, so an analyst can keep a
read-only connection open while the pipeline runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import duckdb

from poe_pipeline.lake import Lake


@dataclass(frozen=True)
class ParquetView:
    name: str
    directory: Path
    select: str = "*"


def _view_sql(view: ParquetView) -> str:
    glob = (view.directory / "**" / "*.parquet").as_posix().replace("'", "''")
    return (
        f"CREATE OR REPLACE VIEW {view.name} AS SELECT {view.select} FROM read_parquet('{glob}', "
        "hive_partitioning = false, union_by_name = true)"
    )


def lake_views(lake: Lake) -> list[ParquetView]:
    return [
        ParquetView("price_snapshots", lake.poe_watch_raw),
        ParquetView("historical_prices", lake.poe_ninja_raw),
        ParquetView("daily_prices", lake.daily_prices),
        ParquetView("quarantine", lake.quarantine),
        ParquetView("features", lake.features),
        ParquetView("currency_universe", lake.root / "currency_universe"),
        ParquetView("model_metrics", lake.root / "model_metrics"),
        ParquetView("predictions", lake.root / "predictions"),
        ParquetView("investment_report", lake.root / "investment_report"),
    ]


def sql_views() -> dict[str, tuple[str, set[str]]]:
    """Views defined in SQL over other views: name -> (SELECT, the views it needs)."""
    from poe_pipeline.forecasting import PREDICTION_ERRORS_SQL

    return {"prediction_errors": (PREDICTION_ERRORS_SQL, {"predictions", "daily_prices"})}


def _has_parquet(directory: Path) -> bool:
    return directory.is_dir() and any(p for p in directory.rglob("*.parquet") if not p.name.startswith("."))


def _fingerprint(sql: str) -> str:
    return "poe:" + hashlib.sha256(sql.encode()).hexdigest()[:16]


def existing_views(db_path: Path) -> dict[str, str]:
    """View name -> fingerprint of the SQL that made it (kept in the view's comment; DuckDB reformats the SQL)."""
    if not db_path.exists():
        return {}
    with duckdb.connect(str(db_path), read_only=True) as con:
        return dict(con.execute("SELECT view_name, coalesce(comment, '') FROM duckdb_views() WHERE NOT internal")
                    .fetchall())


def sync_views(lake: Lake, views: Iterable[ParquetView] | None = None) -> list[str]:
    """Create or update the views whose data exists. Returns the names of the views in place.

    Raises ``duckdb.IOException`` if another process holds the file read-write.
    """
    wanted = {v.name: _view_sql(v) for v in (views or lake_views(lake)) if _has_parquet(v.directory)}
    for name, (select, needs) in sql_views().items():
        if needs <= set(wanted):
            wanted[name] = f"CREATE OR REPLACE VIEW {name} AS {select}"
    try:
        current = existing_views(lake.warehouse)
    except duckdb.IOException:
        current = {}
    stale = {name: sql for name, sql in wanted.items() if current.get(name) != _fingerprint(sql)}
    if stale:
        lake.root.mkdir(parents=True, exist_ok=True)
        with duckdb.connect(str(lake.warehouse)) as con:
            for name, sql in stale.items():
                con.execute(sql)
                con.execute(f"COMMENT ON VIEW {name} IS '{_fingerprint(sql)}'")
    return sorted(set(current) | set(wanted))


def query(lake: Lake, sql: str, params: list | None = None):
    """Run a read-only query against the warehouse (for the CLI, tests and reports)."""
    with duckdb.connect(str(lake.warehouse), read_only=True) as con:
        return con.sql(sql, params=params or None).pl()

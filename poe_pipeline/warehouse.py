"""``warehouse.duckdb``: the analysts' door, views over the lake's Parquet files.

Views read the Parquet globs at query time, so new data shows up without
touching the database. The pipeline opens the file read-write only when a view
is missing or changed, and only for a moment, so an analyst can keep a
read-only connection open while the pipeline runs.

The file holds nothing the lake cannot rebuild (views only), so a fault in it never fails a run:

- a file that is not a valid DuckDB database (random bytes, cut short, a checksum error) is moved aside to
  ``warehouse.duckdb.corrupt-<UTC time>`` (kept, never deleted) and rebuilt from the lake;
- a file another process holds read-write (an analyst's session) cannot be opened at all, not even read-only:
  ``publish_views`` says the views were not refreshed and why, and ``query`` reads the lake through the same
  views in memory.

DuckDB raises ``IOException`` for both; its message tells them apart.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import polars as pl
import tenacity

from poe_pipeline.lake import Lake

log = logging.getLogger(__name__)

_LOCKED = ("Could not set lock",)
_CORRUPT = ("not a valid DuckDB database file", "Could not read enough bytes", "Corrupt database file")
_LOCK_HOLDER = re.compile(r"held in (?P<program>.+?) \(PID (?P<pid>\d+)\)")


class WarehouseLockedError(duckdb.IOException):
    """Another process holds ``warehouse.duckdb`` read-write (a ``duckdb.IOException``, as DuckDB raised it)."""


def _problem(exc: BaseException) -> str | None:
    """Which fault of the file ``exc`` shows: "locked", "corrupt", or None (any other error is not the file's)."""
    text = str(exc)
    if any(m in text for m in _LOCKED):
        return "locked"
    if any(m in text for m in _CORRUPT):
        return "corrupt"
    return None


def _locked(path: Path, exc: BaseException) -> WarehouseLockedError:
    holder = _LOCK_HOLDER.search(str(exc))
    who = f"PID {holder['pid']}, {holder['program']}" if holder else str(exc)
    return WarehouseLockedError(
        f"{path} is held read-write by another process ({who}), so its views were not refreshed; the data is in "
        f"the lake and the next run refreshes them. Close that connection, or open the warehouse read-only "
        f"(duckdb -readonly {path}) so runs can refresh it while you work."
    )


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
        ParquetView("currency_universe", lake.currency_universe),
        ParquetView("model_metrics", lake.model_metrics),
        ParquetView("predictions", lake.predictions),
        ParquetView("forecast_gaps", lake.forecast_gaps),
        ParquetView("investment_report", lake.investment_report),
        ParquetView("advice_outcomes", lake.advice_outcomes),
        ParquetView("plan_outcomes", lake.plan_outcomes),
    ]


def view_schema(name: str) -> dict[str, pl.DataType]:
    """The columns of a lake view as its writers produce them (the view of an empty lake has exactly these)."""
    from poe_pipeline.features import build_features
    from poe_pipeline.forecasting import FORECAST_GAPS_SCHEMA, PREDICTIONS_SCHEMA
    from poe_pipeline.history import HISTORY_SCHEMA
    from poe_pipeline.leagues import league_calendar
    from poe_pipeline.prices import DAILY_PRICES_SCHEMA
    from poe_pipeline.reporting import REPORT_SCHEMA
    from poe_pipeline.sources.poe_watch import QUARANTINE_SCHEMA, SNAPSHOT_SCHEMA
    from poe_pipeline.track_record import ADVICE_OUTCOMES_SCHEMA, PLAN_OUTCOMES_SCHEMA
    from poe_pipeline.training import MODEL_METRICS_SCHEMA
    from poe_pipeline.universe import UNIVERSE_SCHEMA

    if name == "features":
        empty = pl.DataFrame(schema=DAILY_PRICES_SCHEMA)
        return dict(build_features(empty, league_calendar(empty)).schema)
    schemas = {
        "price_snapshots": dict(SNAPSHOT_SCHEMA),
        "historical_prices": HISTORY_SCHEMA,
        "daily_prices": DAILY_PRICES_SCHEMA,
        # the live API's records and the dumps' rows (these add the file and the line)
        "quarantine": {**QUARANTINE_SCHEMA, "source_file": pl.Utf8, "line": pl.Int64},
        "currency_universe": {**UNIVERSE_SCHEMA, "league": pl.Utf8},
        "model_metrics": MODEL_METRICS_SCHEMA,
        "predictions": PREDICTIONS_SCHEMA,
        "forecast_gaps": FORECAST_GAPS_SCHEMA,
        "investment_report": REPORT_SCHEMA,
        "advice_outcomes": ADVICE_OUTCOMES_SCHEMA,
        "plan_outcomes": PLAN_OUTCOMES_SCHEMA,
    }
    return dict(schemas[name])


def _empty_view_sql(name: str) -> str:
    """A view with the right columns and no rows, for a dataset nothing has written yet."""
    relation = duckdb.from_arrow(pl.DataFrame(schema=view_schema(name)).to_arrow())
    columns = ", ".join(f'NULL::{t} AS "{c}"' for c, t in zip(relation.columns, relation.types, strict=True))
    return f"CREATE OR REPLACE VIEW {name} AS SELECT {columns} WHERE false"


def sql_views() -> dict[str, tuple[str, set[str]]]:
    """Views defined in SQL over other views: name -> (SELECT, the views it needs)."""
    from poe_pipeline.forecasting import PREDICTION_ERRORS_SQL

    return {"prediction_errors": (PREDICTION_ERRORS_SQL, {"predictions", "daily_prices"})}


def _has_parquet(directory: Path) -> bool:
    return directory.is_dir() and any(p for p in directory.rglob("*.parquet") if not p.name.startswith("."))


def _fingerprint(sql: str) -> str:
    return "poe:" + hashlib.sha256(sql.encode()).hexdigest()[:16]


def _identity(path: Path) -> tuple[int, ...] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _move_aside(path: Path) -> Path:
    """Rename a corrupt warehouse (and its write-ahead log) to ``<name>.corrupt-<UTC time>``: kept, never deleted."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists() or target.with_name(target.name + ".wal").exists():
        target, n = path.with_name(f"{path.name}.corrupt-{stamp}-{n}"), n + 1
    os.rename(path, target)
    wal = path.with_name(path.name + ".wal")
    if wal.exists():  # a log for the corrupt file must not be replayed into the new one
        os.rename(wal, target.with_name(target.name + ".wal"))
    return target


def existing_views(db_path: Path) -> dict[str, str]:
    """View name -> fingerprint of the SQL that made it (kept at the end of the view's comment, since DuckDB
    reformats the SQL)."""
    if not db_path.exists():
        return {}
    with duckdb.connect(str(db_path), read_only=True) as con:
        comments = con.execute("SELECT view_name, coalesce(comment, '') FROM duckdb_views() WHERE NOT internal")
        return {name: (m.group(1) if (m := re.search(r"\[(poe:[0-9a-f]{16})\]$", comment)) else comment)
                for name, comment in comments.fetchall()}


def _wanted_views(lake: Lake, views: Iterable[ParquetView] | None = None, empty: bool = True) -> dict[str, str]:
    """View name -> CREATE statement (views over views after their inputs). A dataset nothing has written yet gets
    an empty view with its columns (``empty``), so every view an analyst reads about exists from the start."""
    wanted = {}
    for v in views or lake_views(lake):
        if _has_parquet(v.directory):
            wanted[v.name] = _view_sql(v)
        elif empty:
            wanted[v.name] = _empty_view_sql(v.name)
    for name, (select, needs) in sql_views().items():
        if needs <= set(wanted):
            wanted[name] = f"CREATE OR REPLACE VIEW {name} AS {select}"
    return wanted


def _comment(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _document(con: duckdb.DuckDBPyConnection, name: str, sql: str) -> None:
    """``COMMENT ON`` the view (its description, then the fingerprint of the SQL that made it) and each column."""
    from poe_pipeline.contracts import VIEW_DOCS, column_docs

    con.execute(f"COMMENT ON VIEW {name} IS {_comment(f'{VIEW_DOCS.get(name, name)} [{_fingerprint(sql)}]')}")
    columns = [c for (c,) in con.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = ?",
                                         [name]).fetchall()]
    for column, text in column_docs(name, columns).items():
        con.execute(f'COMMENT ON COLUMN {name}."{column}" IS {_comment(text)}')


def _sync(lake: Lake, views: Iterable[ParquetView] | None) -> tuple[list[str], Path | None]:
    """(the views in place, where a corrupt warehouse was moved). Raises ``WarehouseLockedError``."""
    wanted = _wanted_views(lake, views)
    db, moved = lake.warehouse, None
    for _ in range(2):  # twice at most: once more if another run replaced the corrupt file meanwhile
        seen = _identity(db)
        try:
            current = existing_views(db)
            break
        except duckdb.Error as exc:
            problem = _problem(exc)
            if problem == "locked":
                raise _locked(db, exc) from exc
            if problem != "corrupt":
                raise
            if _identity(db) != seen:
                continue
            moved = _move_aside(db)
            log.warning("%s is not a valid DuckDB database (%s); moved it aside to %s and rebuilding it from the lake",
                        db, str(exc).splitlines()[0], moved)
            current = {}
            break
    else:
        raise duckdb.IOException(f"{db} kept changing while its views were checked; run again")
    stale = {name: sql for name, sql in wanted.items() if current.get(name) != _fingerprint(sql)}
    if stale:
        lake.root.mkdir(parents=True, exist_ok=True)
        try:
            with duckdb.connect(str(db)) as con:
                for name, sql in stale.items():
                    con.execute(sql)
                    _document(con, name, sql)
        except duckdb.Error as exc:
            if _problem(exc) == "locked":
                raise _locked(db, exc) from exc
            raise
    return sorted(set(current) | set(wanted)), moved


def sync_views(lake: Lake, views: Iterable[ParquetView] | None = None) -> list[str]:
    """Create or update the views whose data exists. Returns the names of the views in place.

    A corrupt warehouse is moved aside and rebuilt. Raises ``WarehouseLockedError`` (a ``duckdb.IOException``)
    if another process holds the file read-write; ``publish_views`` reports that instead of raising.
    """
    return _sync(lake, views)[0]


@dataclass(frozen=True)
class ViewsOutcome:
    """What ``publish_views`` did: ``note`` (for the run's log, as a warning) says why the views were not
    refreshed, or that a corrupt warehouse was moved aside and rebuilt; None when all went as usual."""

    views: list[str] = field(default_factory=list)
    refreshed: bool = True
    note: str | None = None
    moved_aside: Path | None = None

    def as_metadata(self) -> dict:
        return {
            "warehouse_views": list(self.views),
            "warehouse_refreshed": self.refreshed,
            "warehouse_note": self.note or "",
            "warehouse_moved_aside": str(self.moved_aside) if self.moved_aside else "",
        }


def publish_views(lake: Lake, views: Iterable[ParquetView] | None = None, lock_wait_s: float = 1.0) -> ViewsOutcome:
    """``sync_views`` for a pipeline run: never fails the run over the warehouse file.

    Another run holds the write lock only for a moment, so a conflict is retried for ``lock_wait_s``; after that
    (an analyst's read-write session) the outcome says the views were not refreshed and why.
    """
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_delay(lock_wait_s),
        wait=tenacity.wait_fixed(0.1),
        retry=tenacity.retry_if_exception_type(WarehouseLockedError),
        reraise=True,
    )
    try:
        names, moved = retrying(_sync, lake, views)
    except WarehouseLockedError as exc:
        return ViewsOutcome(refreshed=False, note=f"Warehouse views not refreshed: {exc}")
    note = None
    if moved is not None:
        note = (
            f"{lake.warehouse} was not a valid DuckDB database: moved it aside to {moved} (kept; delete it when "
            f"you no longer need it) and rebuilt {len(names)} view(s) from the lake"
        )
    return ViewsOutcome(views=names, refreshed=True, note=note, moved_aside=moved)


def _lake_connection(lake: Lake, sql: str) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the warehouse's views that ``sql`` names, straight over the lake."""
    wanted = _wanted_views(lake, empty=False)
    named = {n for n in wanted if re.search(rf"\b{re.escape(n)}\b", sql, re.IGNORECASE)}
    for name, (_, needs) in sql_views().items():
        if name in named:
            named |= needs
    con = duckdb.connect(":memory:")
    for name, create in wanted.items():  # in order: views over views come after their inputs
        if name in named:
            con.execute(create)
    return con


def query(lake: Lake, sql: str, params: list | None = None):
    """Run a read-only query against the warehouse (for the CLI, tests and reports).

    When the file is held read-write by another process, or is corrupt, the same views are built in memory over
    the lake instead: the answer is the same, because the warehouse holds nothing else.
    """
    try:
        with duckdb.connect(str(lake.warehouse), read_only=True) as con:
            return con.sql(sql, params=params or None).pl()
    except duckdb.Error as exc:
        if _problem(exc) is None:
            raise
        log.warning("%s cannot be opened (%s); querying the lake directly", lake.warehouse, str(exc).splitlines()[0])
    with _lake_connection(lake, sql) as con:
        return con.sql(sql, params=params or None).pl()

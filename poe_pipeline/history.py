"""Importing poe.ninja league dumps into the lake, idempotently.

Each dump file lands once as ``raw/poe_ninja/league=<L>/<kind>-<sha>.parquet``,
keyed by the hash of its bytes: importing the same file again changes nothing,
and a newer dump of the same league is added beside the old one (raw data is
append-only). Reading back keeps, per row key, the most recently imported file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from poe_pipeline.lake import Lake, write_parquet_once
from poe_pipeline.sources.poe_ninja import (
    RAW_DUMP_SCHEMA,
    DumpFormatError,
    dump_kind,
    file_sha256,
    is_dump_file,
    league_of_dump,
    read_dump,
)

HISTORY_SCHEMA = {**RAW_DUMP_SCHEMA, "kind": pl.Utf8, "source_file": pl.Utf8, "imported_at": pl.Datetime("us", "UTC")}


class HistoryImportError(ValueError):
    pass


@dataclass
class ImportReport:
    imported: list[str] = field(default_factory=list)
    already_imported: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    rows_imported: int = 0
    leagues: set[str] = field(default_factory=set)


def find_dumps(directories: Iterable[Path]) -> list[Path]:
    found: list[Path] = []
    for directory in directories:
        directory = Path(directory)
        if directory.is_dir():
            found.extend(p for p in sorted(directory.iterdir()) if is_dump_file(p))
    return found


def raw_dump_path(lake: Lake, league: str, kind: str, sha: str) -> Path:
    return lake.poe_ninja_raw / f"league={league}" / f"{kind}-{sha[:16]}.parquet"


def import_dumps(
    lake: Lake, dumps: Iterable[Path], progress: Callable[[str], None] | None = None
) -> ImportReport:
    """Import every dump; malformed files are rejected by name and line, the rest still land."""
    report = ImportReport()
    dumps = list(dumps)
    for i, path in enumerate(dumps, 1):
        sha = file_sha256(path)
        kind = dump_kind(path)
        try:
            league = league_of_dump(path)
            target = raw_dump_path(lake, league, kind, sha)
            if target.exists():
                report.already_imported.append(path.name)
                report.leagues.add(league)
                continue
            rows = read_dump(path)
            leagues_in_file = rows["league"].unique().to_list()
            if leagues_in_file != [league]:
                raise DumpFormatError(path, None, f"file name says league {league!r}, rows say {leagues_in_file}")
        except DumpFormatError as exc:
            report.rejected[path.name] = str(exc)
            continue
        rows = rows.with_columns(
            pl.lit(kind).alias("kind"),
            pl.lit(path.name).alias("source_file"),
            pl.lit(datetime.now(UTC)).cast(pl.Datetime("us", "UTC")).alias("imported_at"),
        )
        if write_parquet_once(rows, target):
            report.imported.append(path.name)
            report.rows_imported += rows.height
        else:
            report.already_imported.append(path.name)
        report.leagues.add(league)
        if progress:
            progress(f"[{i}/{len(dumps)}] imported {path.name}: {rows.height:,} rows")
    return report


def read_history(lake: Lake, leagues: Iterable[str] | None = None) -> pl.DataFrame:
    """All imported dump rows; where two dumps of a league overlap, the newest import wins."""
    base = lake.poe_ninja_raw
    wanted = set(leagues) if leagues is not None else None
    files = [
        p for p in lake.parquet_files(base)
        if wanted is None or p.parent.name.removeprefix("league=") in wanted
    ]
    if not files:
        return pl.DataFrame(schema=HISTORY_SCHEMA)
    return (
        pl.scan_parquet(files, hive_partitioning=False)
        .sort("imported_at", descending=True)
        .unique(subset=["league", "date", "get", "pay"], keep="first")
        .sort("league", "date", "get", "pay")
        .collect()
    )

"""Importing poe.ninja league dumps into the lake, idempotently.

Each dump file lands once as ``raw/poe_ninja/league=<L>/<kind>-<sha>.parquet``, keyed by the hash of its bytes:
importing the same file again changes nothing. A league's dumps are cumulative (each covers the league from its
first day), so a different dump of the same league and kind *replaces* the earlier import: the earlier file moves
to ``raw/poe_ninja_superseded/`` (raw data is never rewritten or deleted) and comes back if that dump is imported
again, so a bad value, once imported, can always be corrected by re-importing the right file.

Rows that are quirks rather than errors (a Value of 0, an absurd value, a duplicate, a future date; see
``parse_dump``) are quarantined with their file, line and reason, and the rest of the dump is imported. A file
with a structural error is rejected as a whole, naming ``file:line``; the other files still import.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from poe_pipeline.lake import Lake, UnsafePathError, write_parquet_once
from poe_pipeline.names import InvalidLeagueNameError
from poe_pipeline.sources.poe_ninja import (
    RAW_DUMP_SCHEMA,
    DumpFormatError,
    dump_kind,
    file_sha256,
    is_dump_file,
    league_of_dump,
    parse_dump,
)

HISTORY_SCHEMA = {**RAW_DUMP_SCHEMA, "kind": pl.Utf8, "source_file": pl.Utf8, "imported_at": pl.Datetime("us", "UTC")}
QUARANTINE_SOURCE = "poe_ninja_dump"


class HistoryImportError(ValueError):
    pass


@dataclass
class ImportReport:
    imported: list[str] = field(default_factory=list)
    already_imported: list[str] = field(default_factory=list)
    replaced: dict[str, list[str]] = field(default_factory=dict)  # file -> the earlier imports it superseded
    rejected: dict[str, str] = field(default_factory=dict)
    quarantined: dict[str, int] = field(default_factory=dict)  # file -> quirky rows set aside
    rows_imported: int = 0
    leagues: set[str] = field(default_factory=set)

    @property
    def quarantined_rows(self) -> int:
        return sum(self.quarantined.values())


def find_dumps(directories: Iterable[Path]) -> list[Path]:
    found: list[Path] = []
    for directory in directories:
        directory = Path(directory)
        if directory.is_dir():
            found.extend(p for p in sorted(directory.iterdir()) if is_dump_file(p))
    return found


def raw_dump_path(lake: Lake, league: str, kind: str, sha: str) -> Path:
    return lake.league_path(lake.poe_ninja_raw, league, f"{kind}-{sha[:16]}.parquet")


def superseded_dump_path(lake: Lake, league: str, kind: str, sha: str) -> Path:
    return lake.league_path(lake.poe_ninja_superseded, league, f"{kind}-{sha[:16]}.parquet")


def dump_quarantine_path(lake: Lake, league: str, kind: str, sha: str) -> Path:
    return lake.league_path(lake.quarantine / QUARANTINE_SOURCE, league, f"{kind}-{sha[:16]}.parquet")


def _supersede_others(lake: Lake, league: str, kind: str, keep: Path) -> list[str]:
    """Move every other active import of (league, kind) to the superseded area; returns their file names."""
    moved = []
    for other in sorted(keep.parent.glob(f"{kind}-*.parquet")):
        if other != keep:
            target = lake.poe_ninja_superseded / other.parent.name / other.name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(other, target)
            moved.append(other.name)
    return moved


def _quarantine_frame(quirks: pl.DataFrame, path: Path, league: str, kind: str, at: datetime) -> pl.DataFrame:
    """Quirky rows in the lake's quarantine shape (the same columns as the live API's quarantined records)."""
    return quirks.select(
        pl.lit(at).cast(pl.Datetime("us", "UTC")).alias("polled_at"),
        pl.lit(league).alias("league"),
        pl.lit(QUARANTINE_SOURCE).alias("source"),
        pl.lit(kind).alias("category"),
        pl.concat_str(pl.lit(f"{path.name}:"), pl.col("line").cast(pl.Utf8), pl.lit(": "), "reason").alias("reason"),
        "record_json",
        pl.lit(path.name).alias("source_file"),
        "line",
    )


def _league_key(path: Path) -> tuple[str, str]:
    try:
        return league_of_dump(path), dump_kind(path)
    except DumpFormatError:
        return str(path), "?"  # rejected later, with its reason


def _latest_per_league(dumps: list[Path]) -> tuple[list[Path], dict[str, str]]:
    """Where one import names the same league and kind twice, only the last one found is imported."""
    last = {_league_key(path): path for path in dumps}
    chosen = set(last.values())
    ignored = {}
    for path in dumps:
        winner = last[_league_key(path)]
        if path not in chosen and file_sha256(path) != file_sha256(winner):
            ignored[path.name] = f"{path} was not imported: {winner} is a later dump of the same league"
    return [p for p in dumps if p in chosen], ignored


def import_dumps(
    lake: Lake, dumps: Iterable[Path], progress: Callable[[str], None] | None = None,
    now: datetime | None = None,
) -> ImportReport:
    """Import every dump: quirky rows are quarantined, structurally bad files rejected by name and line, and the
    rest land. ``now`` (default: the clock) is the import time; rows dated after it are quirks."""
    report = ImportReport()
    dumps, ignored = _latest_per_league(list(dumps))
    for name, why in ignored.items():
        report.already_imported.append(name)
        if progress:
            progress(why)
    for i, path in enumerate(dumps, 1):
        at = (now or datetime.now(UTC)).astimezone(UTC)
        try:
            sha = file_sha256(path)
            kind = dump_kind(path)
            league = league_of_dump(path)
            target = raw_dump_path(lake, league, kind, sha)
            if target.exists():
                report.already_imported.append(path.name)
                report.leagues.add(league)
                replaced = _supersede_others(lake, league, kind, target)  # finishes an interrupted re-import
                if replaced:
                    report.replaced[path.name] = replaced
                continue
            earlier = superseded_dump_path(lake, league, kind, sha)
            if earlier.exists():  # this exact dump was imported before and then replaced: bring it back
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(earlier, target)
                report.imported.append(path.name)
                report.replaced[path.name] = _supersede_others(lake, league, kind, target)
                report.leagues.add(league)
                if progress:
                    progress(f"[{i}/{len(dumps)}] re-imported {path.name}: it replaces "
                             f"{', '.join(report.replaced[path.name]) or 'nothing'}")
                continue
            parsed = parse_dump(path, now=at)
            rows = parsed.rows
            leagues_in_file = rows["league"].unique().to_list()
            if rows.height and leagues_in_file != [league]:
                raise DumpFormatError(path, None, f"file name says league {league!r}, rows say {leagues_in_file}")
        except (DumpFormatError, OSError, InvalidLeagueNameError, UnsafePathError) as exc:
            if isinstance(exc, InvalidLeagueNameError | UnsafePathError):  # the file name would escape the lake
                exc = DumpFormatError(path, None, str(exc))
            reason = str(exc) if isinstance(exc, DumpFormatError) else f"{path.name}: cannot be read ({exc})"
            report.rejected[path.name] = reason
            if progress:
                progress(f"[{i}/{len(dumps)}] rejected {reason}")
            continue
        if parsed.quirks.height:
            # Before the rows: if the run dies in between, the re-run writes the same file again.
            write_parquet_once(_quarantine_frame(parsed.quirks, path, league, kind, at),
                               dump_quarantine_path(lake, league, kind, sha))
            report.quarantined[path.name] = parsed.quirks.height
        rows = rows.with_columns(
            pl.lit(kind).alias("kind"),
            pl.lit(path.name).alias("source_file"),
            pl.lit(at).cast(pl.Datetime("us", "UTC")).alias("imported_at"),
        )
        if write_parquet_once(rows, target):
            report.imported.append(path.name)
            report.rows_imported += rows.height
        else:
            report.already_imported.append(path.name)
        replaced = _supersede_others(lake, league, kind, target)
        if replaced:
            report.replaced[path.name] = replaced
        report.leagues.add(league)
        if progress:
            quirks = f", {parsed.quirks.height} quirky row(s) quarantined" if parsed.quirks.height else ""
            progress(f"[{i}/{len(dumps)}] imported {path.name}: {rows.height:,} rows{quirks}")
    return report


def read_history(lake: Lake, leagues: Iterable[str] | None = None) -> pl.DataFrame:
    """Every active imported dump row. A lake from before imports replaced each other may hold several dumps of a
    league; then, per row key, the newest import wins."""
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

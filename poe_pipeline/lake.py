"""The Parquet lake: paths, atomic writes and append-only raw data.

Every write goes to a temporary file in the target directory and is then moved
into place, so a killed process never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl

COMPRESSION = "zstd"


@contextlib.contextmanager
def _temp_beside(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
    finally:
        tmp_path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def write_parquet_atomic(df: pl.DataFrame, path: Path) -> Path:
    """Write (or replace) ``path`` atomically: a reader sees the old file or the new one."""
    with _temp_beside(path) as tmp:
        df.write_parquet(tmp, compression=COMPRESSION, statistics=True)
        _fsync(tmp)
        os.replace(tmp, path)
    return path


def write_parquet_once(df: pl.DataFrame, path: Path) -> bool:
    """Write an immutable file atomically; never replace one that exists.

    Returns False when ``path`` already exists (another writer won, or this
    write is a re-run). ``os.link`` fails on an existing target, which makes the
    check and the publish one atomic step even between processes.
    """
    if path.exists():
        return False
    with _temp_beside(path) as tmp:
        df.write_parquet(tmp, compression=COMPRESSION, statistics=True)
        _fsync(tmp)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    return True


def write_bytes_atomic(data: bytes, path: Path) -> Path:
    with _temp_beside(path) as tmp:
        tmp.write_bytes(data)
        _fsync(tmp)
        os.replace(tmp, path)
    return path


def write_text_atomic(text: str, path: Path) -> Path:
    return write_bytes_atomic(text.encode("utf-8"), path)


def hive_dir(root: Path, **parts: str) -> Path:
    """``root/key=value/...`` in the order given."""
    for key, value in parts.items():
        root = root / f"{key}={value}"
    return root


@dataclass(frozen=True)
class Lake:
    """Named places in the lake. Raw data is append-only; derived data is rebuilt."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # raw, append-only
    @property
    def poe_watch_raw(self) -> Path:
        return self.root / "raw" / "poe_watch"

    @property
    def poe_ninja_raw(self) -> Path:
        return self.root / "raw" / "poe_ninja"

    @property
    def poe_ninja_superseded(self) -> Path:
        """Dumps replaced by a later import of the same league: kept, never read as history."""
        return self.root / "raw" / "poe_ninja_superseded"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def inbox(self) -> Path:
        """Drop poe.ninja dumps (``<League>.currency.csv``) here to import them."""
        return self.root / "inbox"

    # derived, rebuilt from raw
    @property
    def daily_prices(self) -> Path:
        return self.root / "daily_prices"

    @property
    def features(self) -> Path:
        return self.root / "features"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def warehouse(self) -> Path:
        return self.root / "warehouse.duckdb"

    @property
    def dagster_home(self) -> Path:
        return self.root / ".dagster"

    def parquet_files(self, base: Path) -> list[Path]:
        return sorted(p for p in base.rglob("*.parquet") if not p.name.startswith("."))

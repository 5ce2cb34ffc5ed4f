"""The Parquet lake: paths, atomic writes and append-only raw data.

Every write goes to a temporary file in the target directory and is then moved
into place, so a killed process never leaves a half-written file behind.

Names from outside (a league from poe.watch, ``POE_LEAGUE`` or a dump's file name) become paths only through
``Lake.league_path``, which checks the name and that the path stays inside the lake.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from poe_pipeline.names import check_league_name

COMPRESSION = "zstd"


class UnsafePathError(ValueError):
    """A path built from outside input that would land outside the lake."""


class UnreadableFileError(OSError):
    """A stored file that cannot be read (truncated, overwritten, not Parquet)."""


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


def write_parquet_atomic(df: pl.DataFrame | pl.LazyFrame, path: Path) -> Path:
    """Write (or replace) ``path`` atomically: a reader sees the old file or the new one. A query is streamed
    to the file."""
    with _temp_beside(path) as tmp:
        if isinstance(df, pl.LazyFrame):
            df.sink_parquet(tmp, compression=COMPRESSION, statistics=True)
        else:
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
    """``root/key=value/...`` in the order given. A ``league`` must be a valid league name, and no value may hold a
    path separator or be ``..``: each value stays one directory level."""
    for key, value in parts.items():
        value = str(value)
        if key == "league":
            check_league_name(value)
        elif not value or value in (".", "..") or "/" in value or "\\" in value or "\0" in value:
            raise UnsafePathError(f"Partition value {key}={value!r} is not a single directory name")
        root = root / f"{key}={value}"
    return root


def is_readable_parquet(path: Path) -> bool:
    """The file exists and its Parquet footer reads: a file cut short (or not Parquet at all) fails this."""
    try:
        pl.read_parquet_schema(path)
    except (pl.exceptions.PolarsError, OSError):
        return False
    return True


def read_parquet_files(paths: list[Path], fix: str, **kwargs) -> pl.DataFrame:
    """``pl.read_parquet(paths)``, but a file that cannot be read is named, with ``fix`` (polars names none)."""
    try:
        return pl.read_parquet(paths, **kwargs)
    except (pl.exceptions.PolarsError, OSError):
        for path in paths:  # only now, on the failure path: which file is it?
            try:
                pl.read_parquet(path, **kwargs)
            except (pl.exceptions.PolarsError, OSError) as bad:
                raise UnreadableFileError(f"{path} cannot be read ({type(bad).__name__}: {bad}); {fix}") from bad
        raise


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
    def poe_watch_breaker_state(self) -> Path:
        """The poe.watch circuit breaker, shared by every run through this file."""
        return self.state / "poe_watch_breaker.json"

    @property
    def currency_universe(self) -> Path:
        return self.root / "currency_universe"

    # models, their scores and what they produce
    @property
    def models_staging(self) -> Path:
        """Where training workers write artifacts before the parent logs them to MLflow."""
        return self.root / "models" / "staging"

    @property
    def model_metrics(self) -> Path:
        return self.root / "model_metrics"

    @property
    def mlflow(self) -> Path:
        return self.root / "mlflow"

    @property
    def mlflow_db(self) -> Path:
        return self.mlflow / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.mlflow / "artifacts"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    @property
    def forecast_gaps(self) -> Path:
        return self.root / "forecast_gaps"

    @property
    def investment_report(self) -> Path:
        return self.root / "investment_report"

    @property
    def reports(self) -> Path:
        """The rendered reports (Markdown, HTML, chart), one folder per origin date."""
        return self.root / "reports"

    @property
    def backtests(self) -> Path:
        return self.root / "backtests"

    @property
    def track_record(self) -> Path:
        """The replay of earlier days that fills the track record where no past report exists."""
        return self.root / "track_record"

    @property
    def advice_outcomes(self) -> Path:
        return self.root / "advice_outcomes"

    @property
    def plan_outcomes(self) -> Path:
        return self.root / "plan_outcomes"

    @property
    def alerts(self) -> Path:
        return self.root / "alerts"

    @property
    def warehouse(self) -> Path:
        return self.root / "warehouse.duckdb"

    @property
    def dagster_home(self) -> Path:
        return self.root / ".dagster"

    def parquet_files(self, base: Path) -> list[Path]:
        return sorted(p for p in base.rglob("*.parquet") if not p.name.startswith("."))

    def inside(self, path: Path) -> Path:
        """``path``, once it is certain to stay inside the lake root, else ``UnsafePathError``.

        The check is on the normalised path (``..`` resolved), not on symlinks: a lake may link a folder onto
        another disk, and names from outside cannot create links.
        """
        root = Path(os.path.abspath(self.root))
        resolved = Path(os.path.abspath(path))
        if not resolved.is_relative_to(root):
            raise UnsafePathError(
                f"Refusing the path {str(path)!r}: it resolves to {resolved}, outside the lake {root}; "
                "a league or file name must not contain '..' or a path separator"
            )
        return Path(path)

    def league_path(self, area: Path, league: str, *parts: str) -> Path:
        """``area/league=<league>/<parts>``: the one way a league name becomes a path. The name is checked
        (``names.check_league_name``) and the result must stay inside the lake."""
        return self.inside(hive_dir(area, league=league).joinpath(*parts))

"""poe.ninja: the per-league daily dumps (history) and the ``currencyoverview`` API.

A dump row ``Get=X;Pay=Chaos Orb;Value=v`` means X costs v chaos. The other side
of the market, ``Get=Chaos Orb;Pay=X;Value=w``, means one chaos buys w of X.
"""

from __future__ import annotations

import gzip
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import requests

from poe_pipeline.names import canonical_currency_name

DUMP_HEADER = ["League", "Date", "Get", "Pay", "Value", "Confidence"]
DUMP_SUFFIXES = (".currency.csv", ".currency.csv.gz", ".fragment.csv", ".fragment.csv.gz")
CONFIDENCE_LEVELS = ("High", "Medium", "Low")
CHAOS = "Chaos Orb"

RAW_DUMP_SCHEMA = {
    "league": pl.Utf8,
    "date": pl.Date,
    "get": pl.Utf8,
    "pay": pl.Utf8,
    "value": pl.Float64,
    "confidence": pl.Utf8,
}


class DumpFormatError(ValueError):
    """A dump that does not follow poe.ninja's format; names the file and the line."""

    def __init__(self, path: Path, line: int | None, reason: str):
        where = f"{path.name}:{line}" if line else path.name
        super().__init__(f"Malformed poe.ninja dump {where}: {reason}")
        self.path, self.line, self.reason = path, line, reason


def is_dump_file(path: Path) -> bool:
    return path.is_file() and path.name.endswith(DUMP_SUFFIXES)


def dump_kind(path: Path) -> str:
    return "fragment" if ".fragment." in path.name else "currency"


def league_of_dump(path: Path) -> str:
    name = path.name
    for suffix in DUMP_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    raise DumpFormatError(path, None, f"expected a name like '<League>{DUMP_SUFFIXES[0]}'")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_dump(path: Path) -> pl.DataFrame:
    """Parse and validate one dump. Raises ``DumpFormatError`` naming the first bad line.

    Returns the raw rows with canonical currency names (``RAW_DUMP_SCHEMA``).
    """
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="") as fh:
        header = fh.readline().rstrip("\r\n").split(";")
    if header != DUMP_HEADER:
        raise DumpFormatError(path, 1, f"header is {';'.join(header)!r}, expected {';'.join(DUMP_HEADER)!r}")
    try:
        raw = pl.read_csv(
            path, separator=";", infer_schema=False, has_header=True, quote_char=None,
            truncate_ragged_lines=False,
        )
    except (pl.exceptions.ComputeError, pl.exceptions.NoDataError, OSError) as exc:
        raise DumpFormatError(path, None, f"not a ';'-separated CSV ({exc})") from None
    if raw.height == 0:
        raise DumpFormatError(path, None, "no rows")

    parsed = raw.with_row_index("line", offset=2).with_columns(
        pl.col("Date").str.strptime(pl.Date, "%Y-%m-%d", strict=False).alias("date"),
        pl.col("Value").str.strip_chars().cast(pl.Float64, strict=False).alias("value"),
    )
    checks = [
        (pl.col("League").is_null() | (pl.col("League").str.strip_chars() == ""), "empty League"),
        (pl.col("date").is_null() | ~pl.col("Date").str.contains(r"^\d{4}-\d{2}-\d{2}$"),
         "bad Date (expected YYYY-MM-DD)"),
        (pl.col("Get").is_null() | (pl.col("Get").str.strip_chars() == ""), "empty Get"),
        (pl.col("Pay").is_null() | (pl.col("Pay").str.strip_chars() == ""), "empty Pay"),
        (pl.col("value").is_null() | ~pl.col("value").is_finite() | (pl.col("value") <= 0),
         "bad Value (expected a positive number)"),
        (~pl.col("Confidence").is_in(CONFIDENCE_LEVELS) | pl.col("Confidence").is_null(),
         f"unknown Confidence (expected one of {', '.join(CONFIDENCE_LEVELS)})"),
        ((pl.col("Get") != CHAOS) & (pl.col("Pay") != CHAOS), "neither Get nor Pay is Chaos Orb"),
    ]
    for condition, reason in checks:
        bad = parsed.filter(condition)
        if bad.height:
            row = bad.row(0, named=True)
            shown = ";".join("" if row[c] is None else str(row[c]) for c in DUMP_HEADER)
            raise DumpFormatError(path, row["line"], f"{reason}: {shown!r}")

    names = pl.concat([parsed["Get"], parsed["Pay"]]).unique()
    mapping = {n: canonical_currency_name(n) for n in names.to_list()}
    return parsed.select(
        pl.col("League").alias("league"),
        "date",
        pl.col("Get").replace_strict(mapping).alias("get"),
        pl.col("Pay").replace_strict(mapping).alias("pay"),
        "value",
        pl.col("Confidence").alias("confidence"),
    )


def chaos_prices_from_dump_rows(rows: pl.DataFrame) -> pl.DataFrame:
    """One chaos price per (league, currency, date) from raw dump rows.

    The ``X -> Chaos`` row is the price; where it is missing, the other side of
    the market (1 / units-per-chaos) stands in. Both sides are kept as columns.
    """
    direct = rows.filter(pl.col("pay") == CHAOS).select(
        "league", "date", pl.col("get").alias("currency"),
        pl.col("value").alias("direct_price"), pl.col("confidence").alias("direct_confidence"),
    )
    reverse = rows.filter(pl.col("get") == CHAOS).select(
        "league", "date", pl.col("pay").alias("currency"),
        (1.0 / pl.col("value")).alias("reverse_price_chaos"), pl.col("confidence").alias("reverse_confidence"),
    )
    both = direct.join(reverse, on=["league", "currency", "date"], how="full", coalesce=True)
    return both.select(
        "league", "currency", "date",
        pl.coalesce("direct_price", "reverse_price_chaos").alias("price_chaos"),
        pl.coalesce("direct_confidence", "reverse_confidence").alias("confidence"),
        pl.when(pl.col("direct_price").is_null()).then(pl.lit("reverse")).otherwise(pl.lit("direct"))
        .alias("price_side"),
        "reverse_price_chaos",
    ).sort("league", "currency", "date")


# --- the currencyoverview API, an optional second live source ---------------------------------

NINJA_BASE_URL = "https://poe.ninja"


class OverviewFormatError(ValueError):
    pass


@dataclass
class NinjaOverviewClient:
    """``GET /api/data/currencyoverview?league=L&type=Currency|Fragment``."""

    base_url: str = NINJA_BASE_URL
    timeout: tuple[float, float] = (5.0, 30.0)
    session: requests.Session | None = None

    def fetch(self, league: str, kind: str = "Currency") -> dict:
        session = self.session or requests.Session()
        response = session.get(
            f"{self.base_url.rstrip('/')}/api/data/currencyoverview",
            params={"league": league, "type": kind},
            timeout=self.timeout,
        )
        response.raise_for_status()
        try:
            return response.json()
        except ValueError as exc:
            raise OverviewFormatError(f"poe.ninja currencyoverview for {league!r} is not JSON: {exc}") from None


def _finite(value) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def parse_currency_overview(payload: dict, league: str) -> pl.DataFrame:
    """Flatten a ``currencyoverview`` response into one row per currency.

    ``receive.value`` is chaos per unit; ``pay.value`` is units per chaos, so its
    inverse is the other side's chaos price.
    """
    if not isinstance(payload, dict) or not isinstance(payload.get("lines"), list):
        raise OverviewFormatError("currencyoverview response has no 'lines' list")
    rows = []
    for line in payload["lines"]:
        name = line.get("currencyTypeName")
        if not isinstance(name, str) or not name.strip():
            continue
        receive = line.get("receive") or {}
        pay = line.get("pay") or {}
        pay_value = _finite(pay.get("value"))
        rows.append({
            "league": league,
            "currency": canonical_currency_name(name),
            "details_id": line.get("detailsId"),
            "chaos_equivalent": _finite(line.get("chaosEquivalent")),
            "receive_chaos": _finite(receive.get("value")),
            "pay_chaos": 1.0 / pay_value if pay_value else None,
            "receive_count": receive.get("count"),
            "pay_count": pay.get("count"),
            "listing_count": (receive.get("listing_count") or 0) + (pay.get("listing_count") or 0)
            if ("listing_count" in receive or "listing_count" in pay) else None,
            "sample_time_utc": receive.get("sample_time_utc") or pay.get("sample_time_utc"),
        })
    schema = {
        "league": pl.Utf8, "currency": pl.Utf8, "details_id": pl.Utf8, "chaos_equivalent": pl.Float64,
        "receive_chaos": pl.Float64, "pay_chaos": pl.Float64, "receive_count": pl.Int64,
        "pay_count": pl.Int64, "listing_count": pl.Int64, "sample_time_utc": pl.Utf8,
    }
    return pl.DataFrame(rows, schema=schema)

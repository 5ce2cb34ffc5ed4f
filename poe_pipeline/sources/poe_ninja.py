"""poe.ninja: the per-league daily dumps (history) and the ``currencyoverview`` API.

A dump row ``Get=X;Pay=Chaos Orb;Value=v`` means X costs v chaos. The other side
of the market, ``Get=Chaos Orb;Pay=X;Value=w``, means one chaos buys w of X.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
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


DUMP_QUIRK_SCHEMA = {"line": pl.Int64, "reason": pl.Utf8, "record_json": pl.Utf8}
ABSURD_FACTOR = 1000.0  # a value this far from its pair's median in the league is a typo or an overflow, not a price


@dataclass
class ParsedDump:
    """A dump's usable rows (``RAW_DUMP_SCHEMA``) and its quirky rows, each with its line and reason."""

    rows: pl.DataFrame
    quirks: pl.DataFrame  # DUMP_QUIRK_SCHEMA


def _open_text(path: Path):
    opener = gzip.open if path.name.endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8", newline="")


def _read_text(path: Path) -> str:
    """The whole file as text; a corrupt gzip or a binary file is a ``DumpFormatError``, never a raw traceback."""
    try:
        with _open_text(path) as fh:
            return fh.read()
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:
        what = "a corrupt or truncated gzip file" if path.name.endswith(".gz") else "not UTF-8 text"
        raise DumpFormatError(path, None, f"{what} ({type(exc).__name__}: {exc})") from None


def _first_ragged_line(text: str) -> tuple[int, str] | None:
    for number, line in enumerate(text.splitlines(), 1):
        if line and line.count(";") != len(DUMP_HEADER) - 1:
            return number, line
    return None


def parse_dump(path: Path, now: datetime | None = None) -> ParsedDump:
    """Parse and validate one dump.

    A structural problem (header or delimiter, a ragged line, a non-numeric Value, a bad date or confidence, a
    corrupt file) raises ``DumpFormatError`` naming ``file:line``. A row that is well formed but not a usable
    price is a quirk: a zero or negative Value (poe.ninja rounds the inverse side of a very expensive currency to
    0), a non-finite Value, one more than ``ABSURD_FACTOR`` times away from its pair's median in the league, a
    duplicate row, a date after ``now``. Quirks are returned apart, and the rest of the file is kept.
    """
    path = Path(path)
    text = _read_text(path)
    header = text.split("\n", 1)[0].rstrip("\r").split(";")
    if header != DUMP_HEADER:
        raise DumpFormatError(path, 1, f"header is {';'.join(header)!r}, expected {';'.join(DUMP_HEADER)!r}")
    ragged = _first_ragged_line(text)
    if ragged:
        raise DumpFormatError(path, ragged[0], f"expected {len(DUMP_HEADER)} ';'-separated fields: {ragged[1]!r}")
    try:
        raw = pl.read_csv(io.StringIO(text), separator=";", infer_schema=False, has_header=True, quote_char=None)
    except (pl.exceptions.ComputeError, pl.exceptions.NoDataError) as exc:
        raise DumpFormatError(path, None, f"not a ';'-separated CSV ({exc})") from None
    if raw.height == 0:
        raise DumpFormatError(path, None, "no rows")

    parsed = raw.with_row_index("line", offset=2).with_columns(
        pl.col("line").cast(pl.Int64),
        pl.col("Date").str.strptime(pl.Date, "%Y-%m-%d", strict=False).alias("date"),
        pl.col("Value").str.strip_chars().cast(pl.Float64, strict=False).alias("value"),
    )
    structural = [
        (pl.col("League").is_null() | (pl.col("League").str.strip_chars() == ""), "empty League"),
        (pl.col("date").is_null() | ~pl.col("Date").str.contains(r"^\d{4}-\d{2}-\d{2}$"),
         "bad Date (expected YYYY-MM-DD)"),
        (pl.col("Get").is_null() | (pl.col("Get").str.strip_chars() == ""), "empty Get"),
        (pl.col("Pay").is_null() | (pl.col("Pay").str.strip_chars() == ""), "empty Pay"),
        (pl.col("value").is_null(), "bad Value (expected a number)"),
        (~pl.col("Confidence").is_in(CONFIDENCE_LEVELS) | pl.col("Confidence").is_null(),
         f"unknown Confidence (expected one of {', '.join(CONFIDENCE_LEVELS)})"),
    ]
    for condition, reason in structural:
        bad = parsed.filter(condition)
        if bad.height:
            row = bad.row(0, named=True)
            raise DumpFormatError(path, row["line"], f"{reason}: {_shown(row)!r}")

    today = (now or datetime.now(UTC)).astimezone(UTC).date()
    value = pl.col("value")
    usable = value.is_finite() & (value > 0)
    pair = ["League", "Get", "Pay"]
    median = value.filter(usable).median().over(pair)
    quirks = [
        (value.is_nan(), pl.lit("Value is not a number (NaN)")),
        (value.is_infinite(), pl.lit("Value is infinite")),
        (value <= 0, pl.lit("Value is zero or negative (poe.ninja rounds a tiny inverse price to 0)")),
        (usable & ((value / median).log().abs() > math.log(ABSURD_FACTOR)),
         pl.format("Value {} is more than {}x away from this pair's median {} in the league",
                   value, pl.lit(int(ABSURD_FACTOR)), median.round_sig_figs(4))),
        ((pl.col("Get") != CHAOS) & (pl.col("Pay") != CHAOS), pl.lit("neither Get nor Pay is Chaos Orb")),
        (pl.col("date") > today, pl.format("Date is after the import day {}", pl.lit(str(today)))),
        (pl.int_range(pl.len()).over([*pair, "Date"]) > 0,
         pl.format("duplicate of line {}", pl.col("line").first().over([*pair, "Date"]))),
    ]
    reason = pl.coalesce([pl.when(failed).then(text) for failed, text in quirks])
    flagged = parsed.with_columns(reason.alias("_quirk"))
    bad = flagged.filter(pl.col("_quirk").is_not_null())
    quirk_rows = bad.select(
        "line",
        pl.col("_quirk").alias("reason"),
        pl.struct(DUMP_HEADER).struct.json_encode().alias("record_json"),
    )
    good = flagged.filter(pl.col("_quirk").is_null())

    names = pl.concat([good["Get"], good["Pay"]]).unique()
    mapping = {n: canonical_currency_name(n) for n in names.to_list()}
    rows = good.select(
        pl.col("League").alias("league"),
        "date",
        pl.col("Get").replace_strict(mapping, return_dtype=pl.Utf8).alias("get"),
        pl.col("Pay").replace_strict(mapping, return_dtype=pl.Utf8).alias("pay"),
        "value",
        pl.col("Confidence").alias("confidence"),
    )
    return ParsedDump(rows, quirk_rows.cast(DUMP_QUIRK_SCHEMA))


def _shown(row: dict) -> str:
    return ";".join("" if row[c] is None else str(row[c]) for c in DUMP_HEADER)


def read_dump(path: Path) -> pl.DataFrame:
    """A dump's usable rows with canonical currency names (``RAW_DUMP_SCHEMA``); quirky rows left out.
    Raises ``DumpFormatError`` naming the first structurally bad line."""
    return parse_dump(path).rows


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

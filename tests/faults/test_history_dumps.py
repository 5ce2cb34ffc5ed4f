"""Faults in poe.ninja dumps: quirky rows are quarantined and the rest imported, a structurally bad file is rejected
by file and line while the others import, and a corrected dump replaces a bad one."""

from __future__ import annotations

import gzip
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from conftest import SAMPLE
from poe_pipeline.history import find_dumps, import_dumps, read_history
from poe_pipeline.prices import read_daily_prices, refresh_daily_prices
from poe_pipeline.sources.poe_ninja import parse_dump
from poe_pipeline.warehouse import query, sync_views

IMPORT_TIME = datetime(2026, 11, 30, 12, tzinfo=UTC)


def _lines(league: str) -> list[str]:
    return gzip.decompress((SAMPLE / f"{league}.currency.csv.gz").read_bytes()).decode().splitlines()


def _write(folder: Path, name: str, lines: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _line_of(lines: list[str], *needles: str) -> int:
    """1-based line number of the first line holding every needle."""
    return next(i for i, line in enumerate(lines, 1) if all(n in line for n in needles))


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


# --- row quirks: quarantined with file, line and reason; the rest of the dump is imported ----------------------


def _quirky_sanctum() -> tuple[list[str], dict[str, int]]:
    """Sanctum's real dump with one row of each quirk, as newer poe.ninja dumps carry them."""
    lines = _lines("Sanctum")
    at = {}
    # The inverse side of a very expensive currency, rounded to 0 (the row that stopped the pipeline).
    mirror = _line_of(lines, ";2023-02-15;Chaos Orb;Mirror of Kalandra;")
    lines[mirror - 1] = lines[mirror - 1].rsplit(";", 2)[0] + ";0;High"
    at["zero"] = mirror
    divine = _line_of(lines, ";2023-01-10;Divine Orb;Chaos Orb;")
    lines[divine - 1] = lines[divine - 1].rsplit(";", 2)[0] + ";1e308;High"
    at["absurd"] = divine
    exalt = _line_of(lines, ";2023-01-11;Exalted Orb;Chaos Orb;")
    lines[exalt - 1] = lines[exalt - 1].rsplit(";", 2)[0] + ";inf;High"
    at["infinite"] = exalt
    lines.append(lines[divine])  # the next Divine row, again
    at["duplicate"] = len(lines)
    lines.append("Sanctum;2099-01-01;Divine Orb;Chaos Orb;250;High")
    at["future"] = len(lines)
    negative = _line_of(lines, ";2023-01-12;Orb of Fusing;Chaos Orb;")
    lines[negative - 1] = lines[negative - 1].rsplit(";", 2)[0] + ";-3;High"
    at["negative"] = negative
    return lines, at


def test_quirky_rows_are_quarantined_with_their_line_and_reason(lake, tmp_path):
    lines, at = _quirky_sanctum()
    dump = _write(tmp_path / "history", "Sanctum.currency.csv", lines)
    parsed = parse_dump(dump, now=IMPORT_TIME)
    reasons = dict(zip(parsed.quirks["line"].to_list(), parsed.quirks["reason"].to_list(), strict=True))
    assert "zero or negative" in reasons[at["zero"]]
    assert "zero or negative" in reasons[at["negative"]]
    assert "more than 1000x away" in reasons[at["absurd"]]
    assert "infinite" in reasons[at["infinite"]]
    assert reasons[at["duplicate"]] == f"duplicate of line {at['absurd'] + 1}"
    assert "after the import day 2026-11-30" in reasons[at["future"]]
    # the real dump's own absurd rows (99999 chaos per Infused Engineer's Orb, ...) go too, and nothing else
    assert len(reasons) == len(at) + parse_dump(SAMPLE / "Sanctum.currency.csv.gz").quirks.height
    assert parsed.rows.height == len(lines) - 1 - len(reasons)

    report = import_dumps(lake, find_dumps([tmp_path / "history"]), now=IMPORT_TIME)
    assert report.imported == ["Sanctum.currency.csv"] and not report.rejected
    assert report.quarantined == {"Sanctum.currency.csv": len(reasons)}
    refresh_daily_prices(lake)
    sync_views(lake)
    stored = query(lake, "SELECT reason, record_json, source_file, line FROM quarantine "
                         "WHERE source = 'poe_ninja_dump' ORDER BY line")
    assert stored.height == len(reasons)
    zero = stored.filter(pl.col("line") == at["zero"]).row(0, named=True)
    assert zero["reason"].startswith(f"Sanctum.currency.csv:{at['zero']}: Value is zero")
    assert json.loads(zero["record_json"])["Pay"] == "Mirror of Kalandra"

    prices = read_daily_prices(lake).filter(pl.col("league") == "Sanctum")
    divine = prices.filter(pl.col("currency") == "Divine Orb")
    assert divine["price_chaos"].max() < 1000 and divine["date"].max() < datetime(2099, 1, 1).date()
    # the Mirror's price still comes from its own side of the market
    mirror = prices.filter(pl.col("currency") == "Mirror of Kalandra")
    assert mirror.height > 50 and mirror["price_chaos"].min() > 1000


# --- structural errors: that file is rejected by file:line, the others still import ---------------------------


@pytest.mark.parametrize(
    ("name", "content", "where"),
    [
        ("Kalandra.currency.csv.gz", b"\x1f\x8b\x08\x00" + b"\x00" * 40, "Kalandra.currency.csv.gz: a corrupt"),
        ("Kalandra.currency.csv", bytes(range(256)) * 4, "Kalandra.currency.csv: not UTF-8"),
        ("Kalandra.currency.csv", "ragged", "Kalandra.currency.csv:5: expected 6 ';'-separated fields"),
        ("Kalandra.currency.csv", "comma", "Kalandra.currency.csv:1: header is"),
        ("Kalandra.currency.csv", "letters", "Kalandra.currency.csv:7: bad Value (expected a number)"),
    ],
)
def test_a_structurally_bad_file_is_rejected_and_the_others_still_import(lake, tmp_path, name, content, where):
    folder = tmp_path / "history"
    folder.mkdir()
    shutil.copy(SAMPLE / "Archnemesis.currency.csv.gz", folder)  # sorted before the bad file
    shutil.copy(SAMPLE / "Sentinel.currency.csv.gz", folder)  # sorted after it
    lines = _lines("Kalandra")
    if content == "ragged":
        lines[4] = lines[4] + ";extra"
    elif content == "comma":
        lines = [line.replace(";", ",") for line in lines]
    elif content == "letters":
        lines[6] = lines[6].rsplit(";", 2)[0] + ";twelve;High"
    if isinstance(content, bytes):
        (folder / name).write_bytes(content)
    else:
        _write(folder, name, lines)

    report = import_dumps(lake, find_dumps([folder]))
    assert sorted(report.imported) == ["Archnemesis.currency.csv.gz", "Sentinel.currency.csv.gz"]
    assert list(report.rejected) == [name]
    assert report.rejected[name].startswith(f"Malformed poe.ninja dump {where}")
    assert set(read_history(lake)["league"].unique()) == {"Archnemesis", "Sentinel"}


# --- a corrected dump replaces the earlier import --------------------------------------------------------------


def test_reimporting_a_corrected_dump_replaces_the_bad_one(lake, tmp_path):
    clean = tmp_path / "clean"
    clean.mkdir()
    shutil.copy(SAMPLE / "Sentinel.currency.csv.gz", clean)
    import_dumps(lake, find_dumps([clean]))
    good = read_history(lake)

    lines = _lines("Sentinel")
    row = _line_of(lines, ";Divine Orb;Chaos Orb;")
    lines[row - 1] = lines[row - 1].rsplit(";", 2)[0] + ";999;High"  # a wrong value, not absurd enough to catch
    bad_dir = tmp_path / "bad"
    _write(bad_dir, "Sentinel.currency.csv", lines)
    bad_report = import_dumps(lake, find_dumps([bad_dir]))
    assert bad_report.imported == ["Sentinel.currency.csv"]
    assert read_history(lake).filter(pl.col("value") == 999).height == 1

    again = import_dumps(lake, find_dumps([clean]))
    assert again.imported == ["Sentinel.currency.csv.gz"]
    assert len(again.replaced["Sentinel.currency.csv.gz"]) == 1
    assert read_history(lake).select(good.columns).equals(good)  # exactly the clean rows again
    # nothing was deleted: the bad import is kept in the raw area, out of the way
    assert len(list(lake.poe_ninja_superseded.rglob("*.parquet"))) == 1
    before = _tree(lake.root)
    assert import_dumps(lake, find_dumps([clean])).already_imported == ["Sentinel.currency.csv.gz"]
    assert _tree(lake.root) == before

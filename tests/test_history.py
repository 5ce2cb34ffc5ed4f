"""Importing poe.ninja dumps: exact format, idempotent, malformed files rejected by name and line."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import polars as pl
import pytest

from conftest import SAMPLE
from poe_pipeline.history import find_dumps, import_dumps, read_history
from poe_pipeline.prices import daily_from_dump_rows, merge_daily_prices
from poe_pipeline.sources.poe_ninja import DumpFormatError, read_dump


def _snapshot_tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_import_twice_changes_nothing(lake):
    first = import_dumps(lake, find_dumps([SAMPLE]))
    assert len(first.imported) == 6 and not first.rejected
    before = _snapshot_tree(lake.root)
    second = import_dumps(lake, find_dumps([SAMPLE]))
    assert second.imported == [] and len(second.already_imported) == 6
    assert _snapshot_tree(lake.root) == before
    rows = read_history(lake)
    assert rows.height == first.rows_imported
    assert rows.select("league", "date", "get", "pay").is_duplicated().sum() == 0


def test_both_sides_of_the_market(lake):
    rows = read_dump(SAMPLE / "Kalandra.currency.csv.gz")
    prices = daily_from_dump_rows(rows).filter(pl.col("currency") == "Divine Orb")
    day = prices.filter(pl.col("date") == pl.date(2022, 8, 30)).row(0, named=True)
    # README: the Kalandra dump gives Divine on 2022-08-30 as 170; 1 chaos buys 0.00587 Divine on the other side.
    assert day["price_chaos"] == pytest.approx(170.0)
    assert day["reverse_price_chaos"] == pytest.approx(1 / 0.00587)
    assert day["source"] == "poe_ninja_dump"


def test_reverse_side_fills_a_missing_direct_price():
    text = (
        "League;Date;Get;Pay;Value;Confidence\n"
        "X;2022-01-01;Chaos Orb;Orb of Fusing;4;High\n"
        "X;2022-01-01;Divine Orb;Chaos Orb;200;High\n"
    )
    import io

    rows = pl.read_csv(io.StringIO(text), separator=";", try_parse_dates=True).rename(str.lower)
    prices = merge_daily_prices(daily_from_dump_rows(rows))
    fusing = prices.filter(pl.col("currency") == "Orb of Fusing").row(0, named=True)
    assert fusing["price_chaos"] == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("mutate", "line", "reason"),
    [
        (lambda lines: ["League,Date,Get,Pay,Value,Confidence", *lines[1:]], 1, "header"),
        (lambda lines: [*lines[:5], lines[5].rsplit(";", 2)[0] + ";12,5;High", *lines[6:]], 6, "bad Value"),
        (lambda lines: [*lines[:3], lines[3].rsplit(";", 1)[0] + ";Certain", *lines[4:]], 4, "Confidence"),
        (lambda lines: [*lines[:7], lines[7].replace("2022-", "22-", 1), *lines[8:]], 8, "bad Date"),
    ],
)
def test_malformed_dump_is_rejected_with_file_and_line(lake, tmp_path, mutate, line, reason):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(SAMPLE / "Sentinel.currency.csv.gz", inbox)
    assert import_dumps(lake, find_dumps([inbox])).imported == ["Sentinel.currency.csv.gz"]
    stored_before = _snapshot_tree(lake.root)

    good = gzip.decompress((SAMPLE / "Kalandra.currency.csv.gz").read_bytes()).decode().splitlines()
    bad = inbox / "Kalandra.currency.csv"
    bad.write_text("\n".join(mutate(good)) + "\n")
    with pytest.raises(DumpFormatError, match=rf"Kalandra\.currency\.csv:{line}: .*{reason}"):
        read_dump(bad)

    report = import_dumps(lake, find_dumps([inbox]))
    assert list(report.rejected) == ["Kalandra.currency.csv"]
    assert f"Kalandra.currency.csv:{line}" in report.rejected["Kalandra.currency.csv"]
    assert _snapshot_tree(lake.root) == stored_before  # nothing stored was touched, nothing half-written added

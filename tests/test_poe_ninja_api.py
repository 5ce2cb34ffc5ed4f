"""The optional second live source, poe.ninja currencyoverview, against real saved responses."""

from __future__ import annotations

import gzip
import json

import polars as pl
import pytest

from conftest import NINJA_API
from poe_pipeline.sources.poe_ninja import NinjaOverviewClient, OverviewFormatError, parse_currency_overview


def _response(name: str) -> dict:
    return json.loads(gzip.decompress((NINJA_API / f"{name}.gz").read_bytes()))


def test_parse_real_kalandra_overview_agrees_with_the_dump():
    payload = _response("kalandra-2022-08-30.currencyoverview.json")
    rows = parse_currency_overview(payload, "Kalandra")
    assert rows.height == len(payload["lines"])
    divine = rows.filter(pl.col("currency") == "Divine Orb").row(0, named=True)
    assert divine["chaos_equivalent"] == pytest.approx(171.04)
    assert 165 < divine["receive_chaos"] < 180  # the dump says 170 that day
    assert divine["listing_count"] > 0


@pytest.mark.parametrize("name", sorted(p.name.removesuffix(".gz")
                                        for p in NINJA_API.glob("*.currencyoverview.json.gz")))
def test_every_saved_response_parses(name):
    payload = _response(name)
    rows = parse_currency_overview(payload, name.split("-")[0])
    assert rows.height > 50
    assert rows["currency"].null_count() == 0


def test_client_over_real_http(httpserver):
    payload = _response("ritual-2021-02-22.currencyoverview.json")
    httpserver.expect_request(
        "/api/data/currencyoverview", query_string={"league": "Ritual", "type": "Currency"}
    ).respond_with_json(payload)
    client = NinjaOverviewClient(base_url=httpserver.url_for("/"))
    rows = parse_currency_overview(client.fetch("Ritual"), "Ritual")
    assert "Exalted Orb" in rows["currency"].to_list()


def test_client_rejects_non_json(httpserver):
    httpserver.expect_request("/api/data/currencyoverview").respond_with_data("<html>oops</html>")
    with pytest.raises(OverviewFormatError, match="not JSON"):
        NinjaOverviewClient(base_url=httpserver.url_for("/")).fetch("Ritual")

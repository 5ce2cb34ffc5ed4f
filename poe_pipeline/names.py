"""One canonical name per currency, shared by poe.watch and poe.ninja.

Names are normalised (Unicode quotes, spacing) and then mapped through
``currency_aliases.csv``, which lists spellings that other sources or older
leagues use for the same item.
"""

from __future__ import annotations

import csv
import re
import unicodedata
from functools import cache
from pathlib import Path

ALIASES_FILE = Path(__file__).with_name("currency_aliases.csv")
_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'", "\u00b4": "'"})
_SPACES = re.compile(r"\s+")


def _normalise(name: str) -> str:
    name = unicodedata.normalize("NFKC", name).translate(_QUOTES)
    return _SPACES.sub(" ", name).strip()


@cache
def aliases() -> dict[str, str]:
    """Lower-cased alias -> canonical name."""
    with ALIASES_FILE.open(newline="", encoding="utf-8") as fh:
        return {_normalise(r["alias"]).casefold(): _normalise(r["canonical"]) for r in csv.DictReader(fh)}


def canonical_currency_name(name: str) -> str:
    """The canonical name of a currency, e.g. ``"Jeweler's Orb"`` -> ``"Jeweller's Orb"``."""
    cleaned = _normalise(name)
    return aliases().get(cleaned.casefold(), cleaned)


def slug(name: str) -> str:
    """A file- and registry-safe slug: ``"Orb of Fusing"`` -> ``"orb-of-fusing"``."""
    return re.sub(r"[^a-z0-9]+", "-", canonical_currency_name(name).casefold()).strip("-")

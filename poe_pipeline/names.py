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


# --- league names that become paths -----------------------------------------------------------------------------

MAX_LEAGUE_NAME = 64
# Letters, digits, spaces and the punctuation real league names use ("Incursion Event HC (IRE002)"); it starts with a
# letter or digit (no leading dot, space or dash) and ends with neither a space nor a dot.
_LEAGUE_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9 ()'.,_-]*[A-Za-z0-9()'_-])?")
LEAGUE_NAME_RULE = (
    f"1 to {MAX_LEAGUE_NAME} letters, digits, spaces and ()-'.,_ starting with a letter or digit, "
    "with no '..' and no path separator, e.g. 'Sanctum' or 'Synthesis Event (SRE001)'"
)


class InvalidLeagueNameError(ValueError):
    """A league name that could escape the lake (or is not a league name at all)."""


def check_league_name(name: object, source: str = "") -> str:
    """``name`` unchanged if it is safe to use as a path component, else ``InvalidLeagueNameError``.

    League names come from outside (poe.watch ``/leagues``, ``POE_LEAGUE``, dump file names) and end up in paths,
    so an allow-list rather than a deny-list: ``../../x`` or ``a/b`` can never pass. ``source`` says where the name
    came from, for the error message.
    """
    ok = (
        isinstance(name, str)
        and len(name) <= MAX_LEAGUE_NAME
        and ".." not in name
        and _LEAGUE_NAME.fullmatch(name) is not None
    )
    if not ok:
        shown = repr(name) if not isinstance(name, str) or len(name) <= 80 else repr(name[:80]) + "..."
        where = f" from {source}" if source else ""
        raise InvalidLeagueNameError(
            f"Invalid league name {shown}{where}: a league name is {LEAGUE_NAME_RULE}; "
            "pass the league's real name (POE_LEAGUE, --league or the dump's file name)"
        )
    return name

"""Where the lake lives and the training profiles."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

LAKE_ENV = "POE_DATA_LAKE"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LAKE = REPO_ROOT / "data_lake"
BUNDLED_SAMPLE = REPO_ROOT / "sample_data"
HORIZONS_DAYS = (1, 3, 7)


def resolve_lake_root(explicit: str | os.PathLike | None = None) -> Path:
    """The lake root: ``--lake`` beats ``POE_DATA_LAKE``, which beats ``data_lake/``."""
    if explicit:
        return Path(explicit).expanduser().resolve()
    if os.environ.get(LAKE_ENV):
        return Path(os.environ[LAKE_ENV]).expanduser().resolve()
    return DEFAULT_LAKE


@dataclass(frozen=True)
class Profile:
    """Training effort, chosen by name (test, dev, prod). Who gets a forecast is ``universe.UniverseRules``."""

    name: str
    optuna_trials: int
    cv_folds: int
    early_stopping_rounds: int

    def as_dict(self) -> dict:
        return asdict(self)


PROFILES: dict[str, Profile] = {
    "test": Profile("test", optuna_trials=3, cv_folds=2, early_stopping_rounds=10),
    "dev": Profile("dev", optuna_trials=50, cv_folds=3, early_stopping_rounds=30),
    "prod": Profile("prod", optuna_trials=200, cv_folds=5, early_stopping_rounds=50),
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"Unknown profile {name!r}: choose one of {', '.join(PROFILES)}") from None

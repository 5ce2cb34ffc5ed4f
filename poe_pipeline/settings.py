"""The project's settings: where the lake lives, the training profiles, and every environment variable.

This module is the only place that reads the environment (``Settings.from_env``); everything else receives values.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

LAKE_ENV = "POE_DATA_LAKE"
DEFAULT_PROFILE = "test"  # tests and the demo; the weekly retrain uses RETRAIN_PROFILE
RETRAIN_PROFILE = "prod"
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
    # 20, not 200: replayed on Scourge and Sentinel, 50 trials on 3 folds scored no better than 3 trials on 2 (README,
    # "Does more tuning earn skill?"), and 200 would take a league's first retrain to about 5 hours on 2 cores
    "prod": Profile("prod", optuna_trials=20, cv_folds=5, early_stopping_rounds=50),
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"Unknown profile {name!r}: choose one of {', '.join(PROFILES)}") from None


def _float(name: str) -> float | None:
    raw = os.environ.get(name, "")
    try:
        return float(raw) if raw else None
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a number, e.g. 1.5") from None


def _int(name: str, minimum: int = 1) -> int | None:
    raw = os.environ.get(name, "")
    try:
        value = int(raw) if raw else None
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a whole number, e.g. 4") from None
    if value is not None and value < minimum:
        raise ValueError(f"{name}={value}: expected {minimum} or more")
    return value


@dataclass(frozen=True)
class Settings:
    """Every setting that comes from the environment, read once (``from_env``). An empty string or None means
    "not set": the default then lives with the code that uses it (``monitoring.DegradationRules``, ``quality``)."""

    lake_root: Path
    history_dirs: tuple[str, ...] = ()  # POE_HISTORY_DIR, os.pathsep-separated
    league: str = ""  # POE_LEAGUE: pin the league; empty: the newest in the data (and poe.watch's active one)
    profile: str = DEFAULT_PROFILE  # POE_PROFILE
    retrain_profile: str = RETRAIN_PROFILE  # POE_RETRAIN_PROFILE: the weekly retrain's profile
    retrain_shards: int = 1  # POE_RETRAIN_SHARDS: split the weekly retrain into N runs for a cluster
    poe_watch_url: str = ""  # POE_WATCH_URL: empty, the live API
    webhook_configured: bool = False  # POE_ALERT_WEBHOOK_URL is set (a secret: read through dg.EnvVar)
    dagster_url: str = ""  # POE_DAGSTER_URL: the UI's address, for links in alerts
    mlflow_url: str = ""  # POE_MLFLOW_URL: the MLflow UI's address, for links in the Dagster UI
    tracking_uri: str = ""  # MLFLOW_TRACKING_URI: an MLflow server; empty, SQLite under the lake
    degradation_factor: float | None = None  # POE_DEGRADATION_FACTOR
    degradation_window_days: int | None = None  # POE_DEGRADATION_WINDOW_DAYS
    degradation_min_errors: int | None = None  # POE_DEGRADATION_MIN_ERRORS
    retrain_cooldown_hours: float | None = None  # POE_RETRAIN_COOLDOWN_HOURS
    jump_factor: float | None = None  # POE_JUMP_FACTOR: the day-over-day jump check's factor
    track_record_days: int | None = None  # POE_TRACK_RECORD_DAYS: days advice_outcomes replays where no report is
    dagster_home: str = ""  # DAGSTER_HOME: Dagster's instance folder; empty, <lake>/.dagster

    @classmethod
    def from_env(cls, lake: str | os.PathLike | None = None) -> Settings:
        env = os.environ
        history = env.get("POE_HISTORY_DIR", "")
        return cls(
            lake_root=resolve_lake_root(lake),
            history_dirs=tuple(d for d in history.split(os.pathsep) if d),
            league=env.get("POE_LEAGUE", ""),
            profile=get_profile(env.get("POE_PROFILE") or DEFAULT_PROFILE).name,
            retrain_profile=get_profile(env.get("POE_RETRAIN_PROFILE") or RETRAIN_PROFILE).name,
            retrain_shards=_int("POE_RETRAIN_SHARDS") or 1,
            poe_watch_url=env.get("POE_WATCH_URL", ""),
            webhook_configured=bool(env.get(WEBHOOK_ENV)),
            dagster_url=env.get("POE_DAGSTER_URL", ""),
            mlflow_url=env.get("POE_MLFLOW_URL", ""),
            tracking_uri=env.get("MLFLOW_TRACKING_URI", ""),
            degradation_factor=_float("POE_DEGRADATION_FACTOR"),
            degradation_window_days=_int("POE_DEGRADATION_WINDOW_DAYS"),
            degradation_min_errors=_int("POE_DEGRADATION_MIN_ERRORS"),
            retrain_cooldown_hours=_float("POE_RETRAIN_COOLDOWN_HOURS"),
            jump_factor=_float("POE_JUMP_FACTOR"),
            track_record_days=_int("POE_TRACK_RECORD_DAYS", minimum=0),
            dagster_home=env.get("DAGSTER_HOME", ""),
        )


WEBHOOK_ENV = "POE_ALERT_WEBHOOK_URL"

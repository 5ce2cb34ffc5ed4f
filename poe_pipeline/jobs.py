"""Jobs, and the in-process run behind ``poe-pipeline run`` (the same definitions the UI uses)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import polars as pl

from poe_pipeline.assets import ingestion, prices
from poe_pipeline.lake import Lake
from poe_pipeline.markdown import markdown_table
from poe_pipeline.resources import LakeResource, PoeWatchResource, RunScopeResource

ASSET_MODULES = [ingestion, prices]
ALL_ASSETS = dg.load_assets_from_modules(ASSET_MODULES)
# Everything but the live poll: an offline run works on the history it is given.
OFFLINE_SELECTION = dg.AssetSelection.all() - dg.AssetSelection.groups("ingestion")

ingestion_job = dg.define_asset_job(
    "ingestion_job",
    selection=dg.AssetSelection.assets(ingestion.price_snapshots),
    tags={"poe/queue": "ingestion"},
    description="One poll of the live API into the lake.",
)


def run_pipeline(
    lake_root: Path, history_dirs: list[Path], league: str, currencies: list[str], profile: str
) -> str:
    """Materialize the offline graph in-process on the lake's Dagster instance; returns a text summary."""
    resources = {
        "lake": LakeResource(root=str(lake_root)),
        "poe_watch": PoeWatchResource(),
        "run_scope": RunScopeResource(
            history_dirs=[str(d) for d in history_dirs], league=league, currencies=currencies, profile=profile
        ),
    }
    with dg.DagsterInstance.get() as instance:
        result = dg.materialize(
            ALL_ASSETS,
            selection=OFFLINE_SELECTION,
            resources=resources,
            instance=instance,
            tags={"poe/league": league, "poe/profile": profile, "poe/source": "cli"},
            run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
            raise_on_error=False,
        )
    if not result.success:
        failures = [e.message for e in result.all_events if e.is_step_failure]
        raise SystemExit("poe-pipeline run failed:\n  " + "\n  ".join(failures or ["see the log above"]))
    return summarize(Lake(lake_root), league)


def summarize(lake: Lake, league: str) -> str:
    from poe_pipeline.warehouse import query

    per_league = query(
        lake,
        """
        SELECT league, min(date) AS first_day, max(date) AS last_day, count(DISTINCT currency) AS currencies,
               count(*) AS rows,
               round(arg_max(price_chaos, date) FILTER (WHERE currency = 'Divine Orb'), 1) AS divine_orb_close
        FROM daily_prices GROUP BY league ORDER BY first_day
        """,
    )
    last_week = query(
        lake,
        """
        SELECT date, currency, round(price_chaos, 2) AS price_chaos, confidence, source FROM daily_prices
        WHERE league = ? AND currency IN ('Divine Orb', 'Exalted Orb', 'Orb of Annulment', 'Mirror of Kalandra')
          AND date > (SELECT max(date) - 3 FROM daily_prices WHERE league = ?)
        ORDER BY currency, date
        """,
        [league, league],
    )
    return "\n".join([
        "",
        "daily_prices per league:",
        markdown_table(per_league.with_columns(pl.col("first_day", "last_day").cast(pl.Utf8))),
        "",
        f"Last days of {league}:",
        markdown_table(last_week.with_columns(pl.col("date").cast(pl.Utf8))),
        "",
        f"Lake:       {lake.root}",
        f"Warehouse:  {lake.warehouse}   (duckdb -readonly {lake.warehouse})",
        f"Dagster UI: make dev   (DAGSTER_HOME={lake.dagster_home})",
    ])

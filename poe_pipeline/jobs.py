"""Jobs, and the in-process run behind ``poe-pipeline run`` (the same definitions the UI uses)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import polars as pl

from poe_pipeline.assets import features, forecasts, ingestion, models, prices
from poe_pipeline.lake import Lake
from poe_pipeline.markdown import markdown_table
from poe_pipeline.resources import LakeResource, PoeWatchResource, RunScopeResource

ASSET_MODULES = [ingestion, prices, features, models, forecasts]
ALL_ASSETS = dg.load_assets_from_modules(ASSET_MODULES)
# The unpartitioned offline graph: no live poll, and models go through retrain_models_job.
OFFLINE_SELECTION = dg.AssetSelection.assets(prices.historical_prices, prices.daily_prices, features.features,
                                             features.currency_universe)
FORECAST_SELECTION = dg.AssetSelection.assets(forecasts.predictions, forecasts.investment_report)
retrain_models_job = models.retrain_models_job

ingestion_job = dg.define_asset_job(
    "ingestion_job",
    selection=dg.AssetSelection.assets(ingestion.price_snapshots),
    tags={"poe/queue": "ingestion"},
    executor_def=dg.in_process_executor,  # one step: a subprocess per poll would cost seconds
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
    tags = {"poe/league": league, "poe/profile": profile, "poe/source": "cli"}
    logging = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
    with dg.DagsterInstance.get() as instance:
        result = dg.materialize(ALL_ASSETS, selection=OFFLINE_SELECTION, resources=resources, instance=instance,
                                tags=tags, run_config=logging, raise_on_error=False)
        _check(result)
        lake = Lake(lake_root)
        eligible, not_eligible = _eligible(lake, league, currencies)
        if eligible:
            result = retrain_models_job.execute_in_process(
                run_config={**logging, "ops": {"retrain_partitions": {"config": {"currencies": eligible}}}},
                resources=resources, instance=instance, tags=tags, raise_on_error=False,
            )
            _check(result)
        result = dg.materialize(ALL_ASSETS, selection=FORECAST_SELECTION, resources=resources, instance=instance,
                                tags=tags, run_config=logging, raise_on_error=False)
        _check(result)
    return summarize(lake, league, not_eligible)


def _check(result) -> None:
    if not result.success:
        failures = [e.message for e in result.all_events if e.is_step_failure]
        raise SystemExit("poe-pipeline run failed:\n  " + "\n  ".join(failures or ["see the log above"]))


def _eligible(lake: Lake, league: str, currencies: list[str]) -> tuple[list[str], list[str]]:
    """The eligible currencies within ``--currencies`` (all when empty), and the requested ones that are not."""
    from poe_pipeline.universe import read_universe, restrict_universe

    universe, not_eligible = restrict_universe(read_universe(lake, league), currencies or None)
    return universe.filter(pl.col("eligible"))["currency"].to_list(), not_eligible


def summarize(lake: Lake, league: str, not_eligible: list[str] | None = None) -> str:
    from poe_pipeline.reporting import report_summary
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
    models = query(
        lake,
        """
        SELECT currency, horizon_days AS h, round(ensemble_skill, 3) AS skill, round(ensemble_mae_logret, 4) AS mae,
               round(persistence_mae_logret, 4) AS persistence_mae, model_version AS version, promoted
        FROM model_metrics WHERE league = ? AND trained
        QUALIFY row_number() OVER (PARTITION BY currency, horizon_days ORDER BY trained_at DESC) = 1
        ORDER BY currency, h
        """,
        [league],
    ) if (lake.root / "model_metrics").is_dir() else pl.DataFrame()
    skipped = [] if not not_eligible else [
        "", f"Not eligible for a model (see currency_universe for why): {', '.join(not_eligible)}"]
    return "\n".join([
        "",
        "daily_prices per league:",
        markdown_table(per_league.with_columns(pl.col("first_day", "last_day").cast(pl.Utf8))),
        "",
        f"Last days of {league}:",
        markdown_table(last_week.with_columns(pl.col("date").cast(pl.Utf8))),
        "",
        *([f"Models trained for {league} (validation on walk-forward folds; skill > 0 beats 'no change'):",
           markdown_table(models.head(40)), ""] if models.height else []),
        *skipped,
        report_summary(lake, league),
        "",
        f"Lake:       {lake.root}",
        f"Warehouse:  {lake.warehouse}   (duckdb -readonly {lake.warehouse})",
        f"Dagster UI: make dev   (DAGSTER_HOME={lake.dagster_home})",
    ])

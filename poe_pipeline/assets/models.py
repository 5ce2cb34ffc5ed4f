"""``global_models`` (one pooled ensemble per horizon) and ``currency_models`` (each one specialised to a currency).

A single partition trains in-process. Retraining goes through ``retrain_models_job``: one run whose op trains the
global models in parallel processes, then their partitions, and records a materialization, with its own metadata,
per partition of each asset.
"""

import dagster as dg
import polars as pl

from poe_pipeline.assets.features import currency_partitions
from poe_pipeline.features import FEATURE_COLUMNS
from poe_pipeline.lake import Lake
from poe_pipeline.leagues import current_league_of, league_calendar, training_leagues
from poe_pipeline.markdown import markdown_table
from poe_pipeline.names import canonical_currency_name
from poe_pipeline.prices import read_daily_prices
from poe_pipeline.resources import LakeResource, RunScopeResource
from poe_pipeline.training import (
    HORIZON_KEYS,
    GlobalOutcome,
    TrainOutcome,
    TrainRequest,
    load_training_features,
    train_currencies,
    train_globals,
)
from poe_pipeline.universe import read_universe

horizon_partitions = dg.StaticPartitionsDefinition(list(HORIZON_KEYS))
model_partitions = dg.MultiPartitionsDefinition({"currency": currency_partitions, "horizon": horizon_partitions})
TRAINING_TAGS = {"poe/queue": "training"}


def _scope(store: Lake, run_scope: RunScopeResource) -> tuple[str, list[str], list[str]]:
    """(current league, training leagues, the currencies being forecast)."""
    calendar = league_calendar(read_daily_prices(store))
    league = current_league_of(calendar, run_scope.league)
    universe = read_universe(store, league).filter(pl.col("eligible"))["currency"].to_list()
    return league, training_leagues(calendar, league), universe


def _train_globals(context, lake: LakeResource, run_scope: RunScopeResource, horizons: list[int]):
    store: Lake = lake.lake
    league, order, universe = _scope(store, run_scope)
    outcomes = train_globals(store, load_training_features(store), FEATURE_COLUMNS, horizons, order, league,
                             universe, run_scope.profile_config(), tags={"dagster_run_id": context.run_id},
                             progress=context.log.info)
    lake.publish_views(context.log)
    return outcomes


def _train_currencies(context, lake: LakeResource, run_scope: RunScopeResource, requests: list[TrainRequest]):
    store: Lake = lake.lake
    league, _, _ = _scope(store, run_scope)
    outcomes = train_currencies(store, requests, league, run_scope.profile, tags={"dagster_run_id": context.run_id},
                                progress=context.log.info)
    lake.publish_views(context.log)
    return outcomes


def _metrics_table(metrics: dict[str, dict[str, float]]) -> str:
    return markdown_table(pl.DataFrame([
        {"model": name, **{k: round(v, 5) for k, v in m.items() if k != "n"}} for name, m in metrics.items()]))


def global_metadata(outcome: GlobalOutcome) -> dict:
    r, reg = outcome.result, outcome.registration
    if not r.trained:
        return {"trained": False, "reason": r.reason}
    return {
        "trained": True,
        "holdout_skill_vs_persistence": r.skill,
        "holdout_mae_logret": r.validation_mae,
        "holdout_metrics": dg.MetadataValue.md(_metrics_table(r.metrics.get("holdout", {}))),
        "weights": dg.MetadataValue.json({k: round(v, 3) for k, v in r.weights.items()}),
        "folds": r.folds,
        "rows": r.data_window.get("rows", 0),
        "currencies_pooled": r.data_window.get("currencies", 0),
        "mlflow_run_id": reg.run_id if reg else "",
        "model": f"{reg.model_name} v{reg.version}" if reg else "",
        "promoted": bool(reg and reg.promoted),
        "promotion_reason": reg.reason if reg else "",
    }


def partition_metadata(outcome: TrainOutcome) -> dict:
    r, reg = outcome.result, outcome.registration
    if not r.trained:
        return {"trained": False, "reason": r.reason}
    return {
        "trained": True,
        "skill_vs_persistence": r.skill,
        "mae_logret": r.validation_mae,
        "metrics_scope": r.metrics_scope,
        "metrics": dg.MetadataValue.md(_metrics_table(r.metrics)) if r.metrics else "no rows of its own",
        "scale_of_global_forecast": r.scale,
        "own_rows": r.own_rows,
        "global_model": f"{r.global_name} v{r.global_version}",
        "note": r.reason,
        "mlflow_run_id": reg.run_id if reg else "",
        "model": f"{reg.model_name} v{reg.version}" if reg else "",
        "promoted": bool(reg and reg.promoted),
        "promotion_reason": reg.reason if reg else "",
    }


@dg.asset(
    group_name="models",
    kinds={"lightgbm", "xgboost", "mlflow"},
    partitions_def=horizon_partitions,
    deps=["features", "currency_universe"],
    op_tags=TRAINING_TAGS,
    description="One ensemble of LightGBM, XGBoost and RandomForest per horizon, pooled over the liquid currencies "
    "of every league; tuned with Optuna on league folds and scored on a holdout league that tuning never saw; "
    "logged to MLflow and registered as poe-global-<h>d (`champion` moves only to a model that is no worse).",
)
def global_models(
    context: dg.AssetExecutionContext, lake: LakeResource, run_scope: RunScopeResource
) -> dg.MaterializeResult:
    (outcome,) = _train_globals(context, lake, run_scope, [HORIZON_KEYS[context.partition_key]])
    if not outcome.result.trained:
        raise dg.Failure(f"global model {context.partition_key} not trained: {outcome.result.reason}")
    return dg.MaterializeResult(metadata=global_metadata(outcome))


@dg.asset(
    group_name="models",
    kinds={"mlflow"},
    partitions_def=model_partitions,
    ins={"global_models": dg.AssetIn(
        partition_mapping=dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="horizon"),
        dagster_type=dg.Nothing)},
    op_tags=TRAINING_TAGS,
    description="The global model of the horizon specialised to one currency: a scale of its forecast chosen on the "
    "currency's out-of-fold rows (partially pooled), and the residuals that calibrate its intervals. Records the "
    "global version it was built on and forecasts through it; registered as poe-<currency>-<h>d.",
)
def currency_models(
    context: dg.AssetExecutionContext, lake: LakeResource, run_scope: RunScopeResource
) -> dg.MaterializeResult:
    key = context.partition_key.keys_by_dimension
    request = TrainRequest(key["currency"], HORIZON_KEYS[key["horizon"]])
    (outcome,) = _train_currencies(context, lake, run_scope, [request])
    return dg.MaterializeResult(metadata=partition_metadata(outcome))


class RetrainConfig(dg.Config):
    currencies: list[str] = []  # empty: every `currency` partition
    horizons: list[str] = list(HORIZON_KEYS)
    retrain_global: bool = True  # False: specialise the current global champions only


@dg.op(tags=TRAINING_TAGS, out=dg.Out(dg.Nothing))
def retrain_partitions(
    context: dg.OpExecutionContext, config: RetrainConfig, lake: LakeResource, run_scope: RunScopeResource
) -> None:
    """Trains the global models in parallel, then the requested partitions, and records each as a materialization
    of global_models and currency_models."""
    currencies = config.currencies or context.instance.get_dynamic_partitions(currency_partitions.name)
    if run_scope.currencies:  # the user's --currencies, typed loosely ("divine orb")
        wanted = {canonical_currency_name(c).casefold() for c in run_scope.currencies}
        currencies = [c for c in currencies if c.casefold() in wanted]
    unknown = set(config.horizons) - set(HORIZON_KEYS)
    if unknown:
        raise dg.Failure(f"Unknown horizons {sorted(unknown)}: choose from {', '.join(HORIZON_KEYS)}")
    horizons = [HORIZON_KEYS[h] for h in config.horizons]
    if config.retrain_global:
        context.log.info(f"Training the global models of {', '.join(config.horizons)}")
        for outcome in _train_globals(context, lake, run_scope, horizons):
            if not outcome.result.trained:
                raise dg.Failure(f"global model {outcome.horizon}d not trained: {outcome.result.reason}")
            context.log_event(dg.AssetMaterialization(asset_key=global_models.key, partition=f"{outcome.horizon}d",
                                                      metadata=global_metadata(outcome)))
    requests = [TrainRequest(c, h) for c in currencies for h in horizons]
    if not requests:
        context.log.warning("No currency partitions to train: materialize currency_universe first")
        return
    context.log.info(f"Training {len(requests)} partitions ({len(currencies)} currencies x {len(horizons)})")
    skipped = []
    for outcome in _train_currencies(context, lake, run_scope, requests):
        if not outcome.result.trained:
            skipped.append(f"{outcome.request.partition_key}: {outcome.result.reason}")
            continue
        context.log_event(dg.AssetMaterialization(
            asset_key=currency_models.key,
            partition=dg.MultiPartitionKey({"currency": outcome.request.currency,
                                            "horizon": f"{outcome.request.horizon}d"}),
            metadata=partition_metadata(outcome),
        ))
    if skipped:
        context.log.warning(f"{len(skipped)} partition(s) not trained: " + "; ".join(skipped[:10]))


@dg.job(tags=TRAINING_TAGS, description="Retrain the global models and many currency_models partitions in one run.")
def retrain_models_job():
    retrain_partitions()

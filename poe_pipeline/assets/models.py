"""``currency_models``: one tuned ensemble per (currency, horizon), tracked and registered in MLflow.

A single partition trains in-process. Retraining many partitions goes through ``retrain_models_job``: one run
whose op trains them in parallel processes and records a materialization, with its own metadata, per partition.
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
from poe_pipeline.training import HORIZON_KEYS, TrainOutcome, TrainRequest, load_training_features, train_many

horizon_partitions = dg.StaticPartitionsDefinition(list(HORIZON_KEYS))
model_partitions = dg.MultiPartitionsDefinition({"currency": currency_partitions, "horizon": horizon_partitions})
TRAINING_TAGS = {"poe/queue": "training"}


def _train(context, lake: LakeResource, run_scope: RunScopeResource, requests: list[TrainRequest]):
    store: Lake = lake.lake
    prices = read_daily_prices(store)
    calendar = league_calendar(prices)
    league = current_league_of(calendar, run_scope.league)
    league_order = training_leagues(calendar, league)
    rows = load_training_features(store, {r.currency for r in requests})
    outcomes = train_many(
        store, rows, FEATURE_COLUMNS, requests, league_order, league, run_scope.profile_config(),
        tags={"dagster_run_id": context.run_id}, progress=context.log.info,
    )
    lake.publish_views(context.log)
    return outcomes


def partition_metadata(outcome: TrainOutcome) -> dict:
    r, reg = outcome.result, outcome.registration
    if not r.trained:
        return {"trained": False, "reason": r.reason}
    table = pl.DataFrame([
        {"model": name, **{k: round(v, 5) for k, v in m.items() if k != "n"}}
        for name, m in r.metrics.items()
    ])
    return {
        "trained": True,
        "ensemble_skill_vs_persistence": r.metrics["ensemble"].get("skill", float("nan")),
        "ensemble_mae_logret": r.validation_mae,
        "persistence_mae_logret": r.metrics["persistence"]["mae_logret"],
        "metrics": dg.MetadataValue.md(markdown_table(table)),
        "weights": dg.MetadataValue.json({k: round(v, 4) for k, v in r.weights.items()}),
        "shrink_to_persistence": r.shrink,
        "folds": r.folds,
        "rows": r.data_window.get("rows", 0),
        "mlflow_run_id": reg.run_id if reg else "",
        "model": f"{reg.model_name} v{reg.version}" if reg else "",
        "promoted": bool(reg and reg.promoted),
        "promotion_reason": reg.reason if reg else "",
    }


@dg.asset(
    group_name="models",
    kinds={"lightgbm", "xgboost", "mlflow"},
    partitions_def=model_partitions,
    deps=["currency_universe"],
    op_tags=TRAINING_TAGS,
    description="An ensemble of LightGBM, XGBoost and RandomForest for one currency and horizon, tuned with Optuna "
    "on walk-forward folds, logged to MLflow and registered; `champion` moves only to a model that is no worse.",
)
def currency_models(
    context: dg.AssetExecutionContext, lake: LakeResource, run_scope: RunScopeResource
) -> dg.MaterializeResult:
    key = context.partition_key.keys_by_dimension
    request = TrainRequest(key["currency"], HORIZON_KEYS[key["horizon"]])
    (outcome,) = _train(context, lake, run_scope, [request])
    return dg.MaterializeResult(metadata=partition_metadata(outcome))


class RetrainConfig(dg.Config):
    currencies: list[str] = []  # empty: every `currency` partition
    horizons: list[str] = list(HORIZON_KEYS)


@dg.op(tags=TRAINING_TAGS, out=dg.Out(dg.Nothing))
def retrain_partitions(
    context: dg.OpExecutionContext, config: RetrainConfig, lake: LakeResource, run_scope: RunScopeResource
) -> None:
    """Trains the requested partitions in parallel and records each as a materialization of currency_models."""
    currencies = config.currencies or context.instance.get_dynamic_partitions(currency_partitions.name)
    if run_scope.currencies:  # the user's --currencies, typed loosely ("divine orb")
        wanted = {canonical_currency_name(c).casefold() for c in run_scope.currencies}
        currencies = [c for c in currencies if c.casefold() in wanted]
    unknown = set(config.horizons) - set(HORIZON_KEYS)
    if unknown:
        raise dg.Failure(f"Unknown horizons {sorted(unknown)}: choose from {', '.join(HORIZON_KEYS)}")
    requests = [TrainRequest(c, HORIZON_KEYS[h]) for c in currencies for h in config.horizons]
    if not requests:
        context.log.warning("No partitions to train: materialize currency_universe first")
        return
    context.log.info(f"Training {len(requests)} partitions ({len(currencies)} currencies x {len(config.horizons)})")
    for outcome in _train(context, lake, run_scope, requests):
        if not outcome.result.trained:
            context.log.warning(f"{outcome.request.partition_key} skipped: {outcome.result.reason}")
            continue
        context.log_event(dg.AssetMaterialization(
            asset_key=currency_models.key,
            partition=dg.MultiPartitionKey({"currency": outcome.request.currency,
                                            "horizon": f"{outcome.request.horizon}d"}),
            metadata=partition_metadata(outcome),
        ))


@dg.job(tags=TRAINING_TAGS, description="Retrain many currency_models partitions in one run, in parallel.")
def retrain_models_job():
    retrain_partitions()

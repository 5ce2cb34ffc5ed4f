"""Models: one global model per horizon, and each currency's partition that specialises it.

| definition | what it does |
| --- | --- |
| ``global_models`` | partitioned by horizon: an ensemble pooled over the liquid currencies of every league |
| ``currency_models`` | partitioned by currency x horizon: the global model specialised to one currency |
| ``retrain_models_job`` | one run: the global models in parallel, then the partitions; a materialization each |
| ``weekly_retrain`` | Monday 04:00 UTC, every partition, the ``prod`` profile (``POE_RETRAIN_PROFILE``) |
| ``new_currency_partitions`` | a sensor: trains the partitions the universe added that have no model yet |
| ``model_degradation`` | a sensor: retrains the partitions whose realized error degraded |

The asset and the job share one training path (``train``) and one run config (``retrain_run_config``). Dagster 1.13
cannot record per-partition results from a multi-partition run (a backfill with ``BackfillPolicy.single_run`` would
materialize them all with one result), so the retrain stays a job whose op logs one ``AssetMaterialization`` per
partition, each with its own metrics.

Data versions: a ``global_models`` partition's is its champion (``poe-global-3d v4``), so a retrain that kept or did
not promote a model changes nothing downstream; a ``currency_models`` partition's is its champion too, and it records
the global version it was built on as its input. So Dagster marks a partition stale exactly when the global champion
of its horizon moved after it was built.
"""

import hashlib
import json
from datetime import UTC, datetime

import dagster as dg
import duckdb
import polars as pl

from poe_pipeline import monitoring as mon
from poe_pipeline.assets import TRAINING_QUEUE, mlflow_link, rounded, table
from poe_pipeline.assets.features import currency_partitions
from poe_pipeline.features import FEATURE_COLUMNS
from poe_pipeline.resources import LakeResource, MonitoringResource, RunScopeResource
from poe_pipeline.settings import Settings
from poe_pipeline.tracking import ModelTracker, global_model_name, registered_model_name
from poe_pipeline.training import (
    HORIZON_KEYS,
    GlobalOutcome,
    TrainOutcome,
    TrainRequest,
    scan_training_features,
    train_currencies,
    train_globals,
)

WEEKLY_RETRAIN_CRON = "0 4 * * 1"  # Monday 04:00 UTC
horizon_partitions = dg.StaticPartitionsDefinition(list(HORIZON_KEYS))
model_partitions = dg.MultiPartitionsDefinition({"currency": currency_partitions, "horizon": horizon_partitions})


class GlobalModelsConfig(dg.Config):
    retune: bool = False  # True: tune even where the champion's tuning still applies (same past leagues)


class RetrainConfig(dg.Config):
    currencies: list[str] = []  # empty: every `currency` partition
    horizons: list[str] = list(HORIZON_KEYS)
    retrain_global: bool = True  # False: specialise the current global champions only
    retune: bool = False  # True: tune the global models even where the champion's tuning still applies


def retrain_run_config(currencies: list[str], horizons: list[str] | None = None, retrain_global: bool = True,
                       run_scope: dict | None = None) -> dict:
    """The one run config of ``retrain_models_job`` (the CLI, the weekly schedule and the sensors use it);
    ``run_scope``: the whole run_scope resource config, when the run's scope differs from the deployment's."""
    config: dict = {"ops": {"retrain_partitions": {"config": {
        "currencies": list(currencies), "horizons": list(horizons or HORIZON_KEYS),
        "retrain_global": retrain_global}}}}
    if run_scope is not None:
        config["resources"] = {"run_scope": {"config": run_scope}}
    return config


# Dagster's provenance tags (dagster/_core/definitions/data_version.py): what an asset's own materialization records,
# written by the retrain op for the partitions it logs
DATA_VERSION_TAG = "dagster/data_version"
USER_DATA_VERSION_TAG = "dagster/data_version_is_user_provided"
CODE_VERSION_TAG = "dagster/code_version"
INPUT_DATA_VERSION_PREFIX = "dagster/input_data_version/"
INPUT_EVENT_POINTER_PREFIX = "dagster/input_event_pointer/"
GLOBAL_INPUTS = ("features", "currency_universe")  # global_models' deps
GLOBAL_RECORDS_SEARCHED = 200  # materializations of one global partition looked through for a partition's input


def champion_data_version(tracker: ModelTracker, name: str) -> dg.DataVersion | None:
    """A registered model's data version: its champion, e.g. ``poe-global-3d v4``; None without one."""
    version = tracker.champion_version(name)
    return dg.DataVersion(f"{name} v{version.version}") if version is not None else None


def provenance_tags(version: dg.DataVersion | None, run_id: str,
                    inputs: dict[str, dg.EventLogRecord | None]) -> dict[str, str]:
    """The tags with which an asset's own materialization records its data version and provenance: the run as its
    code version (Dagster's default) and each input's materialization and data version. Without every input's
    recorded data version only the data version is set, and Dagster compares timestamps for that event instead."""
    if version is None:
        return {}
    tags = {DATA_VERSION_TAG: version.value, USER_DATA_VERSION_TAG: "true"}
    seen = {name: r.asset_materialization.tags.get(DATA_VERSION_TAG) if r and r.asset_materialization else None
            for name, r in inputs.items()}
    if not all(seen.values()):
        return tags
    tags[CODE_VERSION_TAG] = run_id
    for name, record in inputs.items():
        tags[INPUT_DATA_VERSION_PREFIX + name] = seen[name]
        tags[INPUT_EVENT_POINTER_PREFIX + name] = str(record.storage_id)
    return tags


def global_provenance(instance: dg.DagsterInstance, run_id: str, tracker: ModelTracker, h: int) -> dict[str, str]:
    """The tags of a global model's materialization logged by the retrain op: its champion as its data version, and
    the latest features and universe as its inputs."""
    inputs = {name: instance.get_latest_data_version_record(dg.AssetKey(name), False) for name in GLOBAL_INPUTS}
    return provenance_tags(champion_data_version(tracker, global_model_name(h)), run_id, inputs)


def global_records(instance: dg.DagsterInstance, h: int) -> list[dg.EventLogRecord]:
    """The latest materializations of the ``h``-day global model, newest first: fetched once per horizon, not once
    per partition."""
    return list(instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=global_models.key, asset_partitions=[f"{h}d"]),
        limit=GLOBAL_RECORDS_SEARCHED).records)


def partition_provenance(records: list[dg.EventLogRecord], run_id: str, tracker: ModelTracker, currency: str,
                         h: int) -> dict[str, str]:
    """The tags of a partition's materialization logged by the retrain op: its champion as its data version, and as
    its input the materialization (among ``global_records``) of the global version that champion was built on. So a
    champion the retrain did not replace, still built on an older global version, stays stale."""
    name = registered_model_name(currency, h)
    champion = tracker.champion_version(name)
    if champion is None:
        return {}
    built_on = tracker.client.get_run(champion.run_id).data.tags.get("global_model_version")
    wanted = f"{global_model_name(h)} v{built_on}"
    record = next((r for r in records
                   if r.asset_materialization and r.asset_materialization.tags.get(DATA_VERSION_TAG) == wanted), None)
    return provenance_tags(dg.DataVersion(f"{name} v{champion.version}"), run_id, {"global_models": record})


def _registration_metadata(reg, mlflow_url: str) -> dict:
    """The MLflow run, the registered version and the promotion, shared by both kinds of model."""
    return {
        "mlflow_run": mlflow_link(mlflow_url, reg.experiment_id, reg.run_id) if reg else "",
        "model": f"{reg.model_name} v{reg.version}" if reg else "",
        "promoted": bool(reg and reg.promoted),
        "promotion_reason": reg.reason if reg else "",
    }


def global_metadata(outcome: GlobalOutcome, mlflow_url: str) -> dict:
    r, reg = outcome.result, outcome.registration
    if outcome.kept:
        return {"trained": False, "kept": f"{global_model_name(outcome.horizon)} v{outcome.kept}", "reason": r.reason}
    if not r.trained:
        return {"trained": False, "reason": r.reason}
    return {
        "trained": True,
        "holdout_skill_vs_persistence": rounded(r.skill),
        "holdout_mae_logret": rounded(r.validation_mae, 5),
        "holdout_metrics": table(pl.DataFrame([{"model": k, **v} for k, v in r.metrics.get("holdout", {}).items()])),
        "weights": dg.MetadataValue.json({k: rounded(v, 3) for k, v in r.weights.items()}),
        "folds": r.folds,
        "rows": r.data_window.get("rows", 0),
        "currencies_pooled": r.data_window.get("currencies", 0),
        "tuning": r.data_window.get("tuning", "tuned"),
        **_registration_metadata(reg, mlflow_url),
    }


def partition_metadata(outcome: TrainOutcome, mlflow_url: str) -> dict:
    r, reg = outcome.result, outcome.registration
    if not r.trained:
        return {"trained": False, "reason": r.reason}
    return {
        "trained": True,
        "skill_vs_persistence": rounded(r.skill),
        "mae_logret": rounded(r.validation_mae, 5),
        "metrics_scope": r.metrics_scope,
        "metrics": table(pl.DataFrame([{"model": k, **v} for k, v in r.metrics.items()])) if r.metrics
        else "no rows of its own",
        "scale_of_global_forecast": rounded(r.scale, 3),
        "own_rows": r.own_rows,
        "global_model": f"{r.global_name} v{r.global_version}",
        "note": r.reason,
        **_registration_metadata(reg, mlflow_url),
    }


def train(context, lake: LakeResource, run_scope: RunScopeResource, horizons: list[int],
          requests: list[TrainRequest], retrain_global: bool,
          retune: bool = False) -> tuple[list[GlobalOutcome], list[TrainOutcome]]:
    """The one training path: the global models of ``horizons`` (when ``retrain_global``), then the partitions."""
    store = lake.lake
    scope = run_scope.scope(store)
    tags = {"dagster_run_id": context.run_id}
    globals_ = []
    if retrain_global:
        globals_ = train_globals(store, scan_training_features(store), FEATURE_COLUMNS, horizons,
                                 scope.training_leagues, scope.league, scope.eligible(), scope.profile, tags,
                                 progress=context.log.info, retune=retune)
        failed = [g for g in globals_ if not g.result.trained and not g.kept]
        if failed:
            raise dg.Failure("; ".join(f"global model {g.horizon}d not trained: {g.result.reason}" for g in failed))
    partitions = train_currencies(store, requests, scope.league, scope.profile_name, tags,
                                  progress=context.log.info) if requests else []
    lake.publish_views(context.log)
    return globals_, partitions


@dg.asset(
    group_name="models",
    kinds={"lightgbm", "xgboost", "mlflow"},
    partitions_def=horizon_partitions,
    deps=["features", "currency_universe"],
    op_tags=TRAINING_QUEUE,
    description="One ensemble of LightGBM, XGBoost and RandomForest per horizon, pooled over the liquid currencies "
    "of every league; tuned with Optuna on league folds and scored on a holdout league that tuning never saw "
    "(tuned once a league: a retrain with the same past leagues keeps the champion's tuning, and keeps the champion "
    "as it is while its pooled rows changed under 5 %; config retune: true tunes anyway); logged to MLflow and "
    "registered as poe-global-<h>d (`champion` moves only to a model that is no worse).",
)
def global_models(
    context: dg.AssetExecutionContext, config: GlobalModelsConfig, lake: LakeResource, run_scope: RunScopeResource
) -> dg.MaterializeResult:
    (outcome,), _ = train(context, lake, run_scope, [HORIZON_KEYS[context.partition_key]], [], True, config.retune)
    return dg.MaterializeResult(metadata=global_metadata(outcome, Settings.from_env().mlflow_url),
                                data_version=champion_data_version(ModelTracker(lake.lake),
                                                                   global_model_name(outcome.horizon)))


@dg.asset(
    group_name="models",
    kinds={"mlflow"},
    partitions_def=model_partitions,
    ins={"global_models": dg.AssetIn(
        partition_mapping=dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="horizon"),
        dagster_type=dg.Nothing)},
    op_tags=TRAINING_QUEUE,
    description="The global model of the horizon specialised to one currency: a scale of its forecast chosen on the "
    "currency's out-of-fold rows (partially pooled). Records the global version it was built on and forecasts "
    "through it, so a new global champion marks it stale; registered as poe-<currency>-<h>d.",
)
def currency_models(
    context: dg.AssetExecutionContext, lake: LakeResource, run_scope: RunScopeResource
) -> dg.MaterializeResult:
    key = context.partition_key.keys_by_dimension
    request = TrainRequest(key["currency"], HORIZON_KEYS[key["horizon"]])
    _, (outcome,) = train(context, lake, run_scope, [request.horizon], [request], False)
    return dg.MaterializeResult(metadata=partition_metadata(outcome, Settings.from_env().mlflow_url),
                                data_version=champion_data_version(ModelTracker(lake.lake),
                                                                   registered_model_name(request.currency,
                                                                                         request.horizon)))


@dg.op(tags=TRAINING_QUEUE, out=dg.Out(dg.Nothing))
def retrain_partitions(
    context: dg.OpExecutionContext, config: RetrainConfig, lake: LakeResource, run_scope: RunScopeResource
) -> None:
    """Trains the global models in parallel, then the requested partitions, and records each as a materialization
    of global_models and currency_models."""
    unknown = set(config.horizons) - set(HORIZON_KEYS)
    if unknown:
        raise dg.Failure(f"Unknown horizons {sorted(unknown)}: choose from {', '.join(HORIZON_KEYS)}")
    currencies = config.currencies or context.instance.get_dynamic_partitions(currency_partitions.name)
    scope = run_scope.scope(lake.lake)
    if scope.currencies:  # the user's --currencies
        wanted = {c.casefold() for c in scope.currencies}
        currencies = [c for c in currencies if c.casefold() in wanted]
    horizons = [HORIZON_KEYS[h] for h in config.horizons]
    requests = [TrainRequest(c, h) for c in currencies for h in horizons]
    context.log.info(f"Training {'the global models and ' if config.retrain_global else ''}{len(requests)} "
                     f"partitions ({len(currencies)} currencies x {len(horizons)} horizons)")
    globals_, partitions = train(context, lake, run_scope, horizons, requests, config.retrain_global,
                                 config.retune)
    mlflow_url = Settings.from_env().mlflow_url
    tracker = ModelTracker(lake.lake)
    for outcome in globals_:
        tags = global_provenance(context.instance, context.run_id, tracker, outcome.horizon)
        context.log_event(dg.AssetMaterialization(asset_key=global_models.key, partition=f"{outcome.horizon}d",
                                                  metadata=global_metadata(outcome, mlflow_url), tags=tags or None))
    records = {h: global_records(context.instance, h) for h in horizons}
    skipped = []
    for outcome in partitions:
        if not outcome.result.trained:
            skipped.append({"partition": outcome.request.partition_key, "reason": outcome.result.reason})
            continue
        context.log_event(dg.AssetMaterialization(
            asset_key=currency_models.key,
            partition=dg.MultiPartitionKey({"currency": outcome.request.currency,
                                            "horizon": f"{outcome.request.horizon}d"}),
            metadata=partition_metadata(outcome, mlflow_url),
            tags=partition_provenance(records[outcome.request.horizon], context.run_id, tracker,
                                      outcome.request.currency, outcome.request.horizon) or None,
        ))
    if skipped:
        context.log.warning(f"{len(skipped)} of {len(partitions)} partitions not trained (reasons in the step's "
                            "output metadata and in model_metrics)")
        context.add_output_metadata({"not_trained": table(pl.DataFrame(skipped), rows=100)})


@dg.job(tags=TRAINING_QUEUE, description="Retrain the global models and many currency_models partitions in one run.")
def retrain_models_job():
    retrain_partitions()


# --- automation -------------------------------------------------------------------------------------------------


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str, sort_keys=True).encode()).hexdigest()[:16]


def split_into_shards(names: list[str], shards: int) -> list[list[str]]:
    """Round-robin over the sorted names, so the shards stay balanced as currencies are added."""
    ordered = sorted(names)
    return [ordered[i::shards] for i in range(shards) if ordered[i::shards]]


def weekly_run_scope(settings: Settings) -> dict:
    """The deployment's run scope with the retrain profile (run config replaces a resource's config as a whole)."""
    return {"history_dirs": list(settings.history_dirs), "league": settings.league, "currencies": [],
            "profile": settings.retrain_profile}


@dg.schedule(
    name="weekly_retrain",
    job=retrain_models_job,
    cron_schedule=WEEKLY_RETRAIN_CRON,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Every Monday 04:00 UTC: retrain the global models and every currency_models partition in one run, "
    "with the `prod` profile (POE_RETRAIN_PROFILE). POE_RETRAIN_SHARDS=N splits the partitions into N runs, the "
    "first of which also retrains the global models.",
)
def weekly_retrain(context: dg.ScheduleEvaluationContext):
    settings = Settings.from_env()
    scope = weekly_run_scope(settings)
    tags = {"poe/trigger": "weekly_retrain", "poe/profile": settings.retrain_profile}
    if settings.retrain_shards == 1:  # empty: the op trains every partition that exists when it starts
        return dg.RunRequest(run_config=retrain_run_config([], run_scope=scope), tags={**tags, "poe/shard": "all"})
    currencies = context.instance.get_dynamic_partitions(currency_partitions.name)
    if not currencies:
        return dg.SkipReason("No currency partitions yet: materialize currency_universe first")
    parts = split_into_shards(currencies, settings.retrain_shards)
    return [dg.RunRequest(run_config=retrain_run_config(part, retrain_global=i == 0, run_scope=scope),
                          tags={**tags, "poe/shard": f"{i + 1}/{len(parts)}"}) for i, part in enumerate(parts)]


@dg.sensor(
    name="new_currency_partitions",
    job=retrain_models_job,
    minimum_interval_seconds=300,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Requests the training of the `currency` partitions (added by currency_universe) that have no model "
    "yet. The global models already forecast them; the run only specialises the current champions.",
)
def new_currency_partitions(context: dg.SensorEvaluationContext, lake: LakeResource):
    partitions = context.instance.get_dynamic_partitions(currency_partitions.name)
    trained = mon.trained_currencies(lake.lake)
    new = [c for c in partitions if c not in trained]
    if not new:
        return dg.SkipReason(f"All {len(partitions)} currency partitions have a model")
    context.log.info(f"Training {len(new)} new currency partition(s): {', '.join(new[:20])}")
    return dg.RunRequest(run_key=f"new-currencies-{_key(new)}",
                         run_config=retrain_run_config(new, retrain_global=False),
                         tags={"poe/trigger": "new_currencies"})


@dg.sensor(
    name="model_degradation",
    job=retrain_models_job,
    minimum_interval_seconds=3600,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Requests a retrain of the currency_models partitions whose realized error over the last 7 days "
    "(prediction_errors) exceeds their validation error (model_metrics) by the configured factor (1.5x).",
)
def model_degradation(context: dg.SensorEvaluationContext, lake: LakeResource, monitoring: MonitoringResource):
    store = lake.lake
    try:
        loaded = mon.load_degradation_inputs(store)
    except duckdb.IOException as exc:
        return dg.SkipReason(f"warehouse.duckdb is locked by a writer; trying again next tick ({exc})")
    if isinstance(loaded, str):
        return dg.SkipReason(f"No verdict: {loaded}")
    errors, metrics = loaded
    rules = monitoring.rules()
    report = mon.degradation_report(errors, metrics, rules)
    degraded = mon.degraded_partitions(report, rules)
    if degraded.height == 0:
        worst = report.row(0, named=True) if report.height else None
        detail = (f"; worst: {worst['currency']} {worst['horizon_days']}d at {worst['ratio']:.2f}x validation"
                  if worst else "")
        return dg.SkipReason(f"No partition over {rules.factor}x its validation error in the {rules.window_days} "
                             f"days to {report['window_end'].max() if report.height else 'now'}{detail}")
    window_end = degraded["window_end"].max()
    requests = [dg.RunRequest(run_key=f"degradation-{window_end}-{_key(currencies, horizons)}",
                              run_config=retrain_run_config(currencies, horizons),
                              tags={"poe/trigger": "degradation", "poe/window_end": str(window_end)})
                for currencies, horizons in mon.retrain_batches(degraded)]
    rows = degraded.select("currency", "horizon_days", "errors", "realized_mae", "validation_mae", "ratio")
    alert = mon.Alert(
        alert_id=f"degradation-{window_end}-{_key(sorted(rows.select('currency', 'horizon_days').rows()))}",
        kind="degradation", severity="warning",
        title=f"{degraded.height} model partition(s) degraded: retrain requested",
        message="; ".join(f"{r['currency']} {r['horizon_days']}d: realized MAE {r['realized_mae']:.4f} = "
                          f"{r['ratio']:.2f}x validation {r['validation_mae']:.4f} ({r['errors']} forecasts)"
                          for r in rows.iter_rows(named=True)),
        created_at=datetime.now(UTC).isoformat(),
        details={"window_end": str(window_end), "factor": rules.factor, "partitions": rows.to_dicts()},
    )
    context.log.info(monitoring.dispatch(alert, lake, context.log))
    return requests


defs = dg.Definitions(
    assets=[global_models, currency_models],
    jobs=[retrain_models_job],
    schedules=[weekly_retrain],
    sensors=[new_currency_partitions, model_degradation],
)

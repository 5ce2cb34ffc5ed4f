"""Features: the Parquet feature store, and the currency universe (who gets a forecast).

| definition | what it does |
| --- | --- |
| ``features`` | leak-free, league-aware features and the 1/3/7-day targets; only changed leagues are rebuilt |
| ``features_no_lookahead`` | a blocking check: features up to a cutoff are the same without the later days |
| ``currency_universe`` | who gets a forecast and why not; adds the eligible currencies as ``currency`` partitions |
| ``features_job`` | both assets with their checks |

Both follow ``daily_prices`` as soon as it updates (``AutomationCondition.eager``).
"""

import dagster as dg
import polars as pl

from poe_pipeline import quality
from poe_pipeline import universe as universe_rules
from poe_pipeline.assets import column_schema, table, view_description
from poe_pipeline.features import FEATURE_COLUMNS, update_features
from poe_pipeline.leagues import league_calendar
from poe_pipeline.prices import read_daily_prices
from poe_pipeline.resources import LakeResource, RunScopeResource

FEATURE_CHECK_SAMPLES = 3
currency_partitions = dg.DynamicPartitionsDefinition(name="currency")



@dg.asset(
    group_name="features",
    kinds={"parquet", "polars"},
    deps=["daily_prices"],
    automation_condition=dg.AutomationCondition.eager(),
    metadata=column_schema("features"),
    description=view_description("features", "Leak-free, league-aware features and the 1/3/7-day targets, one row "
                                 "per (league, currency, date), one Parquet file per league. Only leagues whose prices "
                                 "changed are recomputed."),
)
def features(context: dg.AssetExecutionContext, lake: LakeResource) -> dg.MaterializeResult:
    store = lake.lake
    prices = read_daily_prices(store)
    calendar = league_calendar(prices)
    written = update_features(prices, calendar, store)
    lake.publish_views(context.log)
    rebuilt = sorted(p.parent.name.removeprefix("league=") for p in written)
    context.log.info(f"features: rebuilt {len(rebuilt)} league(s): {', '.join(rebuilt) or 'none (up to date)'}")
    files = store.parquet_files(store.features)
    rows = pl.scan_parquet(files).select(pl.len()).collect().item() if files else 0
    return dg.MaterializeResult(metadata={
        "leagues_rebuilt": rebuilt, "feature_count": len(FEATURE_COLUMNS), "leagues": len(calendar),
        "dagster/row_count": rows,
    })


@dg.asset_check(
    asset=features,
    blocking=True,
    description="The leak test's invariant on a sample: for a few (league, cutoff) pairs, the features up to the "
    "cutoff are rebuilt without the later days and must be identical.",
)
def features_no_lookahead(context: dg.AssetCheckExecutionContext, lake: LakeResource) -> dg.AssetCheckResult:
    prices = read_daily_prices(lake.lake)
    # a new sample every run: over time the check covers many cutoffs; a failure names its pair to reproduce it
    seed = int(context.run.run_id.replace("-", "")[:8], 16) if context.run else 0
    pairs = quality.sample_cutoffs(prices, FEATURE_CHECK_SAMPLES, seed=seed)
    failures = [d for league, cutoff in pairs if (d := quality.lookahead_difference(prices, league, cutoff))]
    return dg.AssetCheckResult(
        passed=bool(pairs) and not failures,
        severity=dg.AssetCheckSeverity.ERROR,
        description="; ".join(failures) if failures else None if pairs else "no league with two days of data",
        metadata={"checked": [f"{league} cut at {cutoff}" for league, cutoff in pairs], "failures": failures},
    )


@dg.asset(
    group_name="features",
    kinds={"parquet", "duckdb"},
    deps=[features],
    automation_condition=dg.AutomationCondition.eager(),
    metadata=column_schema("currency_universe"),
    description=view_description("currency_universe", "Which currencies of the current league get a forecast, on "
                                 "liquidity and never on price, with the reason for each exclusion. Eligible "
                                 "currencies become `currency` partitions of currency_models (none are removed)."),
)
def currency_universe(
    context: dg.AssetExecutionContext, lake: LakeResource, run_scope: RunScopeResource
) -> dg.MaterializeResult:
    store = lake.lake
    scope = run_scope.scope(store)
    universe = universe_rules.currency_universe(read_daily_prices(store), scope.calendar, scope.league)
    universe_rules.write_universe(universe, store, scope.league)
    lake.publish_views(context.log)
    eligible = universe.filter(pl.col("eligible"))["currency"].to_list()
    known = set(context.instance.get_dynamic_partitions(currency_partitions.name))
    new = [c for c in eligible if c not in known]
    if new:
        context.instance.add_dynamic_partitions(currency_partitions.name, new)
    context.log.info(f"{scope.league}: {len(eligible)} of {universe.height} currencies eligible; "
                     f"{len(new)} new partitions")
    return dg.MaterializeResult(metadata={
        "league": scope.league,
        "eligible": len(eligible),
        "excluded": universe.height - len(eligible),
        "new_partitions": len(new),
        "rules": dg.MetadataValue.json(universe_rules.DEFAULT_RULES.as_dict()),
        "eligible_currencies": table(universe.filter(pl.col("eligible")).drop("eligible").sort("liquidity_rank"),
                                     rows=60),
        "excluded_reasons": table(universe.filter(~pl.col("eligible")).group_by("reason").len()
                                  .sort("len", descending=True)),
        "dagster/row_count": universe.height,
    })


features_job = dg.define_asset_job(
    "features_job", selection=[features, currency_universe],
    description="Rebuild the changed leagues' features and the currency universe, with their checks.")

defs = dg.Definitions(assets=[features, currency_universe], asset_checks=[features_no_lookahead],
                      jobs=[features_job])

"""``features`` (the Parquet feature store) and ``currency_universe`` (who gets a model)."""

import dagster as dg
import polars as pl

from poe_pipeline import universe as universe_rules
from poe_pipeline.features import FEATURE_COLUMNS, update_features
from poe_pipeline.leagues import current_league_of, league_calendar
from poe_pipeline.markdown import markdown_table
from poe_pipeline.prices import read_daily_prices
from poe_pipeline.resources import LakeResource, RunScopeResource

currency_partitions = dg.DynamicPartitionsDefinition(name="currency")


@dg.asset(
    group_name="features",
    kinds={"parquet", "polars"},
    deps=["daily_prices"],
    description="Leak-free, league-aware features and the 1/3/7-day targets, one row per (league, currency, date), "
    "under features/league=<L>/. Only leagues whose prices changed are recomputed.",
)
def features(context: dg.AssetExecutionContext, lake: LakeResource) -> dg.MaterializeResult:
    store = lake.lake
    prices = read_daily_prices(store)
    calendar = league_calendar(prices)
    written = update_features(prices, calendar, store)
    lake.publish_views(context.log)
    rebuilt = sorted(p.parent.name.removeprefix("league=") for p in written)
    context.log.info(f"features: rebuilt {len(rebuilt)} league(s): {', '.join(rebuilt) or 'none (up to date)'}")
    return dg.MaterializeResult(
        metadata={
            "leagues_rebuilt": rebuilt,
            "feature_count": len(FEATURE_COLUMNS),
            "leagues": len(calendar),
            "dagster/row_count": store_row_count(store),
        }
    )


def store_row_count(store) -> int:
    files = store.parquet_files(store.features)
    return pl.scan_parquet(files).select(pl.len()).collect().item() if files else 0


@dg.asset(
    group_name="features",
    kinds={"parquet", "duckdb"},
    deps=[features],
    description="Which currencies of the current league have enough history for a model, with the reason for "
    "each exclusion. Eligible currencies become `currency` partitions of currency_models (none are removed).",
)
def currency_universe(
    context: dg.AssetExecutionContext, lake: LakeResource, run_scope: RunScopeResource
) -> dg.MaterializeResult:
    store = lake.lake
    prices = read_daily_prices(store)
    calendar = league_calendar(prices)
    league = current_league_of(calendar, run_scope.league)
    universe = universe_rules.currency_universe(prices, calendar, league)
    universe_rules.write_universe(universe, store, league)
    lake.publish_views(context.log)
    eligible = universe.filter(pl.col("eligible"))["currency"].to_list()
    known = set(context.instance.get_dynamic_partitions(currency_partitions.name))
    new = [c for c in eligible if c not in known]
    if new:
        context.instance.add_dynamic_partitions(currency_partitions.name, new)
    context.log.info(f"{league}: {len(eligible)} of {universe.height} currencies eligible; {len(new)} new partitions")
    thresholds = universe_rules.DEFAULT_RULES.as_dict()
    return dg.MaterializeResult(
        metadata={
            "league": league,
            "eligible": len(eligible),
            "excluded": universe.height - len(eligible),
            "new_partitions": new,
            "thresholds": dg.MetadataValue.json(thresholds),
            "eligible_currencies": dg.MetadataValue.md(markdown_table(
                universe.filter(pl.col("eligible")).drop("eligible", "reason").head(60))),
            "excluded_reasons": dg.MetadataValue.md(markdown_table(
                universe.filter(~pl.col("eligible")).group_by("reason").len().sort("len", descending=True))),
        }
    )

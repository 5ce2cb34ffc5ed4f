"""Dagster assets: one module per stage, each a thin call into the domain modules."""

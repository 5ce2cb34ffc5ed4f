"""Helpers of the end-to-end tests: a throwaway PostgreSQL server and Dagster processes on loopback."""

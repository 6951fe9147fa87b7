"""Warehouses: a DuckDB file locally, BigQuery in the cloud profiles."""

"""Reporting from the Parquet files alone: statistics, figures, claims and the protocol comparison. Imports no model code."""

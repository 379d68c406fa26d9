"""Criteo-shaped data: the project's Parquet schema, the synthetic default dataset and the Parquet -> `Batch` reader."""

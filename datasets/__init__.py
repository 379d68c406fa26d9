"""Criteo-shaped data: the project's Parquet schema, the synthetic default dataset, the raw-text converter and the
Parquet -> `Batch` reader.

Imports: nothing from the other packages (datasets, sharding and quant are leaves; pipeline composes them, bench and
torchx_components sit on top; ``tests/test_layering.py`` checks every import against this order).
"""

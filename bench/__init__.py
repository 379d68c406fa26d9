"""Benchmarks: each ``python -m bench.NAME`` prints a table and writes ``bench/results/NAME.{json,txt}``.

Imports: datasets, sharding, quant, pipeline; never torchx_components (``tests/test_layering.py`` checks every
import against this order).
"""

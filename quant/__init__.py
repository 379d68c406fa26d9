"""Quantization-aware training and FBGEMM conversion (see quant.api).

Imports: sharding (only ``sharding.tbe``, the sharded model's kernels that QAT hooks and conversion reads); never
pipeline, bench or datasets (``tests/test_layering.py`` checks every import against this order).
"""

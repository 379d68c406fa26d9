"""Sharding plans and placement policy, the sharded model's TBEs (``sharding.tbe``), and gradient-communication
compression for TorchRec models.

Imports: nothing from the other packages (quant reads the sharded kernels through ``sharding.tbe``; pipeline composes
both; ``tests/test_layering.py`` checks every import against this order).
"""

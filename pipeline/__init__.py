"""Model assembly, the train/eval loop, checkpoints and the CLI entry points: the layer that composes the others.

Imports: datasets, sharding, quant; never bench or torchx_components (``tests/test_layering.py`` checks every import
against this order).
"""

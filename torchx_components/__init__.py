"""torchx job definitions: ``torchx run ./torchx_components/dlrm.py:train ...``.

Imports: nothing from the other packages: a component names its entry point (``python -m dqrm.pipeline.train``)
instead of importing it, so that torchx can read it without the stack (``tests/test_layering.py`` checks this).
"""

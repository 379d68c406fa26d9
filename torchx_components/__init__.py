"""torchx job definitions: ``torchx run ./torchx_components/dlrm.py:train ...``."""

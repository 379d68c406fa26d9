"""Quantization-aware training and FBGEMM conversion (see quant.api)."""

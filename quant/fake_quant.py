"""Fake-quantization arithmetic that reproduces FBGEMM's row-wise INT-N format bit for bit.

FBGEMM stores each row as ``[codes][fp16 scale][fp16 bias]`` and dequantizes ``value = scale * code + bias`` with
``code in [0, 2^b - 1]``. Its quantizer (``FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf``) takes
``bias = fp16(min(row))``, ``scale = fp16((max(row) - bias) / (2^b - 1))`` (1.0 where that is 0) and
``code = clamp(round_half_even((w - bias) * (1 / scale)), 0, 2^b - 1)``. The paper's symmetric per-table grid
fits the same format exactly: ``scale = fp16(max(alpha / (2^(b-1) - 1), 2^-24))`` on every row and
``bias = -2^(b-1) * scale``. No library offers this for TorchRec tables (torchao's embedding QAT is for
``nn.Embedding`` and not FBGEMM-exact), so it is written here.

Small tables. A scale below fp16's smallest normal (2^-14) is stored as an fp16 subnormal, which FBGEMM reads back
exactly: training, export and FBGEMM's TBE still share one grid (``tests/quant/test_embedding_qat.py``), but the
scale has fewer significant bits. A table grid with ``max|W| < (2^(b-1) - 1) * 2^-14`` (0.0078 at INT8, 4.3e-4 at
INT4; TorchRec initialises a 10M-row table to 3.2e-4) keeps all its levels with a scale good to 2^-25 absolute
(not 2^-11 relative), so its largest weights may clip by up to ``(2^(b-1) - 1) * 2^-25``. Below
``(2^(b-1) - 1) * 2^-24`` (7.6e-6 at INT8, 4.2e-7 at INT4) the scale is held at 2^-24, the finest step fp16 holds:
fewer levels are used and weights below 2^-25 become 0. FBGEMM's quantizer (and this grid before) put 1.0 where the
scale rounds to 0, which turned every weight of such a table into 0. Holding scales in the normal range instead
would cost levels and fix nothing: 11 of 255 INT8 levels for that 10M-row table, and any table with
``max|W| < 2^-15`` all 0. The row grid stays FBGEMM's quantizer, 1.0 included: there it gives a row whose range is
below ``(2^b - 1) * 2^-25`` its fp16 minimum throughout, an error within that range.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 4, 8)
FP16_MIN_NORMAL = 2.0 ** -14
"""fp16's smallest normal number: a scale below it keeps fewer than fp16's 11 significant bits."""
FP16_TINY = 2.0 ** -24
"""fp16's smallest positive (subnormal) number: the finest step an FBGEMM row's scale can hold."""


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def rowwise_qparams(rows: torch.Tensor, bits: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FBGEMM's asymmetric per-row (scale, bias), as fp16-rounded float32 columns of shape (n, 1)."""
    qmax = (2 ** torch.as_tensor(bits, device=rows.device) - 1).to(torch.float32).reshape(-1, 1)
    bias = _fp16(rows.amin(dim=1, keepdim=True))
    scale = _fp16((rows.amax(dim=1, keepdim=True) - bias) / qmax)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale, bias


def symmetric_qparams(alpha: torch.Tensor, bits: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's symmetric grid for ``alpha = max|W|`` in FBGEMM's (scale, bias) form (fp16-exact); a scale
    that fp16 would round to 0 is its smallest step, 2^-24 (see the module docstring)."""
    bits = torch.as_tensor(bits, device=alpha.device)
    half = (2 ** (bits - 1)).to(torch.float32)
    scale = _fp16((alpha.to(torch.float32) / (half - 1)).clamp(min=FP16_TINY))
    return scale, -half * scale  # exact: a power of two times an fp16 value (a multiple of 2^-24 below 2^-14)


def small_scale_tables(alpha: torch.Tensor, bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which table grids (``symmetric_qparams(alpha, bits)``) have a subnormal fp16 scale (all levels, a coarser
    scale) and which of them a scale held at 2^-24 (fewer levels): two bool tensors shaped like ``alpha``."""
    half = (2 ** (torch.as_tensor(bits, device=alpha.device) - 1)).to(torch.float32)
    exact = alpha.to(torch.float32) / (half - 1)
    return symmetric_qparams(alpha, bits)[0] < FP16_MIN_NORMAL, exact < FP16_TINY


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, bits: int | torch.Tensor) -> torch.Tensor:
    """Integer codes in ``[0, 2^b - 1]`` (float tensor), computed exactly as FBGEMM does."""
    qmax = (2 ** torch.as_tensor(bits, device=w.device) - 1).to(torch.float32)
    if qmax.dim() == 1:
        qmax = qmax.reshape(-1, 1)
    codes = torch.round((w - bias) * (1.0 / scale))  # torch.round is round-half-to-even
    return torch.minimum(codes.clamp_(min=0), qmax)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, bits: int | torch.Tensor) -> torch.Tensor:
    """``scale * code + bias``: the value FBGEMM's integer kernel will see for ``w``."""
    return quantize_codes(w, scale, bias, bits) * scale + bias


def pack_rows(codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack codes into FBGEMM's bytes (element 2k in the low nibble for INT4) and (scale, bias) into 4 bytes/row."""
    c = codes.to(torch.uint8)
    per_byte = 8 // bits
    rows, dim = c.shape
    if dim % per_byte:
        c = torch.cat([c, c.new_zeros(rows, per_byte - dim % per_byte)], dim=1)
    c = c.view(rows, -1, per_byte)
    packed = torch.zeros(c.shape[:2], dtype=torch.uint8)
    for k in range(per_byte):
        packed |= c[:, :, k] << (k * bits)
    return packed.contiguous(), scale_bias_bytes(scale, bias).reshape(rows, 4)


def scale_bias_bytes(scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(scale, bias) per row as FBGEMM stores them: fp16 scale then fp16 bias, 4 bytes a row, on the CPU."""
    sb = torch.cat([scale.reshape(-1, 1), bias.reshape(-1, 1)], dim=1).to(torch.float16).cpu().contiguous()
    return sb.view(torch.uint8)

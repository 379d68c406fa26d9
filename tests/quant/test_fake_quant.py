"""The fake-quant arithmetic is FBGEMM's, bit for bit."""

import fbgemm_gpu  # noqa: F401
import pytest
import torch

from dqrm.quant.fake_quant import fake_quantize, pack_rows, quantize_codes, rowwise_qparams, symmetric_qparams
from dqrm.quant.mlp_qat import QuantizedLinear, RowwiseWeightFakeQuant


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_rowwise_matches_fbgemm_quantizer_bit_exact(bits):
    torch.manual_seed(bits)
    w = torch.randn(513, 16) * torch.rand(513, 1) * 3
    w[7] = 0.25  # a constant row: FBGEMM uses scale 1.0 there
    w[8:12] *= torch.tensor([[3e-4], [3e-5], [1e-6], [1e-9]])  # small ranges: subnormal fp16 scales, and 1.0
    w[12:14] = 1e-3 + w[12:14] * 1e-6  # a small range away from 0
    fused = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(w, bits)
    dequant = torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(fused, bits)
    scale, bias = rowwise_qparams(w, bits)
    assert torch.equal(fake_quantize(w, scale, bias, bits), dequant)
    codes, sb = pack_rows(quantize_codes(w, scale, bias, bits), scale, bias, bits)
    assert torch.equal(torch.cat([codes, sb], dim=1), fused)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_symmetric_table_grid_is_exact_in_fbgemm_format(bits):
    torch.manual_seed(0)
    w = torch.randn(300, 16)
    alpha = w.abs().max()
    scale, bias = symmetric_qparams(alpha.reshape(1), bits)
    scale, bias = scale.expand(300, 1), bias.expand(300, 1)
    fq = fake_quantize(w, scale, bias, bits)
    # Symmetric: values are integer multiples of the fp16 scale in [-2^(b-1), 2^(b-1)-1].
    k = fq / scale
    assert torch.equal(k, torch.round(k))
    assert k.min() >= -(2 ** (bits - 1)) and k.max() <= 2 ** (bits - 1) - 1
    assert (fq - w).abs().max() <= scale[0, 0] / 2 + 1e-7
    # FBGEMM's own dequantizer reads our packed rows back to the same values.
    codes, sb = pack_rows(quantize_codes(w, scale, bias, bits), scale, bias, bits)
    dequant = torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(torch.cat([codes, sb], 1), bits)
    assert torch.equal(dequant, fq)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("alpha", [3e-4, 3e-5, 1e-6, 1e-7, 1e-9, 0.0])
def test_small_table_grid_is_the_finest_fp16_grid_and_fbgemm_reads_it_back(bits, alpha):
    """max|W| below (2^(b-1) - 1) * 2^-14: a subnormal fp16 scale, or fp16's smallest step 2^-24 where the exact
    scale is below it (it used to become 1.0, every weight 0); FBGEMM's dequantizer gives the fake-quant values."""
    gen = torch.Generator().manual_seed(bits)
    w = torch.rand(64, 16, generator=gen) * 2 - 1
    w = w * (alpha / w.abs().max())
    half = 2 ** (bits - 1)
    scale, bias = symmetric_qparams(w.abs().max().reshape(1, 1), bits)
    s = float(scale)
    assert s == float(scale.half()) and float(bias) == float(bias.half()) and s >= 2 ** -24
    exact = alpha / (half - 1)
    assert abs(s - max(exact, 2 ** -24)) <= max(exact * 2 ** -11, 2 ** -25)  # the nearest fp16 at or above 2^-24
    fq = fake_quantize(w, scale, bias, bits)
    assert (fq - w).abs().max() <= max(s / 2, alpha - (half - 1) * s) * (1 + 1e-6)  # half a step, or the top clip
    assert bool((fq != 0).any()) == (alpha > 2 ** -25)  # only weights below fp16's half step become 0
    codes, sb = pack_rows(quantize_codes(w, scale, bias, bits), scale.expand(64, 1), bias.expand(64, 1), bits)
    dequant = torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(torch.cat([codes, sb], 1), bits)
    assert torch.equal(dequant, fq)


def test_mlp_fake_quant_has_exact_forward_and_straight_through_gradient():
    torch.manual_seed(0)
    w = torch.randn(8, 5, requires_grad=True)
    fq = RowwiseWeightFakeQuant(4)
    out = fq(w)
    # the grid by its definition: per row, scale = max|row| / 7, values = scale * integers in [-8, 7], the
    # largest |value| of each row on the grid's end
    scale = w.detach().abs().amax(1, keepdim=True) / 7
    steps = out.detach() / scale
    assert torch.allclose(steps, steps.round(), atol=1e-5) and steps.round().abs().max() <= 8
    assert torch.allclose(steps.round().abs().amax(1), torch.full((8,), 7.0))
    assert torch.allclose(out.detach(), w.detach(), atol=float(scale.max()) / 2 + 1e-6)
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    lin = torch.nn.Linear(5, 8)
    with torch.no_grad():
        lin.weight.copy_(w)
    q = QuantizedLinear.from_linear(lin, 4)
    x = torch.randn(3, 5)
    assert torch.equal(q(x), torch.nn.functional.linear(x, fq(w.detach()), lin.bias))
    assert q.codes.dtype == torch.int8 and q.codes.abs().amax(1).eq(7).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_mlp_fake_quant_equals_the_exported_codes_times_scales_bit_for_bit(bits):
    gen = torch.Generator().manual_seed(bits)
    rows = [torch.randn(1, 37, generator=gen) * 10.0 ** e for e in range(-30, 6, 3)]
    rows += [torch.zeros(1, 37), torch.full((1, 37), 1e-39), torch.full((1, 37), -3e-38)]  # zero and subnormal rows
    w = torch.cat(rows)
    lin = torch.nn.Linear(37, w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
    q = QuantizedLinear.from_linear(lin, bits)
    expected = q.codes.float() * q.scale.unsqueeze(1)
    assert torch.equal(RowwiseWeightFakeQuant(bits)(w), expected)
    assert torch.isfinite(expected).all() and q.codes.int().abs().max() <= 2 ** (bits - 1)


def test_step_count_follows_the_buffer_across_a_state_dict_load():
    # The refresh schedule is counted in Python (no device read per step) but must follow a loaded checkpoint.
    from dqrm.quant.embedding_qat import EmbeddingFakeQuantizer

    class Counting(EmbeddingFakeQuantizer):
        refreshed: list[int] = []

        def update_scales(self, incremental: bool = False) -> None:
            self.refreshed.append(int(self.steps))

    q = Counting([], [], {}, "table", scale_update_every=3)
    saved = None
    for step in range(7):
        if step == 4:
            saved = {k: v.clone() for k, v in q.state_dict().items()}
        q.on_train_step()
    assert int(q.steps) == 7 and q.refreshed == [0, 3, 6]
    q.load_state_dict(saved)  # back to step 4
    q.on_train_step()
    q.on_train_step()
    q.on_train_step()
    assert int(q.steps) == 7 and q.refreshed == [0, 3, 6, 6]
    # A loaded tensor that replaces the buffer (its version number may equal the old buffer's).
    loaded = torch.tensor(100)
    while loaded._version < q.steps._version:
        loaded.add_(0)
    assert loaded._version == q.steps._version  # the collision a version check alone would miss
    q.load_state_dict({**q.state_dict(), "steps": loaded}, assign=True)
    q.on_train_step()
    assert int(q.steps) == 101

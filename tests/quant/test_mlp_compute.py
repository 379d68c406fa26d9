"""bfloat16 MLPs (``quant.mlp_compute=bfloat16``): training differentiates the op the artifact serves, so the integer
MLP's outputs are the fake-quant MLP's bit for bit, in training and evaluation mode, at any batch size."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchrec.models.dlrm import DenseArch, OverArch

from dqrm.quant.convert import integer_mlp
from dqrm.quant.mlp_qat import FakeQuantLinear, fake_quantize_linears, use_bfloat16
from dqrm.quant.spec import QuantSpec


def _arches(bf16: bool):
    torch.manual_seed(3)
    dense, over = DenseArch(13, [64, 32, 16]), OverArch(367, [128, 64, 1])
    fake_quantize_linears(dense, 4)
    fake_quantize_linears(over, 4)
    if bf16:
        use_bfloat16(dense, over)
    return dense, over


def _forward(dense: nn.Module, over: nn.Module, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The two arches as the DLRM chains them: the dense arch's output joins float32 features (the interaction's)."""
    return over(torch.cat([dense(x), z], dim=1))


def test_bfloat16_layers_are_marked_as_documented():
    dense, over = _arches(bf16=True)
    d = [m for m in dense.modules() if isinstance(m, FakeQuantLinear)]
    o = [m for m in over.modules() if isinstance(m, FakeQuantLinear)]
    assert [m.bf16 for m in d] == [True] * 3 and [m.float_output for m in d] == [False, False, True]
    assert [m.bf16 for m in o] == [True, True, False]  # the logit layer stays float32
    torch.manual_seed(0)
    assert dense(torch.randn(4, 13)).dtype == torch.float32
    assert o[0](torch.randn(4, 367)).dtype == torch.bfloat16


def test_served_bfloat16_mlp_equals_the_trained_one_bit_for_bit():
    dense, over = _arches(bf16=True)
    torch.manual_seed(1)
    x, z = torch.randn(2048, 13) * 3, torch.randn(2048, 351)
    trained = _forward(dense, over, x, z)  # training mode, autograd recording
    trained.sum().backward()
    weights = [m.weight for m in [*dense.modules(), *over.modules()] if isinstance(m, FakeQuantLinear)]
    assert all(w.grad is not None and w.grad.dtype == torch.float32 and w.grad.abs().sum() > 0 for w in weights)
    with torch.no_grad():
        evaluated = _forward(dense.eval(), over.eval(), x, z)
        served_dense = torch.jit.script(integer_mlp(dense, 4).eval())
        served_over = torch.jit.script(integer_mlp(over, 4).eval())
        served = _forward(served_dense, served_over, x, z)
        # a row's logit hardly depends on its batch: serving at batch 1 and 64 gives the batch-2048 values
        alone = torch.cat([_forward(served_dense, served_over, x[i:i + 1], z[i:i + 1]) for i in range(8)])
        small = _forward(served_dense, served_over, x[:64], z[:64])
        dense32, over32 = _arches(bf16=False)
        dense32.load_state_dict(dense.state_dict())
        over32.load_state_dict(over.state_dict())
        float32 = _forward(dense32.eval(), over32.eval(), x, z)
    assert torch.equal(trained.detach(), evaluated)
    assert torch.equal(served, evaluated)
    # (the float32 logit layer's GEMM may sum in another order at another batch size: ~1e-8)
    assert torch.allclose(alone, evaluated[:8], rtol=0, atol=1e-6)
    assert torch.allclose(small, evaluated[:64], rtol=0, atol=1e-6)
    # and bfloat16 is really used: the float32 MLP on the same weights gives other logits
    assert (float32 - evaluated).abs().max() > 1e-3


def test_bfloat16_needs_integer_mlp_weights():
    with pytest.raises(ValueError, match="mlp_bits 4 or 8"):
        QuantSpec(mlp_bits=0, mlp_compute="bfloat16")
    with pytest.raises(ValueError, match="mlp_compute must be one of"):
        QuantSpec(mlp_compute="fp16")


def test_use_bfloat16_refuses_an_mlp_without_fake_quant():
    dense, over = DenseArch(13, [16]), OverArch(32, [8, 1])
    with pytest.raises(ValueError, match="fake_quantize_linears first"):
        use_bfloat16(copy.deepcopy(dense), over)

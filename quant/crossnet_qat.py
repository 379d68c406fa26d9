"""QAT of DCNv2's low-rank cross layers (``torchrec.modules.crossnet.LowRankCrossNet``): per-row weight fake-quant of
their ``ParameterList`` kernels in training, integer codes with row scales in serving.

TorchRec's ``LowRankCrossNet`` holds its kernels as ``nn.ParameterList``s and calls ``F.linear`` on them, so nothing
that fake-quantizes ``nn.Linear`` modules (``quant.mlp_qat``, torchao's ``FakeQuantizedLinear``, torch.ao's QAT
swaps) reaches them, and no library has an integer cross layer. At DLRMv2's sizes (3 layers, rank 512, 27 x 128
inputs) they hold 10.6M of the model's float weights, more than the MLPs, so they are quantized here on the MLPs'
grid: one symmetric scale per output row (``V``: ``r x N``, one per low-rank output; ``W``: ``N x r``, one per
feature), the same straight-through estimator (``quant.mlp_qat.fake_quant_weight``), the bias float. The served layer
keeps the codes and scales of each kernel in a ``QuantizedLinear`` (``codes * scale`` on first use), so its values are
the fake-quant forward's bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.crossnet import LowRankCrossNet

from dqrm.quant.mlp_qat import QuantizedLinear, RowwiseWeightFakeQuant, fake_quant_weight


class FakeQuantLowRankCrossNet(nn.Module):
    """``LowRankCrossNet``'s forward on fake-quantized kernels. It holds the *same* ``ParameterList``s (the same
    Parameter objects) as the cross net it replaces, so state-dict keys, an existing DDP wrapper and an optimizer
    built before or after are unchanged (see ``quant.mlp_qat.FakeQuantLinear``)."""

    def __init__(self, crossnet: LowRankCrossNet, bits: int) -> None:
        super().__init__()
        self._num_layers = crossnet._num_layers  # noqa: SLF001 - the layer count TorchRec keeps, no public getter
        self.W_kernels, self.V_kernels, self.bias = crossnet.W_kernels, crossnet.V_kernels, crossnet.bias
        self.fake_quant = RowwiseWeightFakeQuant(bits)

    def _weight(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quant_weight(w, self.fake_quant.bits) if self.fake_quant.enabled else w

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x_0 = x_l = input
        for layer in range(self._num_layers):  # TorchRec's arithmetic, op for op
            x_l_v = F.linear(x_l, self._weight(self.V_kernels[layer]))
            x_l_w = F.linear(x_l_v, self._weight(self.W_kernels[layer]))
            x_l = x_0 * (x_l_w + self.bias[layer]) + x_l
        return x_l


class _QuantizedCrossLayer(nn.Module):
    def __init__(self, v: QuantizedLinear, w: QuantizedLinear, bias: torch.Tensor) -> None:
        super().__init__()
        self.v, self.w = v, w
        self.register_buffer("bias", bias.detach().float().clone())

    def forward(self, x_0: torch.Tensor, x_l: torch.Tensor) -> torch.Tensor:
        return x_0 * (self.w(self.v(x_l)) + self.bias) + x_l


class QuantizedLowRankCrossNet(nn.Module):
    """The served cross net: each kernel as integer codes with fp32 row scales (a ``QuantizedLinear`` without bias,
    dequantized once on first use), the bias float. ``F.linear`` on ``codes * scale``: the fake-quant values."""

    def __init__(self, layers: list[_QuantizedCrossLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x_l = input
        for layer in self.layers:
            x_l = layer(input, x_l)
        return x_l

    @classmethod
    def from_crossnet(cls, crossnet: nn.Module, bits: int) -> "QuantizedLowRankCrossNet":
        """From a ``FakeQuantLowRankCrossNet`` or a float ``LowRankCrossNet`` (quantized post-training)."""
        layers = []
        for v, w, b in zip(crossnet.V_kernels, crossnet.W_kernels, crossnet.bias):
            layers.append(_QuantizedCrossLayer(_kernel(v, bits), _kernel(w, bits), b))
        return cls(layers)


def _kernel(weight: torch.Tensor, bits: int) -> QuantizedLinear:
    holder = nn.Module()  # QuantizedLinear.from_linear reads .weight and .bias
    holder.weight, holder.bias = weight, None
    return QuantizedLinear.from_linear(holder, bits)


def float_crossnet(crossnet: nn.Module) -> LowRankCrossNet:
    """A plain float ``LowRankCrossNet`` with the kernels of ``crossnet`` (a fake-quant one served unquantized)."""
    n, r = crossnet.W_kernels[0].shape
    out = LowRankCrossNet(in_features=n, num_layers=len(crossnet.W_kernels), low_rank=r)
    out.load_state_dict({k: v.detach().clone() for k, v in crossnet.state_dict().items()})
    return out

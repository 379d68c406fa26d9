"""Which dense layers of a model QAT quantizes, found by type and a filter (torchao's ``filter_fn(module, fqn)``),
and their swaps: float -> fake-quant (prepare) and fake-quant (or float) -> integer (convert).

The layers QAT knows are ``nn.Linear`` (exactly that type: ``quant.mlp_qat``) and TorchRec's
``LowRankCrossNet`` (DCNv2's cross layers, ``ParameterList`` kernels: ``quant.crossnet_qat``). torchao's
``quantize_`` walks a model the same way but knows neither TorchRec's cross net nor this grid (``quant.mlp_qat``
says why it is not adopted), so the walk is written here.
"""

from __future__ import annotations

import copy
from typing import Callable

from torch import nn
from torchrec.modules.crossnet import LowRankCrossNet

from dqrm.quant.crossnet_qat import FakeQuantLowRankCrossNet, QuantizedLowRankCrossNet, float_crossnet
from dqrm.quant.mlp_qat import FakeQuantGroup, FakeQuantLinear, QuantizedLinear

DenseFilter = Callable[[nn.Module, str], bool]
"""``filter_fn(module, fqn) -> bool``: whether a dense layer (an ``nn.Linear`` or a ``LowRankCrossNet``) at ``fqn``
(its name under the unwrapped model) is quantized."""


def every_dense_layer(module: nn.Module, fqn: str) -> bool:
    """The default filter: every ``nn.Linear`` and every ``LowRankCrossNet``."""
    return True


def _walk(root: nn.Module, prefix: str = ""):
    """(parent, child name, fqn, child) for every module under ``root``, parents first, in module order; the
    insides of dense layers are not entered."""
    for name, child in list(root.named_children()):
        fqn = f"{prefix}{name}"
        yield root, name, fqn, child
        if not isinstance(child, (nn.Linear, LowRankCrossNet, FakeQuantLinear, FakeQuantLowRankCrossNet)):
            yield from _walk(child, fqn + ".")


def prepare_dense_layers(model: nn.Module, bits: int, filter_fn: DenseFilter) -> list[tuple[str, nn.Module]]:
    """Swap each filtered ``nn.Linear`` for a ``FakeQuantLinear`` (one ``FakeQuantGroup`` for all: one call per
    step fake-quantizes every layer) and each filtered ``LowRankCrossNet`` for a ``FakeQuantLowRankCrossNet``, in
    place; returns the new modules with their names, in module order."""
    group = FakeQuantGroup(bits)
    out = []
    for parent, name, fqn, child in list(_walk(model)):
        if type(child) is nn.Linear and filter_fn(child, fqn):
            new = FakeQuantLinear(child, bits, group)
        elif type(child) is LowRankCrossNet and filter_fn(child, fqn):
            new = FakeQuantLowRankCrossNet(child, bits)
        else:
            continue
        setattr(parent, name, new)
        out.append((fqn, new))
    return out


def use_bfloat16_by_arch(layers: list[tuple[str, nn.Module]]) -> None:
    """Make fake-quant Linears compute in bfloat16 (``quant.mlp_qat.linear``), arch by arch: an arch is the child,
    under the layers' common ancestor, that holds them (DLRM: the dense and the over arch; a two-tower: each tower).
    Each arch hands float32 to what follows it, and the model's last layer, whose output is the logit, stays
    float32 (DLRM: exactly ``quant.mlp_qat.use_bfloat16``). Cross layers stay float32."""
    linears = [(fqn, m) for fqn, m in layers if isinstance(m, FakeQuantLinear)]
    if not linears:
        raise ValueError("bfloat16 MLPs need fake-quant Linears: none was prepared")
    paths = [fqn.split(".") for fqn, _ in linears]
    depth = 0
    while all(len(p) > depth + 1 for p in paths) and len({p[depth] for p in paths}) == 1:
        depth += 1
    archs: dict[str, list[FakeQuantLinear]] = {}
    for path, (_, m) in zip(paths, linears):
        archs.setdefault(path[depth], []).append(m)
    for arch in archs.values():
        for layer in arch:
            layer.bf16 = True
        arch[-1].float_output = True
    linears[-1][1].bf16 = False


def convert_dense_layers(model: nn.Module, bits: int, filter_fn: DenseFilter, prefix: str = "") -> None:
    """In place, on the integer model's copy: every fake-quant layer to its integer form (``QuantizedLinear``,
    ``QuantizedLowRankCrossNet``), and every float one the filter accepts too (post-training quantization); at 0
    bits the fake-quant layers become float ones again. ``prefix``: ``model``'s name under the unwrapped model that
    was prepared, so that the filter sees the fqns prepare showed it."""
    for parent, name, fqn, child in list(_walk(model, prefix)):
        linear = isinstance(child, FakeQuantLinear) or (type(child) is nn.Linear and filter_fn(child, fqn))
        cross = isinstance(child, FakeQuantLowRankCrossNet) or (type(child) is LowRankCrossNet and
                                                                filter_fn(child, fqn))
        if linear:
            setattr(parent, name, QuantizedLinear.from_linear(child, bits) if bits else _plain_linear(child))
        elif cross:
            setattr(parent, name, QuantizedLowRankCrossNet.from_crossnet(child, bits) if bits
                    else float_crossnet(child))


def _plain_linear(layer: nn.Module) -> nn.Linear:
    if type(layer) is nn.Linear:
        return copy.deepcopy(layer)
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    out.weight.data.copy_(layer.weight.detach())
    if layer.bias is not None:
        out.bias.data.copy_(layer.bias.detach())
    return out

"""``quantize_``: the one verb of ``quant/``, torchao-shaped (prepare -> train -> convert)."""

from __future__ import annotations

import dataclasses

import torch.distributed as dist
from torch import nn

from dqrm.quant.convert import convert_dlrm
from dqrm.quant.embedding_qat import QUANTIZER_NAME, EmbeddingFakeQuantizer, attach_embedding_qat, embedding_quantizer
from dqrm.quant.mlp_qat import FakeQuantGroup, RowwiseWeightFakeQuant, fake_quantize_linears, use_bfloat16
from dqrm.quant.spec import QuantSpec
from dqrm.sharding.tbe import table_configs

# The public face of quant/: the verb, its config, and what a prepared model holds.
__all__ = ["QATConfig", "QuantSpec", "embedding_quantizer", "quantize_", "set_fake_quant"]


@dataclasses.dataclass(kw_only=True)
class QATConfig:
    """What ``quantize_`` does: ``prepare`` inserts fake-quant, ``convert`` builds the FBGEMM integer model."""

    spec: QuantSpec = dataclasses.field(default_factory=QuantSpec)
    """The integer grid: bits per table and for the MLPs, granularity, scale refresh period."""
    step: str = "prepare"
    """'prepare' (insert fake-quant before training) or 'convert' (build the FBGEMM integer model after)."""

    def __post_init__(self) -> None:
        if self.step not in ("prepare", "convert"):
            raise ValueError(f"step must be 'prepare' or 'convert', got {self.step!r}")


def quantize_(model: nn.Module, config: QATConfig, *, pg: dist.ProcessGroup | None = None) -> nn.Module:
    """``prepare``: in place on a sharded (DMP) DLRMTrain, before its optimizer is built; returns ``model``.
    ``convert``: returns a new integer inference ``DLRM`` (collective: every rank calls it, rank 0 gets the model,
    the others ``None``)."""
    if config.step == "convert":
        return convert_dlrm(model, config.spec, pg=pg)
    inner = model.module if hasattr(model, "module") else model
    spec = config.spec
    if spec.mlp_bits:
        group = FakeQuantGroup(spec.mlp_bits)  # both arches' weights fake-quantized in one call per step
        fake_quantize_linears(inner.model.dense_arch, spec.mlp_bits, group)
        fake_quantize_linears(inner.model.over_arch, spec.mlp_bits, group)
        if spec.mlp_compute == "bfloat16":
            use_bfloat16(inner.model.dense_arch, inner.model.over_arch)
    names = [t.name for t in table_configs(model)]
    bits = {n: spec.bits_for(n) for n in names}
    if any(bits.values()):
        if any(b == 0 for b in bits.values()):
            raise NotImplementedError("mixing FP32 and integer tables is not supported; give every table bits")
        quantizer = attach_embedding_qat(model, names, bits, spec.granularity, spec.scale_update_every, pg)
        inner.add_module(QUANTIZER_NAME, quantizer)
        inner.register_forward_pre_hook(_count_step)
    return model


def _count_step(module: nn.Module, args) -> None:
    quantizer = getattr(module, QUANTIZER_NAME)
    if module.training and quantizer.enabled:
        quantizer.on_train_step()


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    """Switch every fake-quant of a prepared model on or off (off: the float model, e.g. for post-training
    quantization, which trains in float and quantizes only to evaluate and export)."""
    inner = model.module if hasattr(model, "module") else model
    for m in inner.modules():
        if isinstance(m, (RowwiseWeightFakeQuant, EmbeddingFakeQuantizer)):
            m.enabled = enabled

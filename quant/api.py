"""``quantize_``: the one verb of ``quant/``, torchao-shaped (prepare -> train -> convert)."""

from __future__ import annotations

import dataclasses

import torch.distributed as dist
from torch import nn

from quant.embedding_qat import EmbeddingFakeQuantizer, attach_embedding_qat
from quant.fake_quant import SUPPORTED_BITS
from quant.mlp_qat import FakeQuantGroup, RowwiseWeightFakeQuant, fake_quantize_linears
from sharding.tbe import table_configs

QUANTIZER_NAME = "embedding_fake_quant"


@dataclasses.dataclass(kw_only=True)
class QuantSpec:
    """The integer grid a model is trained for and converted to."""

    embedding_bits: int = 4
    """Bits of every embedding table (2, 4 or 8; 0 keeps tables FP32)."""
    granularity: str = "table"
    """'table': the paper's symmetric per-table scale; 'row': FBGEMM's asymmetric per-row scale and bias."""
    scale_update_every: int = 200
    """Training steps between recomputations of the per-table scale (table granularity)."""
    table_bits: dict[str, int] = dataclasses.field(default_factory=dict)
    """Per-table bit widths overriding embedding_bits, e.g. {'t_cat_3': 8}."""
    mlp_bits: int = 4
    """Bits of the MLP weights, one scale per output row (4 or 8; 0 keeps MLPs FP32)."""
    row_alignment: int = 1
    """Bytes every exported table row (fp16 scale and bias, then codes) is padded to. 1 is FBGEMM's CPU default and
    measured no slower than TorchRec's 16 (bench/row_alignment.py), which pads INT4 rows of dimension 16 from 12 to
    16 bytes; set 16 for an artifact to be served by FBGEMM's CUDA kernels."""

    def __post_init__(self) -> None:
        for name, b in [("embedding_bits", self.embedding_bits), *self.table_bits.items()]:
            if b != 0 and b not in SUPPORTED_BITS:
                raise ValueError(f"{name}: {b} bits unsupported; FBGEMM offers {SUPPORTED_BITS} (or 0 for FP32)")
        if self.mlp_bits not in (0, 4, 8):
            raise ValueError(f"mlp_bits must be 0, 4 or 8, got {self.mlp_bits}")
        if self.granularity not in ("table", "row"):
            raise ValueError(f"granularity must be 'table' or 'row', got {self.granularity!r}")
        if self.row_alignment < 1 or self.row_alignment & (self.row_alignment - 1):
            raise ValueError(f"row_alignment must be a power of two, got {self.row_alignment}")
        if self.scale_update_every < 1:
            raise ValueError(f"scale_update_every must be >= 1, got {self.scale_update_every}")

    def bits_for(self, table: str) -> int:
        return self.table_bits.get(table, self.embedding_bits)


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
        from quant.convert import convert_dlrm

        return convert_dlrm(model, config.spec, pg=pg)
    inner = model.module if hasattr(model, "module") else model
    spec = config.spec
    if spec.mlp_bits:
        group = FakeQuantGroup(spec.mlp_bits)  # both arches' weights fake-quantized in one call per step
        fake_quantize_linears(inner.model.dense_arch, spec.mlp_bits, group)
        fake_quantize_linears(inner.model.over_arch, spec.mlp_bits, group)
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


def embedding_quantizer(model: nn.Module) -> EmbeddingFakeQuantizer | None:
    inner = model.module if hasattr(model, "module") else model
    return getattr(inner, QUANTIZER_NAME, None)

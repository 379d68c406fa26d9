"""``quantize_``: the one verb of ``quant/``, torchao-shaped (prepare -> train -> convert)."""

from __future__ import annotations

import dataclasses

import torch.distributed as dist
from torch import nn

from dqrm.quant.dense_layers import DenseFilter, every_dense_layer, prepare_dense_layers, use_bfloat16_by_arch
from dqrm.quant.embedding_qat import QUANTIZER_NAME, EmbeddingFakeQuantizer, attach_embedding_qat, embedding_quantizer
from dqrm.quant.integer_model import convert_model
from dqrm.quant.mlp_qat import RowwiseWeightFakeQuant
from dqrm.quant.spec import QuantSpec
from dqrm.sharding.tbe import table_configs

# The public face of quant/: the verb, its config, and what a prepared model holds.
__all__ = ["DenseFilter", "QATConfig", "QuantSpec", "embedding_quantizer", "every_dense_layer", "quantize_",
           "set_fake_quant"]


@dataclasses.dataclass(kw_only=True)
class QATConfig:
    """What ``quantize_`` does: ``prepare`` inserts fake-quant, ``convert`` builds the FBGEMM integer model."""

    spec: QuantSpec = dataclasses.field(default_factory=QuantSpec)
    """The integer grid: bits per table and for the MLPs, granularity, scale refresh period."""
    step: str = "prepare"
    """'prepare' (insert fake-quant before training) or 'convert' (build the FBGEMM integer model after)."""
    filter_fn: DenseFilter = every_dense_layer
    """``filter_fn(module, fqn) -> bool`` (torchao's): which dense layers get weight QAT at ``spec.mlp_bits``, among
    the model's ``nn.Linear``s and TorchRec ``LowRankCrossNet``s (DCNv2's cross layers); ``fqn`` is the name under the
    unwrapped model. Default: all of them. Pass the same filter to prepare and convert. The embedding tables of every
    ``EmbeddingBagCollection`` (found by type) are quantized at ``spec``'s bits whatever the filter says."""

    def __post_init__(self) -> None:
        if self.step not in ("prepare", "convert"):
            raise ValueError(f"step must be 'prepare' or 'convert', got {self.step!r}")
        if not callable(self.filter_fn):
            raise TypeError(f"filter_fn must be callable (module, fqn) -> bool, got {self.filter_fn!r}")


def quantize_(model: nn.Module, config: QATConfig, *, pg: dist.ProcessGroup | None = None) -> nn.Module:
    """For any TorchRec model whose embeddings are ``EmbeddingBagCollection``s (found by type) and whose forward (or
    a submodule's) is ``forward(dense_features, sparse_features)``: DLRM, DLRM_DCN, a two-tower, in a training
    wrapper such as ``DLRMTrain`` or not.

    ``prepare``: in place, on the DMP-sharded model (any plan; embedding QAT hooks the fused kernels DMP builds)
    before its optimizer is built; returns ``model``. The filtered dense layers alone can be prepared on an unsharded
    model (``spec.embedding_bits=0``). ``convert``: returns a new integer inference model, the serving root's copy
    (for a ``DLRMTrain``, its ``DLRM``), collective: every rank calls it, rank 0 gets the model, the others ``None``
    (``quant.integer_model``)."""
    if config.step == "convert":
        converted = convert_model(model, config.spec, config.filter_fn)
        return None if converted is None else converted.module
    inner = model.module if hasattr(model, "module") else model
    spec = config.spec
    if spec.mlp_bits:
        layers = prepare_dense_layers(inner, spec.mlp_bits, config.filter_fn)
        if spec.mlp_compute == "bfloat16":
            use_bfloat16_by_arch(layers)
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

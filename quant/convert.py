"""``convert``: a QAT-trained (or float) sharded DLRM -> an integer inference DLRM on FBGEMM kernels.

Embedding tables become TorchRec's quantized ``EmbeddingBagCollection`` (FBGEMM
``IntNBitTableBatchedEmbeddingBagsCodegen``) holding exactly the codes, scales and biases of the QAT grid; MLP
weights become ``QuantizedLinear``. This is the one place that calls TorchRec's quantization API, whose home is
scheduled to move.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection

from quant.api import QuantSpec, embedding_quantizer
from quant.fake_quant import pack_rows, quantize_codes, rowwise_qparams, symmetric_qparams
from quant.mlp_qat import FakeQuantLinear, QuantizedLinear
from quant.tbe import table_configs

_DATA_TYPES = {8: DataType.INT8, 4: DataType.INT4, 2: DataType.INT2}


def gather_full_state(model: nn.Module, dst: int = 0) -> dict[str, torch.Tensor] | None:
    """The unsharded state dict on rank ``dst`` (``None`` elsewhere); collective over the default group."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    out: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    for key in sorted(state):
        value = state[key]
        if hasattr(value, "gather") and hasattr(value, "local_shards"):  # ShardedTensor
            full = torch.empty(value.size(), dtype=value.dtype) if rank == dst else None
            value.gather(dst=dst, out=full)
            if rank == dst:
                out[key] = full
        elif isinstance(value, torch.Tensor):
            out[key] = value.detach().cpu().clone()
    return out if rank == dst else None


def quantize_table(weight: torch.Tensor, bits: int, granularity: str, alpha: torch.Tensor | None):
    """FBGEMM row-wise bytes (codes, scale_bias) of one table on the QAT grid."""
    w = weight.detach().float().cpu()
    if granularity == "table":
        scale, bias = symmetric_qparams(alpha.reshape(1).float(), bits)
        scale, bias = scale.expand(w.shape[0], 1), bias.expand(w.shape[0], 1)
    else:
        scale, bias = rowwise_qparams(w, bits)
    return pack_rows(quantize_codes(w, scale, bias, bits), scale, bias, bits)


def _table_key(name: str) -> str:
    return f"model.sparse_arch.embedding_bag_collection.embedding_bags.{name}.weight"


def integer_mlp(mlp: nn.Module, bits: int) -> nn.Module:
    """A copy of ``mlp`` with every (fake-quant) Linear replaced by a ``QuantizedLinear`` (a plain Linear at 0 bits)."""
    mlp = copy.deepcopy(mlp)
    for module in list(mlp.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (nn.Linear, FakeQuantLinear)):
                setattr(module, name, QuantizedLinear.from_linear(child, bits) if bits else _plain_linear(child))
    return mlp


def _plain_linear(layer: nn.Module) -> nn.Linear:
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        out.weight.copy_(layer.weight)
        if layer.bias is not None:
            out.bias.copy_(layer.bias)
    return out


def convert_dlrm(model: nn.Module, spec: QuantSpec, *, pg: dist.ProcessGroup | None = None) -> DLRM | None:
    inner = model.module if hasattr(model, "module") else model
    quantizer = embedding_quantizer(model)
    if spec.granularity == "table" and quantizer is None:
        raise ValueError("table granularity needs the scales of a prepared model: call quantize_(..., 'prepare') "
                         "first (for post-training quantization, prepare after training and call update_scales())")
    state = gather_full_state(model)
    if state is None:
        return None
    configs = table_configs(model)
    tables, weights = [], {}
    for cfg in configs:
        bits = spec.bits_for(cfg.name)
        alpha = None
        if quantizer is not None and spec.granularity == "table":
            alpha = quantizer.alpha[quantizer.table_names.index(cfg.name)]
        weights[cfg.name] = quantize_table(state[_table_key(cfg.name)], bits, spec.granularity, alpha)
        tables.append(EmbeddingBagConfig(name=cfg.name, embedding_dim=cfg.embedding_dim,
                                         num_embeddings=cfg.num_embeddings, feature_names=list(cfg.feature_names),
                                         data_type=_DATA_TYPES[bits]))
    qebc = QuantEmbeddingBagCollection(tables=tables, is_weighted=False, device=torch.device("cpu"),
                                       table_name_to_quantized_weights=weights)
    layers = (nn.Linear, FakeQuantLinear)
    dense_sizes = [m.out_features for m in inner.model.dense_arch.modules() if isinstance(m, layers)]
    over_sizes = [m.out_features for m in inner.model.over_arch.modules() if isinstance(m, layers)]
    dense_in = next(m.in_features for m in inner.model.dense_arch.modules() if isinstance(m, layers))
    dlrm = DLRM(embedding_bag_collection=qebc, dense_in_features=dense_in, dense_arch_layer_sizes=dense_sizes,
                over_arch_layer_sizes=over_sizes, dense_device=torch.device("cpu"))
    dlrm.dense_arch = integer_mlp(inner.model.dense_arch, spec.mlp_bits).cpu()
    dlrm.over_arch = integer_mlp(inner.model.over_arch, spec.mlp_bits).cpu()
    return dlrm.eval()


def model_sizes(dlrm_int: DLRM, float_configs: list[EmbeddingBagConfig], float_mlp_params: int) -> dict[str, int]:
    """Bytes of the FP32 model, of the integer model in FBGEMM's layout, and of the paper's codes-only count."""
    fp32 = sum(c.num_embeddings * c.embedding_dim * 4 for c in float_configs) + 4 * float_mlp_params
    fbgemm = 0
    codes_only = 0
    for tbe in dlrm_int.sparse_arch.embedding_bag_collection._emb_modules:  # noqa: SLF001 - sizes only
        for w, sb in tbe.split_embedding_weights():
            fbgemm += w.numel() * w.element_size() + (0 if sb is None else sb.numel() * sb.element_size())
    for c in dlrm_int.sparse_arch.embedding_bag_collection.embedding_bag_configs():
        codes_only += c.num_embeddings * c.embedding_dim * {DataType.INT8: 8, DataType.INT4: 4, DataType.INT2: 2}[
            c.data_type] // 8
    mlp = sum(m.packed_bytes() if isinstance(m, QuantizedLinear) else 4 * sum(p.numel() for p in m.parameters())
              for arch in (dlrm_int.dense_arch, dlrm_int.over_arch) for m in arch.modules()
              if isinstance(m, (QuantizedLinear, nn.Linear)))
    return {"fp32_bytes": fp32, "int_fbgemm_bytes": fbgemm + mlp, "int_codes_only_bytes": codes_only + mlp}

"""``convert`` for any TorchRec model with EmbeddingBagCollections: the integer inference model, built from a
prepared (or float) model, sharded or not.

The integer model is a copy of the model's *serving root* (the outermost module whose forward is
``forward(dense_features, sparse_features)``, TorchRec's convention: ``DLRM``, ``DLRM_DCN``, a two-tower; inside a
``DLRMTrain``-style wrapper or not) in which every EmbeddingBagCollection, found by type (plain or
``ShardedEmbeddingBagCollection``), is TorchRec's quantized EBC holding the QAT grid's FBGEMM rows (converted shard by
shard, ``quant.convert.stream_integer_rows``), and every dense layer the filter chose is integer
(``quant.dense_layers``). The rest of the model (interactions, towers, activations) is the model's own code, copied,
so the integer forward is the fake-quant forward on integer weights.

TorchRec converts only unsharded float modules (``torchrec.quant``, whole tables in one process) and knows nothing of
this QAT grid, so the walk is written here; rows stay shard-local until rank 0 writes them.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from pathlib import Path

import torch.distributed as dist
from torch import nn

from dqrm.quant.convert import (CHUNK_ROWS, FileSink, RowLayout, TensorSink, integer_tables, quantized_ebc,
                                stream_integer_rows, the_tbe)
from dqrm.quant.dense_layers import DenseFilter, convert_dense_layers, every_dense_layer
from dqrm.quant.embedding_qat import QUANTIZER_NAME, embedding_quantizer
from dqrm.quant.manifest import tmp_path
from dqrm.quant.spec import QuantSpec
from dqrm.sharding.tbe import ebc_table_configs, embedding_bag_collections


def serving_root(model: nn.Module) -> tuple[str, nn.Module]:
    """The outermost module (DMP-wrapped or not) whose forward takes ``(dense_features, sparse_features)``."""
    inner = model.module if hasattr(model, "module") else model
    for name, m in inner.named_modules():
        if list(inspect.signature(m.forward).parameters)[:2] == ["dense_features", "sparse_features"]:
            return name, m
    raise TypeError(f"no module of {type(inner).__name__} has forward(dense_features, sparse_features) (TorchRec's "
                    f"model convention, which the integer model and its export serve)")


@dataclasses.dataclass
class IntegerModel:
    """The integer model on rank 0 and where its rows are: in memory (``rows_file`` None) or in a file written
    shard by shard, its row buffers left empty."""

    module: nn.Module
    """The serving root's integer copy (eval mode)."""
    layouts: dict[str, RowLayout]
    """FBGEMM's row layout of each quantized EBC, by the EBC's name under the serving root."""
    fp32_bytes: int
    """Bytes of the float model (tables and the serving root's parameters) this was converted from."""
    rows_file: Path | None = None


def convert_model(model: nn.Module, spec: QuantSpec, filter_fn: DenseFilter = every_dense_layer, *,
                  rows_file: Path | None = None, chunk_rows: int = CHUNK_ROWS) -> IntegerModel | None:
    """The integer model on rank 0 (``None`` elsewhere); collective over the default group. Rows go into the
    quantized EBCs' buffers, or with ``rows_file`` (one EBC only) into that file, FBGEMM's flat row buffer byte for
    byte, the EBC's buffer left empty (what an artifact serves: ``quant.export``)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    inner = model.module if hasattr(model, "module") else model
    root_name, root = serving_root(model)
    ebcs = embedding_bag_collections(model)
    if not ebcs:
        raise ValueError("the model has no EmbeddingBagCollection")
    if rows_file is not None and len(ebcs) != 1:
        raise NotImplementedError(f"a rows file holds one EBC's rows; the model has {len(ebcs)}")
    prefix = f"{root_name}." if root_name else ""
    memo, layouts, fp32 = {}, {}, 0
    for fqn, ebc in ebcs:
        if not fqn.startswith(prefix):
            raise ValueError(f"EmbeddingBagCollection {fqn} is outside the serving root {root_name!r}")
        configs = ebc_table_configs(ebc)
        layout = RowLayout.of(configs, spec)
        fp32 += sum(c.num_embeddings * c.embedding_dim * 4 for c in configs)
        qebc = quantized_ebc(integer_tables(configs, spec), layout, with_rows=rows_file is None) if rank == 0 \
            else None
        sink = None
        if rank == 0:
            sink = TensorSink(the_tbe(qebc).weights_host) if rows_file is None else \
                FileSink(tmp_path(rows_file), layout.total_bytes)
        try:
            stream_integer_rows(model, spec, layout, sink, chunk_rows=chunk_rows, ebc_fqn=fqn)
        except BaseException:
            if isinstance(sink, FileSink):
                sink.close()
                tmp_path(rows_file).unlink(missing_ok=True)
            raise
        if isinstance(sink, FileSink):
            sink.close()
            tmp_path(rows_file).replace(rows_file)
        memo[id(ebc)] = qebc
        layouts[fqn[len(prefix):]] = layout
    if rank != 0:
        return None
    quantizer = embedding_quantizer(model)
    if quantizer is not None:
        memo[id(quantizer)] = None  # its hooks and TBE references stay with the training model
    fp32 += 4 * sum(p.numel() for name, p in root.named_parameters() if not _in_ebc(name, layouts))
    module = copy.deepcopy(root, memo)  # the (sharded) EBCs are the quantized ones, nothing else is shared
    if root is inner and quantizer is not None:
        delattr(module, QUANTIZER_NAME)
        module._forward_pre_hooks.clear()  # noqa: SLF001 - the QAT step counter's hook, which reads the quantizer
    convert_dense_layers(module, spec.mlp_bits, filter_fn, prefix)
    return IntegerModel(module=module.cpu().eval(), layouts=layouts, fp32_bytes=fp32, rows_file=rows_file)


def _in_ebc(name: str, layouts: dict[str, RowLayout]) -> bool:
    return any(name.startswith(f"{fqn}.") for fqn in layouts)

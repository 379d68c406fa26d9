"""Finds the FBGEMM table-batched embedding kernels (TBEs) inside a TorchRec-sharded model, with their layout.

QAT (``quant``), the touched-rows gradient exchange and the placement policy (here) read a sharded model's tables
through it; it lives in ``sharding``, the lower of the two packages, because the kernels are what sharding builds.
QAT needs the raw FP32 rows that a sharded ``EmbeddingBagCollection`` looks up, and TorchRec offers no public path
to its kernels: they sit in ``ShardedEmbeddingBagCollection._lookups[i]._emb_modules[j]`` (a plain list, so
``named_modules()`` does not reach them; data-parallel lookups are wrapped in DDP). This module is the only place
that reaches into those private attributes, so that a TorchRec upgrade breaks one file.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn


@dataclasses.dataclass
class TBELayout:
    """One TBE and what QAT needs to read its rows (all per *local* table of the TBE, in the TBE's order)."""

    tbe: nn.Module
    table_names: list[str]
    local_rows: list[int]
    local_dims: list[int]
    full_dims: list[int]
    feature_table_map: torch.Tensor  # feature index -> local table index
    feature_dim_offsets: torch.Tensor  # feature index -> first output column
    _first_rows: dict = dataclasses.field(default_factory=dict, repr=False)  # device -> row0 per feature

    def flat_weights(self) -> torch.Tensor:
        """The TBE's single flat FP32 buffer holding every table (no copy)."""
        tbe = self.tbe
        if getattr(tbe, "weights", None) is not None and isinstance(tbe.weights, torch.Tensor):
            return tbe.weights  # DenseTableBatchedEmbeddingBagsCodegen (data-parallel tables)
        for name in ("weights_host", "weights_dev", "weights_uvm"):
            buf = getattr(tbe, name, None)
            if buf is not None and buf.numel() > 0:
                others = [n for n in ("weights_host", "weights_dev", "weights_uvm")
                          if n != name and getattr(tbe, n, None) is not None and getattr(tbe, n).numel() > 0]
                if others:
                    raise NotImplementedError(f"QAT needs all tables of a TBE in one memory; {self.table_names} "
                                              f"are split across {[name, *others]} (caching kernels are unsupported)")
                return buf
        raise RuntimeError(f"TBE holding {self.table_names} has no weights buffer")

    def weights_offsets(self) -> torch.Tensor:
        return self.tbe.weights_offsets

    def row_ids(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Row of each looked-up id in the ``(rows, d)`` view of the flat buffer, for a TBE whose tables all have
        one width ``d``; ``indices``/``offsets`` are the TBE's forward arguments (bags are feature-major)."""
        batch = (offsets.numel() - 1) // self.feature_table_map.numel()
        counts = offsets[::batch].diff()  # ids of each feature
        return torch.repeat_interleave(self.first_rows(indices.device), counts,
                                       output_size=indices.numel()).add_(indices)

    def first_rows(self, dev: torch.device) -> torch.Tensor:
        """Row of the ``(rows, d)`` view where each feature's table starts (a TBE of one width ``d``)."""
        first_row = self._first_rows.get(dev)
        if first_row is None:
            first_row = self.weights_offsets().to(dev, torch.long)[self.feature_table_map.to(dev)] // self.local_dims[0]
            self._first_rows[dev] = first_row
        return first_row

    def column_sharded(self) -> list[bool]:
        return [d != f for d, f in zip(self.local_dims, self.full_dims)]


def _kernels(model: nn.Module):
    for module in model.modules():
        lookups = getattr(module, "_lookups", None)
        if not isinstance(lookups, list):
            continue
        for lookup in lookups:
            inner = getattr(lookup, "module", lookup)  # data-parallel lookups are DDP-wrapped
            for kernel in getattr(inner, "_emb_modules", []):
                yield kernel


def find_tbes(model: nn.Module) -> list[TBELayout]:
    """Every pooled-embedding TBE of the sharded model on this rank."""
    layouts = []
    for kernel in _kernels(model):
        tbe, config = kernel.emb_module, kernel.config
        tables = config.embedding_tables
        ftm = [t for t, tab in enumerate(tables) for _ in range(tab.num_features())]
        if getattr(tbe, "feature_table_map", None) is not None and list(tbe.feature_table_map) != ftm:
            raise RuntimeError(f"unexpected feature order in TBE of {[t.name for t in tables]}")
        d_offsets = tbe.D_offsets.detach().to("cpu", torch.long)
        layouts.append(TBELayout(
            tbe=tbe,
            table_names=[t.name for t in tables],
            local_rows=[t.local_rows for t in tables],
            local_dims=[t.local_cols for t in tables],
            full_dims=[t.embedding_dim for t in tables],
            feature_table_map=torch.tensor(ftm, dtype=torch.long),
            feature_dim_offsets=d_offsets[:-1].clone(),
        ))
    return layouts


def embedding_bag_collections(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every ``EmbeddingBagCollection`` of the model, plain or sharded (``ShardedEmbeddingBagCollection``), with its
    name under the unwrapped model, found by type in module order (a DMP-wrapped model is searched inside)."""
    from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    inner = model.module if hasattr(model, "module") else model
    return [(name, m) for name, m in inner.named_modules()
            if isinstance(m, (EmbeddingBagCollection, ShardedEmbeddingBagCollection))]


def ebc_table_configs(ebc: nn.Module) -> list:
    """The ``EmbeddingBagConfig`` of every table of one (plain or sharded) EmbeddingBagCollection."""
    if hasattr(ebc, "embedding_bag_configs"):
        return list(ebc.embedding_bag_configs())
    return list(ebc._embedding_bag_configs)  # ShardedEmbeddingBagCollection keeps them private


def table_configs(model: nn.Module) -> list:
    """The ``EmbeddingBagConfig`` of every table of every (sharded or plain) EmbeddingBagCollection of the model, in
    module order; table names must be unique across collections (QAT keys its grids by table name)."""
    configs = [c for _, ebc in embedding_bag_collections(model) for c in ebc_table_configs(ebc)]
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"table names repeat across the model's EmbeddingBagCollections: {sorted(names)}")
    return configs

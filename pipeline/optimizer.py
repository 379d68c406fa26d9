"""Optimizers: fused in-backward SGD on the sharded embedding tables, plain SGD on the data-parallel tables and the
MLPs, combined into one. Every embedding table steps with ``embedding_lr`` wherever the plan puts it."""

from __future__ import annotations

import torch
from torch import nn
# torch's private name on purpose: TorchRec 1.8's public torchrec.optim.apply_optimizer_in_backward is deprecated,
# warns on every call and forwards to this one, which TorchRec's own test_utils/test_sharding.py imports directly.
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from dqrm.pipeline.config import OptimConfig
from dqrm.sharding.tbe import embedding_bag_collections


def fuse_embedding_optimizer(sparse_params, cfg: OptimConfig) -> None:
    """Mark the table weights for a fused optimizer (must run before sharding: the sharder reads the marks)."""
    apply_optimizer_in_backward(torch.optim.SGD, sparse_params, {"lr": cfg.embedding_lr})


def replicated_tables(model: nn.Module) -> dict[str, nn.Parameter]:
    """The table weights TorchRec keeps as dense parameters (data-parallel tables): not optimized in backward, and
    inside an EmbeddingBagCollection (found by type, whatever the model calls it)."""
    ebcs = tuple(f"{name}." for name, _ in embedding_bag_collections(model))
    return {name: p for name, p in in_backward_optimizer_filter(model.named_parameters()) if name.startswith(ebcs)}


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> CombinedOptimizer:
    """After sharding: the DMP's fused optimizer (sharded tables, ``embedding_lr``), SGD with ``embedding_lr`` over
    the data-parallel tables, and SGD with ``lr`` over every other parameter (the MLPs)."""
    tables = replicated_tables(model)
    mlps = {name: p for name, p in in_backward_optimizer_filter(model.named_parameters()) if name not in tables}
    parts = [model.fused_optimizer, KeyedOptimizerWrapper(mlps, lambda ps: torch.optim.SGD(ps, lr=cfg.lr))]
    if tables:
        parts.append(KeyedOptimizerWrapper(tables, lambda ps: torch.optim.SGD(ps, lr=cfg.embedding_lr)))
    return CombinedOptimizer(parts)

"""Optimizers: a fused in-backward optimizer on the sharded embedding tables, the same update on the data-parallel
tables, and SGD, Adagrad or Adam on every other parameter (the MLPs), combined into one. Every embedding table steps
with ``embedding`` and ``embedding_lr`` wherever the plan puts it.

All of it is TorchRec's and torch's: the sharder turns the marked optimizer class into FBGEMM's fused update
(``torch.optim.SGD`` -> ``EXACT_SGD``, ``torchrec.optim.RowWiseAdagrad`` -> ``EXACT_ROWWISE_ADAGRAD``), and TorchRec's
``RowWiseAdagrad`` is that update for dense parameters (``sum += mean(g * g)`` per row, ``w -= lr g / (sqrt(sum) +
eps)``), so a table moved between data-parallel and sharded trains the same. Neither changes a row the batch did not
look up (FBGEMM's update is sparse; a dense zero gradient leaves the accumulator and the row as they are), which the
row-max cache of ``quant.row_maxima`` relies on; neither is used with weight decay, which would break that."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
# torch's private name on purpose: TorchRec 1.8's public torchrec.optim.apply_optimizer_in_backward is deprecated,
# warns on every call and forwards to this one, which TorchRec's own test_utils/test_sharding.py imports directly.
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from dqrm.pipeline.config import OptimConfig
from dqrm.sharding.tbe import embedding_bag_collections


def embedding_optimizer(cfg: OptimConfig) -> tuple[type[torch.optim.Optimizer], dict]:
    """The tables' optimizer class and its arguments (the same for the fused and the data-parallel tables)."""
    if cfg.embedding == "rowwise_adagrad":
        return RowWiseAdagrad, {"lr": cfg.embedding_lr, "eps": cfg.eps}
    return torch.optim.SGD, {"lr": cfg.embedding_lr}


def dense_optimizer(cfg: OptimConfig) -> Callable[[list], torch.optim.Optimizer]:
    """A factory of the optimizer over the parameters that are not tables."""
    if cfg.dense == "adagrad":
        return lambda ps: torch.optim.Adagrad(ps, lr=cfg.lr, eps=cfg.eps)
    if cfg.dense == "adam":
        return lambda ps: torch.optim.Adam(ps, lr=cfg.lr, eps=cfg.eps)
    return lambda ps: torch.optim.SGD(ps, lr=cfg.lr)


def fuse_embedding_optimizer(sparse_params, cfg: OptimConfig) -> None:
    """Mark the table weights for a fused optimizer (must run before sharding: the sharder reads the marks)."""
    cls, kwargs = embedding_optimizer(cfg)
    apply_optimizer_in_backward(cls, sparse_params, kwargs)


def replicated_tables(model: nn.Module) -> dict[str, nn.Parameter]:
    """The table weights TorchRec keeps as dense parameters (data-parallel tables): not optimized in backward, and
    inside an EmbeddingBagCollection (found by type, whatever the model calls it)."""
    ebcs = tuple(f"{name}." for name, _ in embedding_bag_collections(model))
    return {name: p for name, p in in_backward_optimizer_filter(model.named_parameters()) if name.startswith(ebcs)}


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> CombinedOptimizer:
    """After sharding: the DMP's fused optimizer (sharded tables), the same optimizer over the data-parallel tables,
    and the dense optimizer over every other parameter (the MLPs)."""
    tables = replicated_tables(model)
    mlps = {name: p for name, p in in_backward_optimizer_filter(model.named_parameters()) if name not in tables}
    parts = [model.fused_optimizer, KeyedOptimizerWrapper(mlps, dense_optimizer(cfg))]
    if tables:
        cls, kwargs = embedding_optimizer(cfg)
        parts.append(KeyedOptimizerWrapper(tables, lambda ps: cls(ps, **kwargs)))
    return CombinedOptimizer(parts)


def describe(cfg: OptimConfig) -> str:
    """One line: which optimizer and learning rate each part uses."""
    names = {"sgd": "SGD", "rowwise_adagrad": "row-wise Adagrad", "adagrad": "Adagrad", "adam": "Adam"}
    return (f"every table {names[cfg.embedding]} lr {cfg.embedding_lr:g} (optim.embedding, optim.embedding_lr; fused "
            f"for the sharded ones, the same update for data-parallel ones); MLPs {names[cfg.dense]} lr {cfg.lr:g} "
            f"(optim.dense, optim.lr)")

"""Optimizers: fused in-backward SGD on the embedding tables, plain SGD on the MLPs, combined into one."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from pipeline.config import OptimConfig


def fuse_embedding_optimizer(sparse_params, cfg: OptimConfig) -> None:
    """Mark the table weights for a fused optimizer (must run before sharding: the sharder reads the marks)."""
    apply_optimizer_in_backward(torch.optim.SGD, sparse_params, {"lr": cfg.embedding_lr})


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> CombinedOptimizer:
    """After sharding: the DMP's fused optimizer plus SGD over every parameter not optimized in backward."""
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(model.named_parameters())),
        lambda params: torch.optim.SGD(params, lr=cfg.lr),
    )
    return CombinedOptimizer([model.fused_optimizer, dense])

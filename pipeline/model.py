"""Assembles ``torchrec.models.dlrm.DLRM`` (SparseArch, DenseArch, InteractionArch, OverArch), or ``DLRM_DCN`` (its
interaction DCNv2's low-rank cross layers), from a ``ModelConfig``."""

from __future__ import annotations

import torch
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from dqrm.datasets.schema import FEATURE_NAMES, NUM_DENSE
from dqrm.pipeline.config import ModelConfig


def embedding_tables(cfg: ModelConfig) -> list[EmbeddingBagConfig]:
    """One table per categorical feature, named ``t_cat_i``."""
    return [
        EmbeddingBagConfig(name=f"t_{feature}", embedding_dim=cfg.embedding_dim, num_embeddings=n,
                           feature_names=[feature])
        for feature, n in zip(FEATURE_NAMES, cfg.num_embeddings)
    ]


def build_dlrm(cfg: ModelConfig, device: torch.device, *, table_device: torch.device | None = None) -> DLRMTrain:
    """DLRM (or DLRM_DCN, ``cfg.arch='dcn'``) with its loss; tables default to the meta device so that sharding
    materializes only local shards."""
    ebc = EmbeddingBagCollection(tables=embedding_tables(cfg), device=table_device or torch.device("meta"))
    shapes = dict(embedding_bag_collection=ebc, dense_in_features=NUM_DENSE,
                  dense_arch_layer_sizes=list(cfg.dense_arch), over_arch_layer_sizes=list(cfg.over_arch),
                  dense_device=device)
    if cfg.arch == "dcn":
        return DLRMTrain(DLRM_DCN(**shapes, dcn_num_layers=cfg.dcn_num_layers, dcn_low_rank_dim=cfg.dcn_low_rank_dim))
    return DLRMTrain(DLRM(**shapes))

"""Assembles ``torchrec.models.dlrm.DLRM`` (SparseArch, DenseArch, InteractionArch, OverArch), or ``DLRM_DCN`` (its
interaction DCNv2's low-rank cross layers), from a ``ModelConfig``."""

from __future__ import annotations

import math

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
        model = DLRMTrain(DLRM_DCN(**shapes, dcn_num_layers=cfg.dcn_num_layers, dcn_low_rank_dim=cfg.dcn_low_rank_dim))
    else:
        model = DLRMTrain(DLRM(**shapes))
    if cfg.mlp_init == "dlrm":
        init_mlps_like_dlrm_(model)
    return model


@torch.no_grad()
def init_mlps_like_dlrm_(model: torch.nn.Module) -> None:
    """Redraw every ``nn.Linear`` as facebookresearch/dlrm's ``create_mlp`` does: weights N(0, 2/(fan_in+fan_out)),
    biases N(0, 1/fan_out). The weights' spread is 1.6-2.4x nn.Linear's default in every layer but the first
    (13 -> 512: 0.4x). On the real Criteo sample the FP32 job then follows the reference's test AUC epoch by epoch,
    where torch's default lags it by about 2 epochs; the weights make the difference, the over arch's most of it
    (``bench/reference_curves.py``). Draws from torch's global generator, so a seeded job is reproducible."""
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            fan_out, fan_in = layer.weight.shape
            layer.weight.normal_(0.0, math.sqrt(2.0 / (fan_in + fan_out)))
            if layer.bias is not None:
                layer.bias.normal_(0.0, math.sqrt(1.0 / fan_out))

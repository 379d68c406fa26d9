"""The serving forward of any integer model whose forward is ``(dense_features, KeyedJaggedTensor)``: plain tensors
in, logits out, FX-traceable (TorchRec's tracer) and scriptable, so that the artifact loads with torch and fbgemm_gpu
only (``quant.export``).

TorchRec's models take a ``KeyedJaggedTensor``, which TorchScript cannot receive from a caller without TorchRec; no
library wraps a model as ``(dense, values, lengths) -> logits``, so it is written here. DLRM's dot interaction has a
faster hand-composed form (``quant.export.ServingDLRM``); every other model runs its own forward.
(No `from __future__ import annotations` here: TorchScript must see real type annotations.)
"""

from typing import List

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


class ServingModel(nn.Module):
    """``(dense [B, D] float, values [N] int64, lengths [F * B] int32, key-major in ``feature_names`` order)
    -> logits [B]``: the model's own forward on a KJT of the ids."""

    def __init__(self, model: nn.Module, feature_names: List[str]) -> None:
        super().__init__()
        self.model = model
        self.feature_names = list(feature_names)

    def forward(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # FBGEMM's bounds check rewrites out-of-range ids in place: the lookup gets a copy (as ServingDLRM)
        kjt = KeyedJaggedTensor(keys=self.feature_names, values=values.clone(), lengths=lengths)
        return self.model(dense, kjt).reshape(-1)

"""Export an integer DLRM as one TorchScript file that serves plain tensors, loadable with torch + fbgemm_gpu only.

The artifact takes ``(dense [B, 13] float, values [N] int64, lengths [26 * B] int32)`` in the reader's KJT layout
(key-major lengths, see ``datasets.reader``) and returns logits ``[B]``.
(No `from __future__ import annotations` here: TorchScript must see real type annotations.)
"""


from pathlib import Path
from typing import List

import torch
from torch import nn
from torchrec.models.dlrm import DLRM
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


class ServingDLRM(nn.Module):
    """Plain tensors in, logits out."""

    def __init__(self, dlrm: DLRM, feature_names: List[str]) -> None:
        super().__init__()
        self.dlrm = dlrm
        self.feature_names = list(feature_names)

    def forward(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        kjt = KeyedJaggedTensor(keys=self.feature_names, values=values, lengths=lengths)
        return self.dlrm(dense, kjt).squeeze(-1)


def export(dlrm: DLRM, feature_names: List[str], path: Path) -> Path:
    """FX-trace (TorchRec's tracer) then TorchScript the serving wrapper and save it."""
    from torchrec.fx import symbolic_trace

    traced = symbolic_trace(ServingDLRM(dlrm.eval(), feature_names))
    scripted = torch.jit.script(traced)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(scripted, str(path))
    return path


def load(path: Path) -> torch.jit.ScriptModule:
    import fbgemm_gpu  # noqa: F401 - registers the FBGEMM operators the artifact calls

    return torch.jit.load(str(path), map_location="cpu")

"""Export an integer DLRM as one TorchScript file that serves plain tensors, loadable with torch + fbgemm_gpu only.

The artifact takes ``(dense [B, 13] float, values [N] int64, lengths [26 * B] int32)`` in the reader's KJT layout
(key-major lengths, see ``datasets.reader``) and returns logits ``[B]``.
(No `from __future__ import annotations` here: TorchScript must see real type annotations.)
"""


import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
from torch import nn
from torchrec.models.dlrm import DLRM, InteractionArch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from quant.mlp_qat import QuantizedLinear


class ServingDLRM(nn.Module):
    """Plain tensors in, logits out: the DLRM's own modules (MLPs, embedding bag collection), composed with fewer
    copies than ``DLRM.forward``. TorchRec's sparse arch splits the pooled embeddings into a dict and concatenates
    them again in the same order, and its interaction gathers the pairs with a two-tensor advanced index, which
    took about a third of a batch of 2048 on CPU; here the pooled values are used as they come and the pairs are
    one ``index_select`` over the flattened dot products. The values are the same: the same matrices meet in the
    same ``bmm``, and gathers and concatenations copy (tests compare the artifact with the evaluated model)."""

    def __init__(self, dlrm: DLRM, feature_names: List[str]) -> None:
        super().__init__()
        if type(dlrm.inter_arch) is not InteractionArch:
            raise TypeError(f"ServingDLRM reproduces torchrec's dot InteractionArch, not {type(dlrm.inter_arch)}")
        self.dlrm = dlrm
        self.feature_names = list(feature_names)
        f = dlrm.sparse_arch.F + 1  # the dense embedding and the sparse features
        rows, cols = torch.triu_indices(f, f, offset=1)  # the pairs TorchRec's InteractionArch keeps, in its order
        self.register_buffer("pairs", rows * f + cols)

    def forward(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        kjt = KeyedJaggedTensor(keys=self.feature_names, values=values, lengths=lengths)
        embedded = self.dlrm.dense_arch(dense)
        pooled = self.dlrm.sparse_arch.embedding_bag_collection(kjt).values()  # features in config order
        combined = torch.cat([embedded, pooled], dim=1).view(embedded.shape[0], -1, embedded.shape[1])
        dots = torch.bmm(combined, combined.transpose(1, 2)).flatten(1).index_select(1, self.pairs)
        return self.dlrm.over_arch(torch.cat([embedded, dots], dim=1)).squeeze(-1)


FORMAT_VERSION = 1
MANIFEST_NAME = "dqrm_manifest.json"


def export(dlrm: DLRM, feature_names: List[str], path: Path, manifest: Dict[str, Any]) -> Path:
    """FX-trace (TorchRec's tracer), TorchScript and save the serving wrapper, with ``manifest`` inside the file
    and, beside it, ``<path>.json``: the same manifest plus the file's SHA-256."""
    from torchrec.fx import symbolic_trace

    for m in dlrm.modules():  # the artifact stores codes; a dequantized copy cached by an earlier forward stays out
        if isinstance(m, QuantizedLinear):
            m.dequantized = None
    traced = symbolic_trace(ServingDLRM(dlrm.eval(), feature_names), leaf_modules=["QuantizedLinear"])
    scripted = torch.jit.script(traced)
    path.parent.mkdir(parents=True, exist_ok=True)
    full = {"format_version": FORMAT_VERSION, "feature_names": list(feature_names), **manifest}
    tmp = path.with_name(path.name + ".tmp")
    torch.jit.save(scripted, str(tmp), _extra_files={MANIFEST_NAME: json.dumps(full)})
    tmp.replace(path)
    sidecar = dict(full, sha256=_sha256(path), bytes=path.stat().st_size)
    Path(str(path) + ".json").write_text(json.dumps(sidecar, indent=2))
    return path


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_with_manifest(path: Path) -> Tuple[torch.jit.ScriptModule, Dict[str, Any]]:
    """Load an artifact, checking it against its manifest; errors name the file and what is wrong."""
    import fbgemm_gpu  # noqa: F401 - registers the FBGEMM operators the artifact calls

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a model file (a run dir holds model_int4.pt; checkpoints/ holds "
                         f"training state, which predict cannot serve)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    sidecar = Path(str(path) + ".json")
    if sidecar.is_file():
        try:
            expected = json.loads(sidecar.read_text()).get("sha256")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise ValueError(f"{sidecar}: not the JSON export writes beside the model ({e}); restore it or delete "
                             f"it to load without the checksum") from None
        if expected and _sha256(path) != expected:
            raise ValueError(f"{path}: checksum does not match {sidecar.name} (file truncated or modified)")
    else:
        warnings.warn(f"{path}: no {sidecar.name} beside it, so its checksum cannot be verified", stacklevel=2)
    extra = {MANIFEST_NAME: ""}
    try:
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: not a loadable dqrm model artifact ({str(e).splitlines()[0]})") from None
    if not extra[MANIFEST_NAME]:
        raise ValueError(f"{path}: has no {MANIFEST_NAME}; it was not written by dqrm's export")
    manifest = json.loads(extra[MANIFEST_NAME])
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format version {manifest.get('format_version')} is not {FORMAT_VERSION}")
    return module, manifest

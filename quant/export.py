"""Export an integer model (DLRM, DLRM_DCN, any ``(dense, KJT)`` model) as a TorchScript file that serves plain tensors plus its table rows in a second file,
loadable with torch + fbgemm_gpu only (``STANDALONE_LOAD``).

``model_int4.pt`` holds the MLPs (integer codes), FBGEMM's table metadata and the manifest; ``model_int4.rows``
holds FBGEMM's flat row buffer byte for byte (``quant.convert``), written shard by shard during a sharded export so
that no process assembles the integer model in memory.

The artifact takes ``(dense [B, D] float, values [N] int64, lengths [F * B] int32)`` (DLRM: D = 13, F = 26) in the
reader's KJT layout (key-major lengths, see ``datasets.reader``) and returns logits ``[B]``.
(No `from __future__ import annotations` here: TorchScript must see real type annotations.)
"""


import json
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.models.dlrm import DLRM, InteractionArch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dqrm.quant.convert import (CHUNK_ROWS, FileSink, IntegerParts, RowLayout, integer_dlrm, integer_parts,
                                stored_mlp_bytes, stream_integer_rows, the_tbe)
from dqrm.quant.integer_model import IntegerModel
from dqrm.quant.serving import ServingModel
from dqrm.quant.mlp_qat import QuantizedLinear
from dqrm.quant.manifest import MANIFEST_NAME, sha256, tmp_path
from dqrm.quant.program import PROGRAM_SUFFIX, export_program, load_program, program_path
from dqrm.quant.spec import QuantSpec
from dqrm.sharding.tbe import table_configs


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
        # FBGEMM's bounds check sets out-of-range ids to 0 in place, and on CPU TorchRec hands it ``values``
        # uncopied: the lookup gets a copy of the ids (8 bytes an id), so that the caller's tensor is left alone
        kjt = KeyedJaggedTensor(keys=self.feature_names, values=values.clone(), lengths=lengths)
        embedded = self.dlrm.dense_arch(dense)
        pooled = self.dlrm.sparse_arch.embedding_bag_collection(kjt).values()  # features in config order
        combined = torch.cat([embedded, pooled], dim=1).view(embedded.shape[0], -1, embedded.shape[1])
        dots = torch.bmm(combined, combined.transpose(1, 2)).flatten(1).index_select(1, self.pairs)
        return self.dlrm.over_arch(torch.cat([embedded, dots], dim=1)).squeeze(-1)


FORMAT_VERSION = 2


def rows_path(path: Path) -> Path:
    """The file beside an artifact that holds its table rows (FBGEMM's flat row buffer, byte for byte)."""
    return Path(path).with_suffix(".rows")


def write_rows(model: nn.Module, spec: QuantSpec, path: Path, *,
               chunk_rows: int = CHUNK_ROWS) -> Optional[IntegerParts]:
    """Shard-local conversion of a prepared, sharded DLRM's tables into the artifact's rows file (see
    ``quant.convert.stream_integer_rows``); returns the integer MLPs and the row layout on rank 0, ``None``
    elsewhere. Collective. Free the training model before ``export``: that builds the serving module. A failed
    conversion leaves no rows file behind."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    parts = integer_parts(model, spec) if rank == 0 else None
    layout = parts.layout if parts is not None else RowLayout.of(table_configs(model), spec)
    sink, tmp = None, tmp_path(rows_path(path))
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        sink = FileSink(tmp, layout.total_bytes)
    try:
        stream_integer_rows(model, spec, layout, sink, chunk_rows=chunk_rows)
    except BaseException:
        if sink is not None:
            sink.close()
            tmp.unlink(missing_ok=True)
        raise
    if rank == 0:
        sink.close()
        tmp.replace(rows_path(path))
    return parts


def export(parts_or_dlrm, feature_names: List[str], path: Path, manifest: Dict[str, Any], *,
           shipped: Tuple[Path, ...] = (), program: bool = True) -> Path:
    """FX-trace (TorchRec's tracer), TorchScript and save the serving module of ``parts`` (whose rows
    ``write_rows`` put beside ``path``), of an ``IntegerModel`` (``quant.integer_model``; rows in memory or in its
    rows file beside ``path``) or of an in-memory integer model (whose rows are written out here). An integer
    ``DLRM`` with TorchRec's dot interaction is served by ``ServingDLRM``; any other model whose forward is
    ``(dense_features, KeyedJaggedTensor)`` (``DLRM_DCN``, a two-tower) by its own forward (``ServingModel``).
    The model must have one quantized EBC. The TorchScript file holds the dense layers and FBGEMM's table metadata,
    its row buffer left empty; the loader puts the rows file in its place. ``manifest`` goes inside the file and,
    with both files' SHA-256, beside it (``<path>.json``). ``shipped``: files already beside ``path`` that serve
    with the model (a row map); their names and SHA-256 go in the manifest (``"shipped"``), and loading refuses a
    file that differs. With ``program``, a DLRM with the dot interaction is also saved as a ``torch.export`` program
    beside it (``quant.program``: ``model_int4.pt2``, same rows file and shipped files); other models get none."""
    from torchrec.fx import symbolic_trace

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    beside = {}
    for file in map(Path, shipped):
        if file.resolve() != (path.parent / file.name).resolve() or not file.is_file():
            raise ValueError(f"{file}: a shipped file must be a file beside {path} (loading looks for it there)")
        beside[file.name] = sha256(file)
    if isinstance(parts_or_dlrm, IntegerParts):
        dlrm = integer_dlrm(parts_or_dlrm, with_rows=False)
    elif isinstance(parts_or_dlrm, IntegerModel) and parts_or_dlrm.rows_file is not None:
        dlrm = parts_or_dlrm.module
        if Path(parts_or_dlrm.rows_file).resolve() != rows_path(path).resolve():
            raise ValueError(f"{parts_or_dlrm.rows_file}: the rows of {path} must be in {rows_path(path)}")
    else:
        dlrm = parts_or_dlrm.module if isinstance(parts_or_dlrm, IntegerModel) else parts_or_dlrm
        rows = the_tbe(the_qebc(dlrm)).weights_host
        sink = FileSink(tmp_path(rows_path(path)), rows.numel())
        sink.write(0, rows)
        sink.close()
        tmp_path(rows_path(path)).replace(rows_path(path))
    dot_dlrm = is_dot_dlrm(dlrm)
    tbe = the_tbe(the_qebc(dlrm))
    host_size = int(tbe.host_size)
    saved_rows = tbe.weights_host
    placeholder = torch.empty(0, dtype=torch.uint8)
    tbe.weights_host = placeholder  # traced as a constant of the serving module; the file's rows replace it
    try:
        for m in dlrm.modules():  # the artifact stores codes; a dequantized copy cached by an earlier forward stays out
            if isinstance(m, QuantizedLinear):
                m.dequantized = None
        serving = ServingDLRM(dlrm.eval(), feature_names) if dot_dlrm else ServingModel(dlrm.eval(), feature_names)
        traced = symbolic_trace(serving, leaf_modules=["QuantizedLinear"])
    finally:
        tbe.weights_host = saved_rows
    buffer = [name for name, value in traced.named_buffers() if value is placeholder]
    if len(buffer) != 1:
        raise RuntimeError(f"the traced serving module holds the row buffer {len(buffer)} times, expected once")
    scripted = torch.jit.script(traced)
    rows_file = rows_path(path)
    if rows_file.stat().st_size != host_size:
        raise RuntimeError(f"{rows_file} has {rows_file.stat().st_size} bytes, FBGEMM expects {host_size}")
    full = {"format_version": FORMAT_VERSION, "feature_names": list(feature_names), **manifest,
            "rows": {"file": rows_file.name, "buffer": buffer[0], "bytes": host_size, "sha256": sha256(rows_file)},
            "shipped": beside}
    tmp = tmp_path(path)
    torch.jit.save(scripted, str(tmp), _extra_files={MANIFEST_NAME: json.dumps(full)})
    tmp.replace(path)
    sidecar = dict(full, sha256=sha256(path), bytes=path.stat().st_size)
    Path(str(path) + ".json").write_text(json.dumps(sidecar, indent=2))
    if program and dot_dlrm:
        export_program(dlrm, feature_names, program_path(path), full)
    return path


def is_dot_dlrm(model: nn.Module) -> bool:
    """Whether ``model`` is a DLRM with TorchRec's dot interaction (served by ``ServingDLRM``, and as a program)."""
    return isinstance(model, DLRM) and type(model.inter_arch) is InteractionArch


def the_qebc(model: nn.Module) -> nn.Module:
    """The integer model's one quantized EmbeddingBagCollection, found by type."""
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection

    found = [m for m in model.modules() if isinstance(m, QuantEmbeddingBagCollection)]
    if len(found) != 1:
        raise NotImplementedError(f"an artifact serves one quantized EmbeddingBagCollection, the model has "
                                  f"{len(found)}")
    return found[0]


def load_with_manifest(path: Path) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """Load an artifact (TorchScript ``.pt`` or torch.export ``.pt2``) and its rows file, checking both against
    the manifest; errors name the file and what is wrong. (Without these checks, loading needs only torch and
    fbgemm_gpu: see ``STANDALONE_LOAD`` and ``quant.program.STANDALONE_LOAD``.)"""
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
        if expected and sha256(path) != expected:
            raise ValueError(f"{path}: checksum does not match {sidecar.name} (file truncated or modified)")
    else:
        warnings.warn(f"{path}: no {sidecar.name} beside it, so its checksum cannot be verified", stacklevel=2)
    if path.suffix == PROGRAM_SUFFIX:
        module, manifest = load_program(path)
    else:
        extra = {MANIFEST_NAME: ""}
        try:
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"{path}: not a loadable dqrm model artifact ({str(e).splitlines()[0]})") from None
        if not extra[MANIFEST_NAME]:
            raise ValueError(f"{path}: has no {MANIFEST_NAME}; it was not written by dqrm's export")
        manifest = json.loads(extra[MANIFEST_NAME])
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format version {manifest.get('format_version')} is not {FORMAT_VERSION} "
                         f"(re-export it with this version of dqrm)")
    rows = manifest["rows"]
    rows_file = path.parent / rows["file"]
    if not rows_file.is_file():
        raise FileNotFoundError(f"{rows_file}: the table rows of {path.name} are missing (an artifact is the .pt "
                                f"file and its .rows file; copy both)")
    if rows_file.stat().st_size != rows["bytes"]:
        raise ValueError(f"{rows_file}: {rows_file.stat().st_size} bytes, the manifest says {rows['bytes']} "
                         f"(truncated or from another export)")
    if sha256(rows_file) != rows["sha256"]:
        raise ValueError(f"{rows_file}: checksum does not match {path.name}'s manifest (modified or from another "
                         f"export)")
    for name, digest in manifest.get("shipped", {}).items():  # e.g. the row map its ids are read with
        file = path.parent / name
        if not file.is_file():
            raise FileNotFoundError(f"{file}: shipped with {path.name} and named in its manifest, but missing (copy "
                                    f"it beside the model)")
        if sha256(file) != digest:
            raise ValueError(f"{file}: checksum does not match {path.name}'s manifest (modified or from another "
                             f"export); put back the {name} exported with {path.name}, or re-export the model")
    attach_rows(module, manifest, path.parent)
    return module, manifest


def attach_rows(module: torch.nn.Module, manifest: Dict[str, Any], folder: Path) -> None:
    """Put the rows file in the serving module's empty row buffer (mapped, so pages load as rows are used)."""
    rows = manifest["rows"]
    mapped = torch.from_file(str(Path(folder) / rows["file"]), shared=False, size=rows["bytes"], dtype=torch.uint8)
    if isinstance(module, torch.jit.ScriptModule):
        setattr(module, rows["buffer"], mapped)
    else:  # a torch.export program (quant.program)
        module.lookup.weights_host = mapped


# The whole of loading, with nothing but torch and fbgemm_gpu (what a serving box needs; tests run it as is).
STANDALONE_LOAD = """
import json, sys, torch, fbgemm_gpu
from pathlib import Path
extra = {"dqrm_manifest.json": ""}
model = torch.jit.load(sys.argv[1], map_location="cpu", _extra_files=extra)
rows = json.loads(extra["dqrm_manifest.json"])["rows"]
setattr(model, rows["buffer"], torch.from_file(str(Path(sys.argv[1]).parent / rows["file"]), shared=False,
                                               size=rows["bytes"], dtype=torch.uint8))
"""


def artifact_sizes(parts, path: Path, extra: Tuple[Path, ...] = ()) -> Dict[str, Any]:
    """What the artifact of ``parts`` (``IntegerParts`` or a one-EBC ``IntegerModel``) holds, in bytes: the tables
    split into codes, fp16 scales and biases, and padding (row alignment and FBGEMM's 128-byte table starts); the
    stored dense layers (MLPs, and cross layers as integer kernels); each file on disk (``extra``: files shipped
    beside it, e.g. a row map); and the float model."""
    if isinstance(parts, IntegerModel):
        (layout,) = parts.layouts.values()
        dense = stored_mlp_bytes(parts.module)
    else:
        layout = parts.layout
        dense = stored_mlp_bytes(parts.dense_arch) + stored_mlp_bytes(parts.over_arch)
    files = {p.name: p.stat().st_size for p in (Path(path), rows_path(path), *extra)}
    return {"fp32_bytes": parts.fp32_bytes,
            "table_bytes": layout.total_bytes,
            "table_codes_bytes": sum(t.rows * t.code_bytes for t in layout.tables),
            "table_scale_bias_bytes": sum(t.rows * 4 for t in layout.tables),
            "table_padding_bytes": layout.padding_bytes(),
            "row_alignment": layout.row_alignment,
            "mlp_bytes": dense,
            "files": files, "artifact_bytes": sum(files.values())}


def loaded_bytes(module: torch.jit.ScriptModule) -> int:
    """Bytes of every tensor a loaded (and used) artifact holds: its buffers, the rows included, and the MLP
    weights each ``QuantizedLinear`` dequantizes on first use."""
    seen: Dict[int, int] = {}
    for _, tensor in module.named_buffers():
        seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    for _, m in module.named_modules():
        w = getattr(m, "dequantized", None)
        if isinstance(w, torch.Tensor):
            seen[w.data_ptr()] = w.numel() * w.element_size()
    return sum(seen.values())

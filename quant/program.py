"""The integer DLRM as a ``torch.export`` program (``model_int4.pt2``), beside the TorchScript artifact and sharing
its rows file: loadable with torch and fbgemm_gpu only, no TorchRec, no pickled modules.

``torch.export`` cannot trace FBGEMM's inference TBE module (it holds ``AtomicCounter`` script objects that have no
fake class), nor TorchRec's quantized EBC without pickling each table as a ``UInt4Tensor`` subclass (each pickle
writes the whole row buffer, and loading needs TorchRec). So ``ProgramDLRM`` holds FBGEMM's table metadata as plain
tensors and calls the lookup operator the TBE module calls (``int_nbit_split_embedding_codegen_lookup_function``,
after the same ``bounds_check_indices``, on a copy of the ids), and composes the MLPs and the interaction as
``ServingDLRM`` does: the same kernels on the same values, so its logits equal the TorchScript artifact's bit for
bit (``tests/quant/test_program.py``; trained models of every grid, in a fresh process:
``tests/quant/test_embedding_qat.py``). Written here: neither TorchRec nor FBGEMM exports an inference model this
way.

The row buffer is exported empty and attached at load (``attach_rows``), mapped from the rows file. The MLP
weights are stored as ``codes * scale`` in the layer's compute dtype (float32 or bfloat16): exactly the integer
grid's values (about 0.5 MB in float32 at the default shape, against 88 MB of INT4 rows), and no dequantization per
call.
(No `from __future__ import annotations` here: torch.export reads real annotations.)
"""

import copy
import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from dqrm.quant.manifest import MANIFEST_NAME, sha256, tmp_path
from dqrm.quant.mlp_qat import QuantizedLinear, linear

PROGRAM_SUFFIX = ".pt2"
MAX_BATCH = 1 << 20


def program_path(path: Path) -> Path:
    """The torch.export program beside a TorchScript artifact (``model_int4.pt`` -> ``model_int4.pt2``)."""
    return Path(path).with_suffix(PROGRAM_SUFFIX)


class ProgramLinear(nn.Module):
    """A ``QuantizedLinear`` with its weight dequantized once, as a buffer (``quant.mlp_qat.linear``)."""

    def __init__(self, layer: QuantizedLinear) -> None:
        super().__init__()
        w = layer.dequantize()
        self.register_buffer("weight", w.to(torch.bfloat16) if layer.bf16 else w)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.clone())
        self.bf16, self.float_output = layer.bf16, layer.float_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.bf16, self.float_output)


def _program_mlp(mlp: nn.Module) -> nn.Module:
    mlp = copy.deepcopy(mlp)
    for module in list(mlp.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, QuantizedLinear):
                setattr(module, name, ProgramLinear(child))
    return mlp


class ProgramLookup(nn.Module):
    """FBGEMM's integer TBE as tensors: the lookup operator with the module's own arguments (its ``_forward_impl``
    without pruning or a cache, neither of which the artifact uses); ``weights_host`` is the flat row buffer."""

    def __init__(self, tbe: nn.Module) -> None:
        super().__init__()
        if tbe.index_remappings_array.numel() or tbe.index_remapping_hash_table.numel() or \
                tbe.lxu_cache_weights.numel():
            raise NotImplementedError("ProgramLookup reproduces an integer TBE without pruning or a cache")
        for name in ("weights_placements", "weights_offsets", "weights_tys", "D_offsets", "rows_per_table",
                     "bounds_check_warning"):
            self.register_buffer(name, getattr(tbe, name).clone())
        self.register_buffer("weights_host", torch.empty(0, dtype=torch.uint8))
        self.register_buffer("cache_weights", torch.empty(0, 0, dtype=torch.uint8))
        self.register_buffer("cache_locations", torch.empty(0, dtype=torch.int32))
        self.bounds_check_mode = int(tbe.bounds_check_mode_int)
        self.bounds_check_version = int(tbe.bounds_check_version)
        self.ints = {name: int(getattr(tbe, name)) for name in (
            "total_D", "max_int2_D", "max_int4_D", "max_int8_D", "max_float16_D", "max_float32_D", "row_alignment",
            "max_float8_D", "fp8_exponent_bits", "fp8_exponent_bias")}
        self.ints["pooling_mode"] = int(tbe.pooling_mode)
        self.ints["output_dtype"] = int(tbe.output_dtype)

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        indices = indices.clone()  # the bounds check sets out-of-range ids to 0 in place: not in the caller's tensor
        torch.ops.fbgemm.bounds_check_indices(self.rows_per_table, indices, offsets, self.bounds_check_mode,
                                              self.bounds_check_warning, None,
                                              bounds_check_version=self.bounds_check_version)
        return torch.ops.fbgemm.int_nbit_split_embedding_codegen_lookup_function(
            dev_weights=self.weights_host, uvm_weights=self.cache_weights.view(-1),
            weights_placements=self.weights_placements, weights_offsets=self.weights_offsets,
            weights_tys=self.weights_tys, D_offsets=self.D_offsets, indices=indices, offsets=offsets,
            indice_weights=None, lxu_cache_weights=self.cache_weights, lxu_cache_locations=self.cache_locations,
            **self.ints)


def dense_in_features(dense_arch: nn.Module) -> int:
    """Inputs of the dense arch's first layer (a float, fake-quant or integer Linear): the model's dense features."""
    for m in dense_arch.modules():
        if isinstance(m, QuantizedLinear):
            return int(m.codes.shape[1])
        if hasattr(m, "in_features"):
            return int(m.in_features)
    raise ValueError("the dense arch has no Linear layer")


class ProgramDLRM(nn.Module):
    """``quant.export.ServingDLRM`` with the lookup as ``ProgramLookup``: ``(dense [B, D] float, values [N] int64,
    lengths [F * B] int32, key-major) -> logits [B]``."""

    def __init__(self, dlrm: nn.Module, num_features: int) -> None:
        super().__init__()
        from dqrm.quant.convert import the_tbe

        self.num_features = num_features
        self.dense_arch = _program_mlp(dlrm.dense_arch)
        self.over_arch = _program_mlp(dlrm.over_arch)
        self.lookup = ProgramLookup(the_tbe(dlrm.sparse_arch.embedding_bag_collection))
        f = num_features + 1
        rows, cols = torch.triu_indices(f, f, offset=1)
        self.register_buffer("pairs", rows * f + cols)

    def forward(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths).to(values.dtype)  # KJT offsets, as TorchRec
        embedded = self.dense_arch(dense)
        pooled = self.lookup(values, offsets)
        combined = torch.cat([embedded, pooled], dim=1).view(embedded.shape[0], -1, embedded.shape[1])
        dots = torch.bmm(combined, combined.transpose(1, 2)).flatten(1).index_select(1, self.pairs)
        return self.over_arch(torch.cat([embedded, dots], dim=1)).squeeze(-1)


def export_program(dlrm: nn.Module, feature_names: List[str], path: Path, manifest: Dict[str, Any]) -> Path:
    """``torch.export`` ``dlrm`` (an integer DLRM, its rows buffer empty or not) with a dynamic batch and save it to
    ``path`` (``.pt2``); ``manifest`` (the TorchScript artifact's, naming the rows file) goes inside it and, with the
    file's SHA-256, beside it (``<path>.json``)."""
    path = Path(path)
    program = ProgramDLRM(dlrm, len(feature_names)).eval()
    n = len(feature_names)
    dense_in = dense_in_features(dlrm.dense_arch)
    example = (torch.zeros(4, dense_in), torch.zeros(2 * n, dtype=torch.int64),
               torch.full((4 * n,), 1, dtype=torch.int32))
    example[2][n:] = 0  # 2n ids in 4n bags
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    ids = torch.export.Dim("ids", min=0, max=MAX_BATCH * n * 64)
    # size-oblivious: no guard may assume batch != 1 (export specializes sizes 0 and 1 otherwise)
    with torch.no_grad(), torch.fx.experimental._config.patch(backed_size_oblivious=True):
        exported = torch.export.export(program, example,
                                       dynamic_shapes=({0: batch}, {0: ids}, {0: n * batch}))
    tmp = tmp_path(path)
    torch.export.save(exported, str(tmp), extra_files={MANIFEST_NAME: json.dumps(manifest)})
    tmp.replace(path)
    Path(str(path) + ".json").write_text(json.dumps(dict(manifest, sha256=sha256(path),
                                                         bytes=path.stat().st_size), indent=2))
    return path


def load_program(path: Path) -> Tuple[nn.Module, Dict[str, Any]]:
    """The program's module (its row buffer still empty) and manifest: ``quant.export.load_with_manifest`` checks
    the files and attaches the rows."""
    extra = {MANIFEST_NAME: ""}
    try:
        module = torch.export.load(str(path), extra_files=extra).module()
    except (RuntimeError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not a loadable torch.export program ({str(e).splitlines()[0]})") from None
    if not extra[MANIFEST_NAME]:
        raise ValueError(f"{path}: has no {MANIFEST_NAME}; it was not written by dqrm's export")
    return module, json.loads(extra[MANIFEST_NAME])


# Loading a program with nothing but torch and fbgemm_gpu (tests run it as is).
STANDALONE_LOAD = """
import json, sys, torch, fbgemm_gpu
from pathlib import Path
extra = {"dqrm_manifest.json": ""}
model = torch.export.load(sys.argv[1], extra_files=extra).module()
rows = json.loads(extra["dqrm_manifest.json"])["rows"]
model.lookup.weights_host = torch.from_file(str(Path(sys.argv[1]).parent / rows["file"]), shared=False,
                                            size=rows["bytes"], dtype=torch.uint8)
"""


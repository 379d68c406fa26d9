"""``convert``: a QAT-trained (or float) sharded DLRM -> FBGEMM integer rows and integer MLPs, shard by shard.

Each rank quantizes the rows it owns (table-, row-, column-wise shards and, on rank 0, the data-parallel
replicas) onto the QAT grid in bounded chunks, and only the resulting FBGEMM rows travel to rank 0, which writes them
where FBGEMM's ``IntNBitTableBatchedEmbeddingBagsCodegen`` expects them in its flat row buffer (``RowSink``: a
file for export, a tensor for an in-memory model). No process ever holds a float table it does not own, and the
largest extra buffer is one chunk. TorchRec has no shard-local conversion (its quantized modules convert a whole
unsharded float module), so it is written here; the row layout (table offsets, row padding) is FBGEMM's own
``nbit_construct_split_state`` and the result is checked byte for byte against TorchRec's quantized
``EmbeddingBagCollection`` built from gathered tables (``tests/quant/test_convert.py``).
This is the one place that calls TorchRec's quantization API, whose home is scheduled to move.

A row of the flat buffer (``row_bytes`` long, a multiple of ``QuantSpec.row_alignment``)::

    [fp16 scale][fp16 bias][codes: dim * bits / 8 bytes, element 2k in the low nibble at INT4][zero padding]

Each table starts on a 128-byte boundary (FBGEMM's cache-line alignment).
"""

from __future__ import annotations

import copy
import dataclasses
import contextlib
import os
from typing import Protocol

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (nbit_construct_split_state,
                                                                    rounded_row_size_in_bytes)
from torch import nn
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection

from dqrm.quant import qat_kernels
from dqrm.quant.embedding_qat import embedding_quantizer
from dqrm.quant.fake_quant import pack_rows, quantize_codes, scale_bias_bytes, symmetric_qparams
from dqrm.quant.mlp_qat import FakeQuantLinear, QuantizedLinear
from dqrm.quant.spec import QuantSpec
from dqrm.sharding.tbe import embedding_bag_collections, table_configs

_DATA_TYPES = {8: DataType.INT8, 4: DataType.INT4, 2: DataType.INT2}
_SPARSE_TYPES = {8: SparseType.INT8, 4: SparseType.INT4, 2: SparseType.INT2}
SCALE_BIAS_BYTES = 4  # fp16 scale + fp16 bias at the start of every row
CHUNK_ROWS = 1 << 18  # rows quantized and sent at a time: 64 MiB of float32 at dimension 64


@dataclasses.dataclass(frozen=True)
class TableRows:
    """Where one table's integer rows live in FBGEMM's flat row buffer."""

    name: str
    rows: int
    dim: int
    bits: int
    offset: int
    """Byte offset of row 0 in the flat buffer."""
    row_bytes: int
    """Bytes per row as stored: scale, bias, codes and padding to the row alignment."""

    @property
    def code_bytes(self) -> int:
        return self.dim * self.bits // 8

    @property
    def unpadded_bytes(self) -> int:
        return self.rows * (SCALE_BIAS_BYTES + self.code_bytes)


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """FBGEMM's layout of every table of one TBE (TorchRec's quantized EBC puts all sum-pooled tables in one)."""

    tables: tuple[TableRows, ...]
    total_bytes: int
    row_alignment: int

    @classmethod
    def of(cls, configs: list[EmbeddingBagConfig], spec: QuantSpec) -> "RowLayout":
        specs = [(c.name, c.num_embeddings, c.embedding_dim, _SPARSE_TYPES[spec.bits_for(c.name)],
                  EmbeddingLocation.HOST) for c in configs]
        for c in configs:
            if (c.embedding_dim * spec.bits_for(c.name)) % 8:
                raise ValueError(f"{c.name}: dim {c.embedding_dim} at {spec.bits_for(c.name)} bits is not a whole "
                                 f"number of bytes per row")
        split = nbit_construct_split_state(specs, cacheable=True, row_alignment=spec.row_alignment,
                                           scale_bias_size_in_bytes=SCALE_BIAS_BYTES)
        tables = tuple(TableRows(name, rows, dim, spec.bits_for(name), offset,
                                 rounded_row_size_in_bytes(dim, ty, spec.row_alignment, SCALE_BIAS_BYTES))
                       for (name, rows, dim, ty, _), offset in zip(specs, split.offsets))
        return cls(tables, split.host_size, spec.row_alignment)

    def padding_bytes(self) -> int:
        """Bytes of the buffer that are neither codes nor scale/bias: row padding and table alignment."""
        return self.total_bytes - sum(t.unpadded_bytes for t in self.tables)


class RowSink(Protocol):
    """Where rank 0 puts integer rows: ``write(offset, rows)`` with ``rows`` a contiguous uint8 tensor."""

    def write(self, offset: int, rows: torch.Tensor) -> None: ...


class FileSink:
    """Rows written into a file at their byte offsets (``pwrite``, nothing mapped: the file's pages never count
    in this process's memory); the file is created at the buffer's full size, zeros where nothing is written."""

    def __init__(self, path: os.PathLike, size: int) -> None:
        self.path = os.fspath(path)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with self._naming_the_file():
            os.ftruncate(self.fd, size)

    def write(self, offset: int, rows: torch.Tensor) -> None:
        view = memoryview(rows.numpy()).cast("B")
        with self._naming_the_file():
            while view:
                done = os.pwrite(self.fd, view, offset)
                view, offset = view[done:], offset + done

    def close(self) -> None:
        with self._naming_the_file():
            os.fsync(self.fd)
        os.close(self.fd)

    @contextlib.contextmanager
    def _naming_the_file(self):
        """An ``OSError`` of a write (a full disk) names the file: ``pwrite`` on a descriptor does not."""
        try:
            yield
        except OSError as e:
            if e.filename is not None:
                raise
            raise OSError(e.errno, e.strerror, self.path) from e


class TensorSink:
    """Rows copied into an in-memory flat buffer (a TBE's ``weights_host``)."""

    def __init__(self, buffer: torch.Tensor) -> None:
        self.buffer = buffer

    def write(self, offset: int, rows: torch.Tensor) -> None:
        self.buffer[offset: offset + rows.numel()].copy_(rows.reshape(-1))


@dataclasses.dataclass(frozen=True)
class _Piece:
    """One shard of a table, as every rank sees it (from the sharded tensor's global metadata)."""

    rank: int
    row0: int
    rows: int
    col0: int
    cols: int


def _pieces(value) -> tuple[list[_Piece], dict[tuple[int, int], torch.Tensor]]:
    """All shards of one table (global) and the local ones by (row0, col0). A data-parallel table is one piece,
    converted by rank 0 from its replica."""
    if hasattr(value, "local_shards") and hasattr(value, "metadata"):  # ShardedTensor
        pieces = [_Piece(m.placement.rank(), m.shard_offsets[0], m.shard_sizes[0], m.shard_offsets[1],
                         m.shard_sizes[1]) for m in value.metadata().shards_metadata]
        local = {tuple(s.metadata.shard_offsets[:2]): s.tensor for s in value.local_shards()}
        return sorted(pieces, key=lambda p: (p.row0, p.col0)), local
    rows, cols = value.shape
    return [_Piece(0, 0, rows, 0, cols)], {(0, 0): value}


def _table_key(ebc_fqn: str, name: str) -> str:
    return f"{ebc_fqn}.embedding_bags.{name}.weight" if ebc_fqn else f"embedding_bags.{name}.weight"


def _piece_bytes(w: torch.Tensor, bits: int, grid: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """FBGEMM bytes of rows ``w`` (a shard's chunk): with the table's ``grid`` (scale, bias), only the codes (rank 0
    writes the table's scale and bias); without, the row grid's ``[scale, bias, codes]`` per row.

    The row grid is FBGEMM's own quantizer, whose ``[codes, scale, bias]`` rows are reordered: byte for byte what
    ``rowwise_qparams`` and the packing give (``tests/quant/test_fake_quant.py``), and several times faster. The table
    grid cannot use it: FBGEMM computes each row's scale and bias from that row, the paper's grid is one symmetric
    scale per table, so its codes are packed here (``_codes``)."""
    w = w.detach().float()
    if grid is not None:
        return _codes(w, *grid, bits)
    fused = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(w.contiguous(), bits).cpu()
    return torch.cat([fused[:, -SCALE_BIAS_BYTES:], fused[:, :-SCALE_BIAS_BYTES]], dim=1)


def _codes(w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed codes of ``w``: one compiled pass on CPU (``qat_kernels.quantize_pack_rows``), the torch ops
    elsewhere (the same bits; ``tests/quant/test_qat_kernels.py``)."""
    if w.device.type == "cpu" and w.is_contiguous():
        out = torch.empty(len(w), w.shape[1] * bits // 8, dtype=torch.uint8)
        qat_kernels.quantize_pack_rows(w.numpy(), scale.reshape(-1).contiguous().numpy(),
                                       bias.reshape(-1).contiguous().numpy(), bits, out.numpy())
        return out
    scale, bias = scale.reshape(-1, 1).to(w.device), bias.reshape(-1, 1).to(w.device)
    codes = quantize_codes(w, scale, bias, bits).to(torch.uint8).cpu()  # 1 B/code
    scale, bias = (x.expand(len(w), 1).cpu() for x in (scale, bias))
    packed, _ = pack_rows(codes, scale, bias, bits)
    return packed


def stream_integer_rows(model: nn.Module, spec: QuantSpec, layout: RowLayout, sink: RowSink | None, *,
                        chunk_rows: int = CHUNK_ROWS, ebc_fqn: str | None = None) -> None:
    """Quantize every rank's own rows of one EmbeddingBagCollection (``ebc_fqn``, its name under the unwrapped
    model; by default the model's only one) and write them through rank 0's ``sink`` (``None`` on the other ranks).
    Collective over the default group: every rank walks the same tables, chunks and shards in the same order, the
    owner of a piece quantizes it and sends it to rank 0 (point to point), so at most one chunk of integer rows is in
    flight. Column-wise shards need the table grid (a per-row scale needs the whole row)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    quantizer = embedding_quantizer(model)
    if spec.granularity == "table" and quantizer is None:
        raise ValueError("table granularity needs the scales of a prepared model: call quantize_(..., 'prepare') "
                         "first (for post-training quantization, prepare after training and call update_scales())")
    if ebc_fqn is None:
        ebc_fqn = the_ebc(model)[0]
    state = model.state_dict()  # sharded tensors are views of the TBEs' rows: nothing is copied
    for table in layout.tables:
        pieces, local = _pieces(state[_table_key(ebc_fqn, table.name)])
        if spec.granularity == "row" and any(p.cols != table.dim for p in pieces):
            raise NotImplementedError(f"{table.name}: column-wise sharding with the row grid (a row's scale and bias "
                                      f"need all its columns); place it otherwise or use the table grid")
        if any((p.col0 * table.bits) % 8 or (p.cols * table.bits) % 8 for p in pieces):
            raise ValueError(f"{table.name}: a column shard does not start on a byte of {table.bits}-bit codes")
        grid = None  # the table grid's (scale, bias), the same for every row
        if spec.granularity == "table":
            alpha = quantizer.alpha[quantizer.table_names.index(table.name)]
            grid = symmetric_qparams(alpha.reshape(1, 1).float().cpu(), table.bits)
        for start in range(0, table.rows, chunk_rows):
            stop = min(start + chunk_rows, table.rows)
            out = torch.zeros(stop - start, table.row_bytes, dtype=torch.uint8) if rank == 0 else None
            if rank == 0 and grid is not None:
                out[:, :SCALE_BIAS_BYTES] = scale_bias_bytes(*grid)
            for p in pieces:
                lo, hi = max(start, p.row0), min(stop, p.row0 + p.rows)
                if lo >= hi or rank not in (0, p.rank):
                    continue
                if rank == p.rank:
                    part = _piece_bytes(local[(p.row0, p.col0)][lo - p.row0: hi - p.row0], table.bits, grid)
                    if rank != 0:
                        dist.send(part.contiguous(), dst=0)
                        continue
                else:  # rank 0 receives what the owner quantized
                    width = p.cols * table.bits // 8 + (SCALE_BIAS_BYTES if spec.granularity == "row" else 0)
                    part = torch.empty(hi - lo, width, dtype=torch.uint8)
                    dist.recv(part, src=p.rank)
                first = 0 if spec.granularity == "row" else SCALE_BIAS_BYTES + p.col0 * table.bits // 8
                out[lo - start: hi - start, first: first + part.shape[1]] = part
            if rank == 0:
                sink.write(table.offset + start * table.row_bytes, out)


def integer_mlp(mlp: nn.Module, bits: int) -> nn.Module:
    """A copy of ``mlp`` with every (fake-quant) Linear replaced by a ``QuantizedLinear`` (a plain Linear at 0 bits)."""
    mlp = copy.deepcopy(mlp)
    for module in list(mlp.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (nn.Linear, FakeQuantLinear)):
                setattr(module, name, QuantizedLinear.from_linear(child, bits) if bits else _plain_linear(child))
    return mlp


def _plain_linear(layer: nn.Module) -> nn.Linear:
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        out.weight.copy_(layer.weight)
        if layer.bias is not None:
            out.bias.copy_(layer.bias)
    return out


@dataclasses.dataclass
class IntegerParts:
    """What an integer DLRM is made of, without its rows: table configs, row layout and integer MLPs (rank 0)."""

    tables: list[EmbeddingBagConfig]
    layout: RowLayout
    dense_arch: nn.Module
    over_arch: nn.Module
    dense_in_features: int
    dense_sizes: list[int]
    over_sizes: list[int]
    fp32_bytes: int
    """Bytes of the float model (tables and MLPs) these parts were converted from."""


def integer_parts(model: nn.Module, spec: QuantSpec) -> IntegerParts:
    """The integer MLPs and the table layout of a prepared (or float) sharded DLRM; no table rows."""
    inner = model.module if hasattr(model, "module") else model
    configs = table_configs(model)
    tables = integer_tables(configs, spec)
    layers = (nn.Linear, FakeQuantLinear)
    dense_in = next(m.in_features for m in inner.model.dense_arch.modules() if isinstance(m, layers))
    sizes = {arch: [m.out_features for m in getattr(inner.model, arch).modules() if isinstance(m, layers)]
             for arch in ("dense_arch", "over_arch")}
    mlp_params = sum(p.numel() for arch in (inner.model.dense_arch, inner.model.over_arch) for p in arch.parameters())
    fp32 = sum(c.num_embeddings * c.embedding_dim * 4 for c in configs) + 4 * mlp_params
    return IntegerParts(tables=tables, layout=RowLayout.of(configs, spec),
                        dense_arch=integer_mlp(inner.model.dense_arch, spec.mlp_bits).cpu().eval(),
                        over_arch=integer_mlp(inner.model.over_arch, spec.mlp_bits).cpu().eval(),
                        dense_in_features=dense_in, dense_sizes=sizes["dense_arch"],
                        over_sizes=sizes["over_arch"], fp32_bytes=fp32)


def integer_dlrm(parts: IntegerParts, *, with_rows: bool = True) -> DLRM:
    """TorchRec's DLRM around a quantized EBC of ``parts``' tables at its row alignment (rows all zero until
    written; ``with_rows=False`` leaves FBGEMM's row buffer empty, for an artifact whose rows live in a file)."""
    qebc = quantized_ebc(parts.tables, parts.layout, with_rows=with_rows)
    dlrm = DLRM(embedding_bag_collection=qebc, dense_in_features=parts.dense_in_features,
                dense_arch_layer_sizes=parts.dense_sizes, over_arch_layer_sizes=parts.over_sizes,
                dense_device=torch.device("cpu"))
    dlrm.dense_arch, dlrm.over_arch = parts.dense_arch, parts.over_arch
    return dlrm.eval()


def integer_tables(configs: list[EmbeddingBagConfig], spec: QuantSpec) -> list[EmbeddingBagConfig]:
    """The integer tables' configs: ``configs`` with each table's data type from ``spec``."""
    return [EmbeddingBagConfig(name=c.name, embedding_dim=c.embedding_dim, num_embeddings=c.num_embeddings,
                               feature_names=list(c.feature_names), data_type=_DATA_TYPES[spec.bits_for(c.name)])
            for c in configs]


def quantized_ebc(tables: list[EmbeddingBagConfig], layout: RowLayout, *,
                  with_rows: bool = True) -> QuantEmbeddingBagCollection:
    """TorchRec's quantized EBC of ``tables`` (integer data types) at ``layout``'s row alignment, its rows all zero
    until written (``with_rows=False``: FBGEMM's row buffer left empty, for an artifact whose rows live in a file)."""
    qebc = QuantEmbeddingBagCollection(tables=tables, is_weighted=False, device=torch.device("cpu"),
                                       row_alignment=layout.row_alignment)
    tbe = the_tbe(qebc)
    if list(tbe.weights_physical_offsets) != [t.offset for t in layout.tables] or \
            tbe.host_size != layout.total_bytes:
        raise RuntimeError("FBGEMM laid out the integer tables differently from RowLayout (fbgemm_gpu changed?)")
    if not with_rows:
        for table in qebc.embedding_bags.values():  # views of the buffer; the rows are the file's
            table.weight = torch.empty(0, dtype=torch.uint8)
        tbe.weights_host = torch.empty(0, dtype=torch.uint8)
    return qebc


def the_ebc(model: nn.Module) -> tuple[str, nn.Module]:
    """The model's one (plain or sharded) EmbeddingBagCollection, with its name; found by type."""
    ebcs = embedding_bag_collections(model)
    if len(ebcs) != 1:
        raise NotImplementedError(f"expected one EmbeddingBagCollection, found {len(ebcs)}: "
                                  f"{[name for name, _ in ebcs]}")
    return ebcs[0]


def the_tbe(qebc: QuantEmbeddingBagCollection) -> nn.Module:
    """The one FBGEMM integer TBE of a quantized EBC whose tables are all sum-pooled (its ``_emb_modules`` is a
    plain list: the only path to the kernel)."""
    kernels = qebc._emb_modules  # noqa: SLF001
    if len(kernels) != 1:
        raise NotImplementedError(f"expected one TBE in the quantized EBC, found {len(kernels)}")
    return kernels[0]


def convert_dlrm(model: nn.Module, spec: QuantSpec, *, pg: dist.ProcessGroup | None = None) -> DLRM | None:
    """The integer DLRM in memory on rank 0 (``None`` elsewhere); collective. For models whose integer rows fit
    one process; ``quant.export.write_rows`` streams them to a file instead (what the job exports through)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    parts = integer_parts(model, spec) if rank == 0 else None
    dlrm = integer_dlrm(parts) if rank == 0 else None
    sink = TensorSink(the_tbe(dlrm.sparse_arch.embedding_bag_collection).weights_host) if rank == 0 else None
    stream_integer_rows(model, spec, RowLayout.of(table_configs(model), spec), sink)
    return dlrm


def gather_full_state(model: nn.Module, dst: int = 0) -> dict[str, torch.Tensor] | None:
    """The unsharded state dict on rank ``dst`` (``None`` elsewhere); collective over the default group. Whole
    float tables on one process: for tests and small models only (conversion and export never call it)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    out: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    for key in sorted(state):
        value = state[key]
        if hasattr(value, "gather") and hasattr(value, "local_shards"):  # ShardedTensor
            full = torch.empty(value.size(), dtype=value.dtype) if rank == dst else None
            value.gather(dst=dst, out=full)
            if rank == dst:
                out[key] = full
        elif isinstance(value, torch.Tensor):
            out[key] = value.detach().cpu().clone()
    return out if rank == dst else None


def stored_mlp_bytes(arch: nn.Module) -> int:
    """Bytes of an integer MLP as the artifact stores it (int8 codes, fp32 row scales and biases)."""
    return sum(b.numel() * b.element_size() for m in arch.modules() if isinstance(m, (QuantizedLinear, nn.Linear))
               for b in [*m.buffers(recurse=False), *m.parameters(recurse=False)] if b is not None)

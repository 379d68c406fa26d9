"""Shard-local conversion: the rows each rank quantizes where they live, written by rank 0 as they arrive, are byte
for byte the rows of TorchRec's quantized EBC built from the gathered float tables (what export did before), for
every placement x grid x bit width (column-wise shards only on the table grid: 21 combinations, one spawn)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection

from dqrm.pipeline.config import OptimConfig
from dqrm.pipeline.optimizer import build_optimizer
from dqrm.quant.api import QATConfig, QuantSpec, embedding_quantizer, quantize_
from dqrm.quant.convert import RowLayout, convert_dlrm, gather_full_state, the_tbe
from dqrm.quant.export import rows_path, write_rows
from dqrm.quant.fake_quant import pack_rows, quantize_codes, rowwise_qparams, symmetric_qparams
from dqrm.sharding.plan import TablePlacement
from dqrm.sharding.tbe import table_configs
from tests.dist_utils import run_distributed
from tests.helpers import CARDS, TABLES, batches, sharded_model, tiny_data, train_steps

# Each kind of placement holds one table of each width (column-wise: two shards of 8 columns).
KINDS = {
    "data_parallel": {"t_cat_0": 8, "t_cat_1": 4, "t_cat_2": 2},
    "table_wise": {"t_cat_7": 8, "t_cat_10": 4, "t_cat_11": 2},
    "row_wise": {"t_cat_6": 8, "t_cat_9": 4, "t_cat_12": 2},
    "column_wise": {"t_cat_8": 8, "t_cat_20": 4, "t_cat_23": 2},
}
BITS = {name: bits for tables in KINDS.values() for name, bits in tables.items()}
ALIGNMENT = 4


def _placements(column_wise: bool) -> dict[str, TablePlacement]:
    out = {}
    for i, name in enumerate(TABLES):
        kind = next((k for k, tables in KINDS.items() if name in tables), "table_wise")
        if kind == "column_wise" and not column_wise:
            kind = "table_wise"
        if CARDS[i] < 30:
            kind = "data_parallel"
        ranks = (0, 1) if kind == "column_wise" else (i % 2,) if kind == "table_wise" else ()
        out[name] = TablePlacement(kind=kind, ranks=ranks)
    return out


def _reference_rows(state, configs, spec: QuantSpec, alpha: dict[str, torch.Tensor]) -> torch.Tensor:
    """The gathered export: whole float tables on one process, quantized on the QAT grid from the definition and
    handed to TorchRec's quantized EBC, whose FBGEMM TBE lays them out."""
    weights, tables = {}, []
    for c in configs:
        w, bits = state[f"model.sparse_arch.embedding_bag_collection.embedding_bags.{c.name}.weight"], spec.bits_for(c.name)
        if spec.granularity == "table":
            scale, bias = symmetric_qparams(alpha[c.name].reshape(1), bits)
            scale, bias = scale.expand(len(w), 1), bias.expand(len(w), 1)
        else:
            scale, bias = rowwise_qparams(w, bits)
        weights[c.name] = pack_rows(quantize_codes(w, scale, bias, bits), scale, bias, bits)
        tables.append(EmbeddingBagConfig(name=c.name, embedding_dim=c.embedding_dim, num_embeddings=c.num_embeddings,
                                         feature_names=list(c.feature_names),
                                         data_type={8: DataType.INT8, 4: DataType.INT4, 2: DataType.INT2}[bits]))
    qebc = QuantEmbeddingBagCollection(tables=tables, is_weighted=False, device=torch.device("cpu"),
                                       table_name_to_quantized_weights=weights, row_alignment=spec.row_alignment)
    return the_tbe(qebc).weights_host.clone()


def _convert_both_ways(rank, world_size, data_dir, out_dir):
    results = {}
    for granularity in ("table", "row"):
        model, _ = sharded_model(world_size, _placements(column_wise=granularity == "table"))
        spec = QuantSpec(embedding_bits=4, table_bits=BITS, granularity=granularity, scale_update_every=2, mlp_bits=8,
                         row_alignment=ALIGNMENT)
        quantize_(model, QATConfig(spec=spec, step="prepare"), pg=dist.group.WORLD)
        optimizer = build_optimizer(model, OptimConfig(embedding_lr=1.0))
        train_steps(model, optimizer,
                    batches(data_dir / "train.parquet", 64, rank=rank, world_size=world_size, limit=3))
        kinds = {}  # what each table really became in the sharded model
        for name, value in model.state_dict().items():
            if "embedding_bags" in name:
                kinds[name.split(".")[-2]] = [tuple(m.shard_sizes) for m in value.metadata().shards_metadata] \
                    if hasattr(value, "metadata") else "replicated"
        state = gather_full_state(model)
        quantizer = embedding_quantizer(model)
        alpha = {n: quantizer.alpha[i].clone() for i, n in enumerate(quantizer.table_names)}
        path = out_dir / granularity / "model.pt"
        write_rows(model, spec, path, chunk_rows=1000)  # chunks smaller than the larger tables and shards
        in_memory = convert_dlrm(model, spec)
        if rank == 0:
            configs = table_configs(model)
            results[granularity] = {
                "reference": _reference_rows(state, configs, spec, alpha),
                "file": torch.from_file(str(rows_path(path)), size=rows_path(path).stat().st_size,
                                       dtype=torch.uint8).clone(),
                "in_memory": the_tbe(in_memory.sparse_arch.embedding_bag_collection).weights_host.clone(),
                "layout": RowLayout.of(configs, spec), "kinds": kinds}
    return results


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    data_dir = tiny_data(tmp_path_factory.mktemp("convert-data"))
    return run_distributed(_convert_both_ways, data_dir, tmp_path_factory.mktemp("convert-out"), world_size=2)[0]


@pytest.mark.parametrize("granularity", ["table", "row"])
def test_shard_local_rows_equal_the_gathered_export_byte_for_byte(converted, granularity):
    out = converted[granularity]
    kinds = out["kinds"]
    # the model really has every placement: replicated, one shard, row halves, column halves
    for name in KINDS["data_parallel"]:
        assert kinds[name] == "replicated"
    for name in KINDS["table_wise"]:
        assert len(kinds[name]) == 1
    for name in KINDS["row_wise"]:
        assert len(kinds[name]) == 2 and kinds[name][0][1] == 16
    for name in KINDS["column_wise"]:
        assert (kinds[name] == [(CARDS[TABLES.index(name)], 8)] * 2) == (granularity == "table")
    reference = out["reference"]
    assert reference.numel() == out["layout"].total_bytes
    for table in out["layout"].tables:  # table by table first, so that a failure names the table
        span = slice(table.offset, table.offset + table.rows * table.row_bytes)
        assert torch.equal(out["file"][span], reference[span]), (table.name, table.bits, kinds[table.name])
        assert torch.equal(out["in_memory"][span], reference[span]), table.name
        assert reference[span].view(table.rows, -1)[:, 4:].any(), f"{table.name}: codes all zero, nothing compared"
    assert torch.equal(out["file"], reference)
    assert torch.equal(out["in_memory"], reference)


def test_row_layout_is_padded_to_the_chosen_alignment(converted):
    layout = converted["table"]["layout"]
    for t in layout.tables:
        assert t.row_bytes % ALIGNMENT == 0 and t.row_bytes - ALIGNMENT < 4 + t.code_bytes <= t.row_bytes
        assert t.offset % 128 == 0  # FBGEMM starts each table on a cache line
    dim16 = {b: next(t for t in layout.tables if t.bits == b).row_bytes for b in (8, 4, 2)}
    assert dim16 == {8: 20, 4: 12, 2: 8}  # at alignment 16 these would be 32, 16, 16

"""Small shared builders for tests: a tiny DLRM on tiny synthetic data, sharded by a given plan."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
import torch.distributed as dist
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dqrm.datasets.reader import ParquetBatches, ReaderConfig
from dqrm.datasets.synthetic import SyntheticConfig, ensure_synthetic
from dqrm.pipeline.config import ModelConfig, OptimConfig
from dqrm.pipeline.model import build_dlrm
from dqrm.pipeline.optimizer import fuse_embedding_optimizer
from dqrm.sharding.plan import TablePlacement, manual_plan, plan_sharding, shard_model

CARDS = (3, 4, 10, 14, 24, 27, 60, 100, 200, 300, 600, 1000, 1500, 2500, 5000, 8000, 100, 200, 300, 400, 500, 600,
         700, 800, 900, 1000)
MODEL = ModelConfig(num_embeddings=CARDS, dense_arch=(32, 16), over_arch=(32, 1))
TABLES = [f"t_cat_{i}" for i in range(26)]


def tiny_data(cache: Path) -> Path:
    cfg = SyntheticConfig(num_train=4096, num_val=1024, num_test=512, cardinalities=CARDS, row_group_size=1024)
    return ensure_synthetic(cfg, cache)


def batches(path: Path, batch_size: int, rank: int = 0, world_size: int = 1, limit: int | None = None) -> list[Batch]:
    data = ParquetBatches([path], CARDS, ReaderConfig(batch_size=batch_size), rank=rank, world_size=world_size)
    return list(itertools.islice(iter(data), limit))


def concat_batches(parts: list[Batch]) -> Batch:
    """Row-concatenate batches (what world size 1 must see to match one step of world size len(parts))."""
    keys = parts[0].sparse_features.keys()
    values, lengths = [], []
    for k in keys:
        for b in parts:
            jt = b.sparse_features[k]
            values.append(jt.values())
            lengths.append(jt.lengths())
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))
    return Batch(dense_features=torch.cat([b.dense_features for b in parts]), sparse_features=kjt,
                 labels=torch.cat([b.labels for b in parts]))


def initial_state(seed: int = 7) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_dlrm(MODEL, torch.device("cpu"), table_device=torch.device("cpu"))
    return {k: v.clone() for k, v in model.state_dict().items()}


def mixed_placements(world_size: int, *, with_column_wise: bool) -> dict[str, TablePlacement]:
    """Every kind of placement in one model: data-parallel small tables, table-wise, row-wise, column-wise."""
    out = {}
    for i, name in enumerate(TABLES):
        if CARDS[i] < 30:
            out[name] = TablePlacement(kind="data_parallel")
        elif i % 3 == 0:
            out[name] = TablePlacement(kind="row_wise")
        elif with_column_wise and i in (8, 20):
            out[name] = TablePlacement(kind="column_wise", ranks=tuple(r % world_size for r in range(2)))
        else:
            out[name] = TablePlacement(kind="table_wise", ranks=(i % world_size,))
    return out


def sharded_model(world_size: int, placements: dict[str, TablePlacement] | None = None, optim=OptimConfig(),
                  sharders: list | None = None):
    """DMP-wrapped tiny DLRM with the initial state loaded (DMP re-initializes tables)."""
    model = build_dlrm(MODEL, torch.device("cpu"))
    fuse_embedding_optimizer(model.model.sparse_arch.parameters(), optim)
    if placements is None:
        plan = plan_sharding(model, world_size=world_size, device=torch.device("cpu"), pg=dist.group.WORLD)
    else:
        plan = manual_plan(model, placements, world_size=world_size, device=torch.device("cpu"))
    model = shard_model(model, plan, torch.device("cpu"), sharders)
    model.load_state_dict(initial_state(), strict=False)
    return model, plan


def train_steps(model, optimizer, batch_list: list[Batch]) -> None:
    """Plain training steps of a sharded DLRMTrain (the fused embedding optimizer steps inside backward)."""
    model.train()
    for batch in batch_list:
        loss, _ = model(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def served_leaving_inputs_alone(serve, batch) -> torch.Tensor:
    """``serve``'s logits on ``batch`` (an ``out_of_range_batch``), after checking that the call left the caller's
    tensors alone (the out-of-range id still there), that a second call gives the same, and that the id is read as
    FBGEMM's bounds check reads it: as row 0."""
    dense, values, lengths, i = batch
    inputs = [dense.clone(), values.clone(), lengths.clone()]
    with torch.no_grad():
        served = serve(*inputs)
        assert torch.equal(inputs[1], values) and values[i] == CARDS[0] + 4  # still out of range
        assert torch.equal(inputs[0], dense) and torch.equal(inputs[2], lengths)
        assert torch.equal(serve(*inputs), served)
        zeroed = values.clone()
        zeroed[i] = 0
        assert torch.equal(serve(dense, zeroed, lengths), served)
    return served

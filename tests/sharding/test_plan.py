"""World size 2 on gloo: the sharded DLRM computes what the unsharded one does, and every table trains."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dqrm.datasets.synthetic import SyntheticConfig, ensure_synthetic
from dqrm.datasets.reader import ParquetBatches, ReaderConfig
from dqrm.pipeline.config import ModelConfig, OptimConfig
from dqrm.pipeline.model import build_dlrm
from dqrm.pipeline.optimizer import build_optimizer, fuse_embedding_optimizer
from dqrm.sharding.plan import describe_plan, plan_sharding, shard_model
from tests.dist_utils import run_distributed

CARDS = (3, 4, 10, 14, 24, 27, 60, 100, 200, 300, 600, 1000, 1500, 2500, 5000, 8000, 100, 200, 300, 400, 500, 600,
         700, 800, 900, 1000)
MODEL = ModelConfig(num_embeddings=CARDS, dense_arch=(32, 16), over_arch=(32, 1))


def _batches(data_dir, rank, world_size, batch_size):
    return list(ParquetBatches([data_dir / "val.parquet"], CARDS, ReaderConfig(batch_size=batch_size),
                               rank=rank, world_size=world_size))


def _reference_state():
    torch.manual_seed(7)
    model = build_dlrm(MODEL, torch.device("cpu"), table_device=torch.device("cpu"))
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def _sharded_forward(rank, world_size, data_dir):
    _, state = _reference_state()
    model = build_dlrm(MODEL, torch.device("cpu"))
    fuse_embedding_optimizer(model.model.sparse_arch.parameters(), OptimConfig())
    plan = plan_sharding(model, world_size=world_size, device=torch.device("cpu"), pg=dist.group.WORLD)
    model = shard_model(model, plan, torch.device("cpu"))
    model.load_state_dict(state, strict=False)  # DMP re-initializes the tables
    model.eval()
    outs = []
    with torch.no_grad():
        for batch in _batches(data_dir, rank, world_size, 64):
            _, (_, logits, _) = model(batch)
            outs.append(logits)
    # One training step, to see that every table (data-parallel ones included) is updated.
    model.train()
    optimizer = build_optimizer(model, OptimConfig())
    before = {k: v.clone() for k, v in _local_tables(model).items()}
    batch = _batches(data_dir, rank, world_size, 256)[0]
    loss, _ = model(batch)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    changed = {k: bool((v != before[k]).any()) for k, v in _local_tables(model).items()}
    return torch.cat(outs), describe_plan(plan), changed


def _local_tables(model):
    out = {}
    for k, v in model.state_dict().items():
        if "embedding_bags" not in k:
            continue
        if hasattr(v, "local_shards"):  # ShardedTensor: only this rank's shards
            shards = v.local_shards()
            if shards:
                out[k] = torch.cat([s.tensor.flatten() for s in shards]).detach().clone()
        else:  # data-parallel tables are replicated plain tensors
            out[k] = v.detach().clone()
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    cfg = SyntheticConfig(num_train=1000, num_val=2048, num_test=256, cardinalities=CARDS, row_group_size=1000)
    return ensure_synthetic(cfg, tmp_path_factory.mktemp("synthetic"))


def test_sharded_equals_unsharded_and_all_tables_train(data_dir):
    model, _ = _reference_state()
    model.eval()
    with torch.no_grad():
        expected = torch.cat([model(b)[1][1] for b in _batches(data_dir, 0, 1, 64)])
    results = run_distributed(_sharded_forward, data_dir, world_size=2)
    # Rank r scored the r-th contiguous half of the rows.
    got = torch.cat([r[0] for r in results])
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    plan = results[0][1]
    kinds = {row["sharding"] for row in plan}
    assert len(plan) == 26 and kinds <= {"data_parallel", "table_wise", "column_wise", "table_column_wise"}
    assert {r for row in plan for r in row["ranks"]} == {0, 1}, "both ranks should hold tables"
    for rank, (_, _, changed) in enumerate(results):
        assert changed, f"rank {rank} holds no tables"
        stale = [k for k, c in changed.items() if not c]
        assert not stale, f"rank {rank}: tables not updated by a training step: {stale}"

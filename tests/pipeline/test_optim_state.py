"""Row-wise Adagrad (tables) and Adam (MLPs) state through a checkpoint: resumed exactly at the same plan, resharded
across a world-size change, carried across a change of placement (data-parallel <-> sharded, k column shards -> one
accumulator per row), refused with the table's name where the saved state does not determine this job's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor

from dqrm.pipeline.checkpoint import Checkpointer
from dqrm.pipeline.config import OptimConfig
from dqrm.pipeline.optim_state import OptimizerStateMismatch
from dqrm.pipeline.optimizer import build_optimizer
from dqrm.quant.convert import gather_full_state
from dqrm.sharding.plan import TablePlacement
from tests.dist_utils import run_distributed
from tests.helpers import CARDS, TABLES, batches, mixed_placements, sharded_model, tiny_data, train_steps

ADAGRAD_ADAM = OptimConfig(embedding="rowwise_adagrad", dense="adam", lr=0.01, embedding_lr=0.1)
CW_TABLES = ("t_cat_8", "t_cat_20")  # column-wise over 2 ranks in mixed_placements(2, with_column_wise=True)


def _placements(world_size: int, kind: str) -> dict[str, TablePlacement]:
    out = mixed_placements(world_size, with_column_wise=kind == "cw")
    if kind == "moved":  # a data-parallel table goes table-wise, a row-wise one data-parallel
        out["t_cat_0"] = TablePlacement(kind="table_wise", ranks=(1,))
        out["t_cat_9"] = TablePlacement(kind="data_parallel")
    return out


def _states(optimizer) -> dict[str, torch.Tensor]:
    """Every optimizer state tensor, whole: a table's accumulator as (column shards, rows), whichever rank holds it
    (a rank's fused optimizer lists only the tables it holds shards of)."""
    local: dict[str, tuple] = {}
    for fqn, states in optimizer.state_dict()["state"].items():
        for name, t in states.items():
            if isinstance(t, ShardedTensor):
                t = (tuple(t.size()), [(s.metadata.shard_offsets[0], s.tensor.clone()) for s in t.local_shards()])
            else:
                t = (tuple(t.size()), [(0, t.clone())])
            local[f"{fqn}/{name}"] = t
    every = [None] * dist.get_world_size() if dist.is_initialized() else [local]
    if dist.is_initialized():
        dist.all_gather_object(every, local)
    out = {}
    for part in every:
        for key, (size, shards) in part.items():
            full = out.setdefault(key, torch.zeros(size))
            for start, t in shards:
                if t.dim() == 0:
                    full.copy_(t)
                else:
                    full[start:start + t.shape[0]] = t
    for key in list(out):
        fqn, name = key.split("/")
        if name == "sum" or name.endswith(".momentum1"):
            out[f"{fqn}/rows"] = out.pop(key).reshape(-1, CARDS[TABLES.index(fqn.rsplit(".", 2)[-2])])
    return out


def _save(rank, world_size, data_dir, root, kind):
    model, _ = sharded_model(world_size, _placements(world_size, kind), optim=ADAGRAD_ADAM)
    optimizer = build_optimizer(model, ADAGRAD_ADAM)
    data = batches(data_dir / "train.parquet", 64, rank=rank, world_size=world_size, limit=4)
    train_steps(model, optimizer, data[:3])
    Checkpointer(Path(root)).save(3, model, optimizer, {"epoch": 0})
    saved = _states(optimizer)
    train_steps(model, optimizer, data[3:])
    return {"states": saved, "next": gather_full_state(model)}


def _load(rank, world_size, data_dir, root, kind, optim=ADAGRAD_ADAM):
    model, _ = sharded_model(world_size, _placements(world_size, kind), optim=optim)
    optimizer = build_optimizer(model, optim)
    checkpointer = Checkpointer(Path(root))
    try:
        checkpointer.load(checkpointer.latest_valid(), model, optimizer)
    except OptimizerStateMismatch as e:
        return {"refused": str(e)}
    loaded = _states(optimizer)
    data = batches(data_dir / "train.parquet", 64, rank=rank, world_size=world_size, limit=4)
    train_steps(model, optimizer, data[3:])
    return {"states": loaded, "next": gather_full_state(model)}


@pytest.fixture(scope="module")
def saved_cw(tmp_path_factory):
    """World size 2, every kind of placement including column-wise, 3 steps of row-wise Adagrad and Adam."""
    root = tmp_path_factory.mktemp("optim-state")
    data_dir = tiny_data(root / "data")
    out = run_distributed(_save, data_dir, str(root / "ckpt"), "cw", world_size=2)[0]
    return data_dir, root / "ckpt", out


def test_same_plan_resumes_exactly(saved_cw):
    data_dir, ckpt, saved = saved_cw
    loaded = run_distributed(_load, data_dir, str(ckpt), "cw", world_size=2)[0]
    assert "refused" not in loaded, loaded.get("refused")
    assert saved["states"].keys() == loaded["states"].keys()
    tables = [k for k in saved["states"] if k.endswith("/rows")]
    assert len(tables) == 26 and sum(k.endswith("exp_avg_sq") for k in saved["states"]) == 8  # 4 layers x (W, b)
    for key, value in saved["states"].items():
        assert torch.equal(loaded["states"][key], value), key
    for table in CW_TABLES:  # a column-wise table keeps one accumulator per row and column shard
        assert saved["states"][next(k for k in tables if f".{table}." in k)].shape[0] == 2
    assert sum(bool(v.abs().sum()) for k, v in saved["states"].items() if k in tables) >= 20  # they trained
    # the step after the resume is the step the uninterrupted run took, bit for bit
    for key, value in saved["next"].items():
        assert torch.equal(loaded["next"][key], value), key


def test_a_world_size_change_carries_column_shards_to_one_accumulator_per_row(saved_cw):
    data_dir, ckpt, saved = saved_cw
    loaded = run_distributed(_load, data_dir, str(ckpt), "plain", world_size=1)[0]
    for key, value in saved["states"].items():
        got = loaded["states"][key]
        if any(f".{t}." in key for t in CW_TABLES):  # 2 shards of 8 columns each: their mean, exactly
            assert value.shape[0] == 2 and got.shape[0] == 1
            torch.testing.assert_close(got[0], value.mean(0), atol=0, rtol=1e-6)
        else:  # world size 2 -> 1: resharded as it was
            assert torch.equal(got, value.reshape(got.shape)), key


def test_a_table_moved_between_data_parallel_and_sharded_keeps_its_accumulator(saved_cw, tmp_path):
    data_dir, _, _ = saved_cw
    ckpt = tmp_path / "ckpt"
    saved = run_distributed(_save, data_dir, str(ckpt), "plain", world_size=2)[0]
    loaded = run_distributed(_load, data_dir, str(ckpt), "moved", world_size=2)[0]
    moved = 0
    for key, value in saved["states"].items():
        if key.endswith("/step") and key not in loaded["states"]:
            continue  # t_cat_0's counter: the fused optimizer keeps none
        assert torch.equal(loaded["states"][key], value.reshape(loaded["states"][key].shape)), key
        moved += any(f".{t}." in key for t in ("t_cat_0", "t_cat_9")) and key.endswith("/rows")
    assert moved == 2
    # and the next step is the uninterrupted run's (data-parallel and sharded tables take the same update, up to
    # float summation order)
    for key, value in saved["next"].items():
        torch.testing.assert_close(loaded["next"][key], value, atol=1e-6, rtol=1e-5, msg=key)


def test_refused_where_the_saved_state_does_not_determine_this_jobs(saved_cw, tmp_path):
    data_dir, ckpt, _ = saved_cw
    # resumed with plain SGD: the saved Adagrad and Adam state would be dropped
    sgd = run_distributed(_load, data_dir, str(ckpt), "cw", OptimConfig(), world_size=2)[0]
    assert "another optimizer" in sgd["refused"] and "optim.embedding" in sgd["refused"]
    # one accumulator per row cannot be split into column shards' own
    one = tmp_path / "w1"
    run_distributed(_save, data_dir, str(one), "plain", world_size=1)
    cw = run_distributed(_load, data_dir, str(one), "cw", world_size=2)[0]
    assert "t_cat_8" in cw["refused"] and "column-wise" in cw["refused"] and "plan.overrides" in cw["refused"]
    # a plain-SGD checkpoint resumed with row-wise Adagrad
    plain = tmp_path / "sgd"
    run_distributed(_save_sgd, data_dir, str(plain), world_size=2)
    adagrad = run_distributed(_load, data_dir, str(plain), "cw", world_size=2)[0]
    assert "no optimizer state" in adagrad["refused"] and "optim.embedding=sgd" in adagrad["refused"]


def _save_sgd(rank, world_size, data_dir, root):
    model, _ = sharded_model(world_size, _placements(world_size, "cw"))
    optimizer = build_optimizer(model, OptimConfig())
    train_steps(model, optimizer, batches(data_dir / "train.parquet", 64, rank=rank, world_size=world_size, limit=1))
    Checkpointer(Path(root)).save(1, model, optimizer, {"epoch": 0})

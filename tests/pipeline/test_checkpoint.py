"""A checkpoint written at one world size loads at another (DCP reshards): every weight comes back bit for bit,
whatever the two plans."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import Checkpointer
from pipeline.config import OptimConfig
from pipeline.optimizer import build_optimizer
from quant.convert import gather_full_state
from tests.dist_utils import run_distributed
from tests.helpers import batches, mixed_placements, sharded_model, tiny_data


def _save_after_training(rank, world_size, data_dir, root):
    model, _ = sharded_model(world_size, mixed_placements(world_size, with_column_wise=world_size == 2))
    optimizer = build_optimizer(model, OptimConfig(lr=0.5, embedding_lr=5.0))
    model.train()
    for batch in batches(data_dir / "train.parquet", 64, rank=rank, world_size=world_size, limit=3):
        loss, _ = model(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    Checkpointer(Path(root)).save(3, model, optimizer, {"epoch": 0})
    return gather_full_state(model)


def _load(rank, world_size, root):
    model, _ = sharded_model(world_size, mixed_placements(world_size, with_column_wise=world_size == 2))
    optimizer = build_optimizer(model, OptimConfig())
    fresh = gather_full_state(model)
    checkpointer = Checkpointer(Path(root))
    progress = checkpointer.load(checkpointer.latest_valid(), model, optimizer)
    return {"fresh": fresh, "loaded": gather_full_state(model), "progress": progress}


@pytest.mark.parametrize("saved_at, loaded_at", [(2, 1), (1, 2)])
def test_weights_come_back_bit_for_bit_at_another_world_size(saved_at, loaded_at, tmp_path):
    data_dir = tiny_data(tmp_path / "data")
    saved = run_distributed(_save_after_training, data_dir, str(tmp_path / "ckpt"), world_size=saved_at)[0]
    out = run_distributed(_load, str(tmp_path / "ckpt"), world_size=loaded_at)[0]
    assert out["progress"] == {"epoch": 0}
    assert saved.keys() == out["loaded"].keys()
    changed = 0
    for key, value in saved.items():
        assert torch.equal(out["loaded"][key], value), key
        changed += not torch.equal(out["fresh"][key], value)
    assert changed >= len(saved) - 2  # training moved (nearly) every weight, so equality means it was loaded

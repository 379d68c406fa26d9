"""Every embedding table steps with ``optim.embedding_lr`` wherever the plan puts it (world size 2, gloo)."""

from __future__ import annotations

import pytest
import torch

from dqrm.pipeline.config import OptimConfig
from dqrm.pipeline.optimizer import build_optimizer
from dqrm.quant.convert import gather_full_state
from dqrm.sharding.plan import TablePlacement
from tests.dist_utils import run_distributed
from tests.helpers import TABLES, batches, sharded_model, tiny_data, train_steps

# Different learning rates, so a table stepped with the MLPs' one is told apart; 'table' is data-parallel in one
# run and table-wise on rank 1 in the other, every other table in the same place in both.
OPTIM = OptimConfig(lr=0.1, embedding_lr=1.0)
TABLE = "t_cat_5"


def _placements(table_kind: str) -> dict[str, TablePlacement]:
    out = {t: TablePlacement(kind="table_wise", ranks=(i % 2,)) for i, t in enumerate(TABLES)}
    out["t_cat_0"] = TablePlacement(kind="data_parallel")  # a data-parallel table in both runs
    out[TABLE] = TablePlacement(kind="data_parallel") if table_kind == "dp" else TablePlacement(kind="table_wise",
                                                                                                 ranks=(1,))
    return out


def _one_step_each(rank, world_size, data_dir):
    local = batches(data_dir / "train.parquet", 64, rank=rank, world_size=world_size, limit=2)
    out = {}
    for kind in ("dp", "tw"):
        model, _ = sharded_model(world_size, _placements(kind), optim=OPTIM)
        optimizer = build_optimizer(model, OPTIM)
        init = gather_full_state(model)
        train_steps(model, optimizer, local)
        out[kind] = (init, gather_full_state(model))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_distributed(_one_step_each, tiny_data(tmp_path_factory.mktemp("optim-data")), world_size=2)[0]


def test_a_table_gets_the_same_update_data_parallel_and_table_wise(runs):
    key = next(k for k in runs["dp"][0] if k.endswith(f"embedding_bags.{TABLE}.weight"))
    (init_dp, dp), (init_tw, tw) = runs["dp"], runs["tw"]
    assert torch.equal(init_dp[key], init_tw[key])
    moved = (dp[key] - init_dp[key]).abs().max()
    assert moved > 1e-4, "the table did not train"
    # Same gradient (DDP's average equals TorchRec's divided all-to-all gradient) and the same learning rate: the
    # same rows, up to float summation order. At the MLPs' rate the update would be a tenth of this.
    torch.testing.assert_close(dp[key] - init_dp[key], tw[key] - init_tw[key], atol=1e-6, rtol=1e-5)
    for k in dp:  # and the rest of the model trained the same in both runs
        torch.testing.assert_close(dp[k], tw[k], atol=1e-6, rtol=1e-5, msg=k)


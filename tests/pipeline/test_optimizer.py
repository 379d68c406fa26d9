"""Every embedding table steps with ``optim.embedding`` and ``optim.embedding_lr`` wherever the plan puts it (world
size 2, gloo): plain SGD and row-wise Adagrad (FBGEMM's fused update on a sharded table, TorchRec's on a
data-parallel one), with SGD, Adagrad or Adam on the MLPs."""

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
OPTIMS = {"sgd": OptimConfig(lr=0.1, embedding_lr=1.0),
          "rowwise_adagrad-adagrad": OptimConfig(embedding="rowwise_adagrad", dense="adagrad", lr=0.01,
                                                 embedding_lr=0.1),
          "rowwise_adagrad-adam": OptimConfig(embedding="rowwise_adagrad", dense="adam", lr=0.01, embedding_lr=0.1)}
TABLE = "t_cat_5"


def _placements(table_kind: str) -> dict[str, TablePlacement]:
    out = {t: TablePlacement(kind="table_wise", ranks=(i % 2,)) for i, t in enumerate(TABLES)}
    out["t_cat_0"] = TablePlacement(kind="data_parallel")  # a data-parallel table in both runs
    out[TABLE] = TablePlacement(kind="data_parallel") if table_kind == "dp" else TablePlacement(kind="table_wise",
                                                                                                 ranks=(1,))
    return out


def _steps_each(rank, world_size, data_dir):
    local = batches(data_dir / "train.parquet", 64, rank=rank, world_size=world_size, limit=3)
    out = {}
    for name, optim in OPTIMS.items():
        for kind in ("dp", "tw"):
            model, _ = sharded_model(world_size, _placements(kind), optim=optim)
            optimizer = build_optimizer(model, optim)
            states = [gather_full_state(model)]
            for batch in local:  # the state after each step
                train_steps(model, optimizer, [batch])
                states.append(gather_full_state(model))
            out[name, kind] = states
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_distributed(_steps_each, tiny_data(tmp_path_factory.mktemp("optim-data")), world_size=2)[0]


@pytest.mark.parametrize("optim", list(OPTIMS))
def test_a_table_gets_the_same_update_data_parallel_and_table_wise(runs, optim):
    dp_states, tw_states = runs[optim, "dp"], runs[optim, "tw"]
    key = next(k for k in dp_states[0] if k.endswith(f"embedding_bags.{TABLE}.weight"))
    (init_dp, dp), (init_tw, tw) = (dp_states[0], dp_states[-1]), (tw_states[0], tw_states[-1])
    assert torch.equal(init_dp[key], init_tw[key])
    moved = (dp[key] - init_dp[key]).abs().max()
    assert moved > 1e-3, "the table did not train"
    # Same gradient (DDP's average equals TorchRec's divided all-to-all gradient), the same optimizer and learning
    # rate: the same rows, up to float summation order, after 3 steps (row-wise Adagrad's accumulator included). At
    # the MLPs' rate the update would be a tenth of this.
    torch.testing.assert_close(dp[key] - init_dp[key], tw[key] - init_tw[key], atol=1e-6, rtol=1e-5)
    for k in dp:  # and the rest of the model trained the same in both runs
        torch.testing.assert_close(dp[k], tw[k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.parametrize("kind", ["dp", "tw"])
def test_rowwise_adagrads_first_step_moves_each_touched_row_by_the_learning_rate(runs, kind):
    """From a zero accumulator, row-wise Adagrad's first update of a row is ``-lr g / (sqrt(mean(g^2)) + eps)``: its
    root mean square is the learning rate whatever the gradient, a little less where the gradient is within a few
    thousand eps of zero (plain SGD's would be ``lr`` times the gradient)."""
    init, first = runs["rowwise_adagrad-adam", kind][:2]
    key = next(k for k in init if k.endswith(f"embedding_bags.{TABLE}.weight"))
    rms = (first[key] - init[key]).pow(2).mean(1).sqrt()
    touched = rms > 0
    assert 3 <= int(touched.sum()) < len(rms)  # the batch looked up some rows, not all
    assert bool((rms[touched] <= 0.1 * (1 + 1e-6)).all() and (rms[touched] >= 0.099).all()), rms[touched]
    sgd_init, sgd_first = runs["sgd", kind][:2]
    sgd_rms = (sgd_first[key] - sgd_init[key]).pow(2).mean(1).sqrt()
    assert not torch.allclose(sgd_rms[sgd_rms > 0], torch.full_like(sgd_rms[sgd_rms > 0], 1.0), rtol=0.1)


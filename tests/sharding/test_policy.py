"""Placement policy: exact placements on a small hand-made case; saved plans reload to the same plan."""

import pytest
import torch

from dqrm.pipeline.config import ModelConfig
from dqrm.pipeline.model import build_dlrm
from dqrm.sharding.plan import describe_plan, manual_plan
from dqrm.sharding.policy import (PlanConfig, balance_table_wise, load_placements, placements_from_plan,
                                  policy_placements, save_placements)

CARDS = (3, 4, 10, 20, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000,
         9000, 10000, 20000, 30000, 40000)


@pytest.fixture(scope="module")
def model():
    return build_dlrm(ModelConfig(num_embeddings=CARDS, dense_arch=(16,), over_arch=(8, 1)), torch.device("meta"))


def test_exact_placements_small_case(model):
    cfg = PlanConfig(data_parallel_max_rows=20, row_wise_min_rows=20000,
                     overrides={"t_cat_4": "table_wise:1", "t_cat_5": "column_wise:0,1"})
    placements = balance_table_wise(model, policy_placements(model, cfg, 2), 2)
    kinds = {n: (p.kind, p.ranks) for n, p in placements.items()}
    assert [kinds[f"t_cat_{i}"] for i in range(4)] == [("data_parallel", ())] * 4
    assert kinds["t_cat_4"] == ("table_wise", (1,)) and kinds["t_cat_5"] == ("column_wise", (0, 1))
    assert [kinds[f"t_cat_{i}"][0] for i in (23, 24, 25)] == ["row_wise"] * 3
    # Greedy balance, largest first onto the lighter rank: rank 1 already holds t_cat_4 (100 rows).
    tw = {i: kinds[f"t_cat_{i}"][1][0] for i in range(6, 23)}
    # Worked by hand: d = load0 - load1 starts at -100; each table goes where the load is lower (ties: rank 0).
    assert tw == {22: 0, 21: 1, 20: 1, 19: 0, 18: 0, 17: 1, 16: 1, 15: 0, 14: 0, 13: 1, 12: 1, 11: 0, 10: 1, 9: 1,
                  8: 0, 7: 0, 6: 1}
    plan = manual_plan(model, placements, world_size=2, device=torch.device("cpu"))
    rows = {r["table"]: r for r in describe_plan(plan)}
    assert rows["t_cat_22"]["sharding"] == "table_wise" and rows["t_cat_22"]["ranks"] == [0]
    assert rows["t_cat_25"]["sharding"] == "row_wise" and rows["t_cat_25"]["ranks"] == [0, 1]


def test_saved_placements_reload_to_the_same_plan(model, tmp_path):
    cfg = PlanConfig(data_parallel_max_rows=20, row_wise_min_rows=20000)
    placements = balance_table_wise(model, policy_placements(model, cfg, 2), 2)
    plan = manual_plan(model, placements, world_size=2, device=torch.device("cpu"))
    save_placements(placements_from_plan(plan), tmp_path / "plan.json")
    again = manual_plan(model, load_placements(tmp_path / "plan.json"), world_size=2, device=torch.device("cpu"))
    assert describe_plan(again) == describe_plan(plan)


@pytest.mark.parametrize("bad, message", [
    ({"t_cat_1": "table_wise"}, "exactly one rank"),
    ({"t_cat_1": "diagonal"}, "placement kind must be one of"),
    ({"t_cat_1": "table_wise:x"}, "is not a placement"),
])
def test_bad_overrides(bad, message):
    with pytest.raises(ValueError, match=message):
        PlanConfig(overrides=bad)


def test_bad_plan_file(tmp_path):
    (tmp_path / "p.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a saved dqrm placement file"):
        load_placements(tmp_path / "p.json")

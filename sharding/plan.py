"""Turns a model, a topology and constraints into a TorchRec ``ShardingPlan`` and a ``DistributedModelParallel``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.types import KernelConfig, ParameterConstraints, TopologyFactory, TrainerConfig
from torchrec.distributed.sharding_plan import (
    column_wise,
    construct_module_sharding_plan,
    data_parallel,
    get_default_sharders,
    row_wise,
    table_wise,
)
from torchrec.distributed.types import ShardingPlan


def plan_sharding(
    model: nn.Module,
    *,
    world_size: int,
    device: torch.device,
    pg: dist.ProcessGroup | None = None,
    constraints: dict[str, ParameterConstraints] | None = None,
    sharders: list | None = None,
) -> ShardingPlan:
    """Ask TorchRec's planner for a plan; with a process group every rank gets rank 0's plan."""
    topology = TopologyFactory.create_topology(TrainerConfig(world_size=world_size, local_world_size=world_size),
                                               kernel_config=KernelConfig(compute_device=device.type))
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    sharders = sharders or get_default_sharders()
    if pg is not None:
        return planner.collective_plan(model, sharders, pg)
    return planner.plan(model, sharders)


EBC_PATH = "model.sparse_arch.embedding_bag_collection"
PLACEMENTS = ("data_parallel", "table_wise", "row_wise", "column_wise")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TablePlacement:
    """Where one table goes, as data: a sharding type and, for table_wise/column_wise, the ranks."""

    kind: str
    """One of data_parallel, table_wise, row_wise, column_wise."""
    ranks: tuple[int, ...] = ()
    """table_wise: the one rank; column_wise: the rank of each column shard; otherwise unused."""

    def __post_init__(self) -> None:
        if self.kind not in PLACEMENTS:
            raise ValueError(f"placement kind must be one of {PLACEMENTS}, got {self.kind!r}")
        if self.kind == "table_wise" and len(self.ranks) != 1:
            raise ValueError(f"table_wise needs exactly one rank, got {self.ranks}")
        if self.kind == "column_wise" and not self.ranks:
            raise ValueError("column_wise needs the rank of each column shard")


def manual_plan(model: nn.Module, placements: dict[str, TablePlacement], *, world_size: int,
                device: torch.device) -> ShardingPlan:
    """A plan from explicit placements (the way to get row-wise sharding on CPU, where the planner lacks it)."""
    ebc = model.model.sparse_arch.embedding_bag_collection
    for p in placements.values():
        if any(not 0 <= r < world_size for r in p.ranks):
            raise ValueError(f"placement {p} names a rank outside world size {world_size}")
    generators = {name: _generator(p) for name, p in placements.items()}
    module_plan = construct_module_sharding_plan(ebc, generators, local_size=world_size, world_size=world_size,
                                                 device_type=device.type)
    return ShardingPlan({EBC_PATH: module_plan})


def _generator(p: TablePlacement):
    if p.kind == "data_parallel":
        return data_parallel()
    if p.kind == "table_wise":
        return table_wise(rank=p.ranks[0])
    if p.kind == "row_wise":
        return row_wise()
    return column_wise(ranks=list(p.ranks))


def shard_model(model: nn.Module, plan: ShardingPlan, device: torch.device,
                sharders: list | None = None) -> DistributedModelParallel:
    """Wrap in DMP: shards the tables by ``plan``, DDP-wraps the dense part, materializes meta tables."""
    return DistributedModelParallel(module=model, device=device, plan=plan, sharders=sharders or get_default_sharders())


def describe_plan(plan: ShardingPlan) -> list[dict]:
    """One row per table: sharding type, compute kernel and the ranks holding it."""
    rows = []
    for module_path, module_plan in plan.plan.items():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            ranks = sorted({r for r in (ps.ranks or [])})
            rows.append({"module": module_path, "table": table, "sharding": ps.sharding_type,
                         "kernel": ps.compute_kernel, "ranks": ranks})
    return rows


def plan_table(rows: list[dict]) -> str:
    lines = [f"{'table':<12} {'sharding':<14} {'kernel':<10} ranks"]
    lines += [f"{r['table']:<12} {r['sharding']:<14} {r['kernel']:<10} {r['ranks']}" for r in rows]
    return "\n".join(lines)


def save_plan(rows: list[dict], path: Path) -> None:
    path.write_text(json.dumps(rows, indent=2))

"""Turns a model, a topology and constraints into a TorchRec ``ShardingPlan`` and a ``DistributedModelParallel``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import ShardingPlan


def plan_sharding(
    model: nn.Module,
    *,
    world_size: int,
    device: torch.device,
    pg: dist.ProcessGroup | None = None,
    constraints: dict[str, ParameterConstraints] | None = None,
) -> ShardingPlan:
    """Ask TorchRec's planner for a plan; with a process group every rank gets rank 0's plan."""
    topology = Topology(world_size=world_size, compute_device=device.type, local_world_size=world_size)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    sharders = get_default_sharders()
    if pg is not None:
        return planner.collective_plan(model, sharders, pg)
    return planner.plan(model, sharders)


def shard_model(model: nn.Module, plan: ShardingPlan, device: torch.device) -> DistributedModelParallel:
    """Wrap in DMP: shards the tables by ``plan``, DDP-wraps the dense part, materializes meta tables."""
    return DistributedModelParallel(module=model, device=device, plan=plan, sharders=get_default_sharders())


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

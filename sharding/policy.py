"""Placement policy as data: small tables data-parallel, large ones table-wise (balanced by TorchRec's planner) or
row-wise, with per-table overrides; plans saved as JSON and reloaded."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingPlan, ShardingType

from dqrm.sharding.plan import TablePlacement, manual_plan, plan_sharding
from dqrm.sharding.tbe import table_configs


@dataclasses.dataclass(kw_only=True)
class PlanConfig:
    """How tables are placed on ranks."""

    data_parallel_max_rows: int = 0
    """Tables with at most this many rows are replicated on every rank (data_parallel); 0 leaves the choice
    between data-parallel and table-wise to TorchRec's planner, whose cost model does the same by size."""
    row_wise_min_rows: int = 0
    """Tables with at least this many rows are split by rows over all ranks (0 = never automatically)."""
    overrides: dict[str, str] = dataclasses.field(default_factory=dict)
    """Per table: data_parallel, table_wise:RANK, row_wise or column_wise:R0,R1,..., e.g.
    ``--set plan.overrides=t_cat_3:row_wise,t_cat_5:column_wise:0,1``."""

    def __post_init__(self) -> None:
        for table, spec in self.overrides.items():
            parse_placement(spec, where=f"plan.overrides[{table!r}]")


def parse_placement(spec: str, *, where: str = "placement") -> TablePlacement:
    kind, _, ranks = spec.partition(":")
    try:
        return TablePlacement(kind=kind, ranks=tuple(int(r) for r in ranks.split(",") if r))
    except ValueError as e:
        raise ValueError(f"{where}: {spec!r} is not a placement ({e})") from None


def policy_placements(model: nn.Module, cfg: PlanConfig, world_size: int) -> dict[str, TablePlacement | None]:
    """Each table's placement by the policy; ``None`` = table-wise, rank left to the balancer."""
    out: dict[str, TablePlacement | None] = {}
    for t in table_configs(model):
        if t.name in cfg.overrides:
            out[t.name] = parse_placement(cfg.overrides[t.name])
        elif cfg.data_parallel_max_rows and t.num_embeddings <= cfg.data_parallel_max_rows:
            out[t.name] = TablePlacement(kind="data_parallel")
        elif cfg.row_wise_min_rows and t.num_embeddings >= cfg.row_wise_min_rows and world_size > 1:
            out[t.name] = TablePlacement(kind="row_wise")
        else:
            out[t.name] = None
    return out


def plan_by_policy(model: nn.Module, cfg: PlanConfig, *, world_size: int, device: torch.device,
                   pg: dist.ProcessGroup | None = None, sharders: list | None = None) -> ShardingPlan:
    """Without row-wise tables: TorchRec's planner, constrained by the policy (it balances table-wise tables).
    With row-wise tables (the planner does not offer them on CPU): a manual plan, table-wise tables placed
    greedily, largest first, on the rank holding the fewest bytes."""
    placements = policy_placements(model, cfg, world_size)
    if all(p is None or p.kind == "data_parallel" for p in placements.values()):
        constraints = None if not cfg.data_parallel_max_rows else {
            name: ParameterConstraints(sharding_types=[ShardingType.DATA_PARALLEL.value if p else
                                                       ShardingType.TABLE_WISE.value])
            for name, p in placements.items()}
        return plan_sharding(model, world_size=world_size, device=device, pg=pg, constraints=constraints,
                             sharders=sharders)
    return manual_plan(model, balance_table_wise(model, placements, world_size), world_size=world_size,
                       device=device)


def balance_table_wise(model: nn.Module, placements: dict[str, TablePlacement | None],
                       world_size: int) -> dict[str, TablePlacement]:
    sizes = {t.name: t.num_embeddings * t.embedding_dim for t in table_configs(model)}
    load = [0] * world_size
    for name, p in placements.items():
        if p is None:
            continue
        if p.kind in ("row_wise", "data_parallel"):
            for r in range(world_size):
                load[r] += sizes[name] // (world_size if p.kind == "row_wise" else 1)
        else:
            for r in p.ranks:
                load[r] += sizes[name] // len(p.ranks)
    out = {n: p for n, p in placements.items() if p is not None}
    for name in sorted((n for n, p in placements.items() if p is None), key=lambda n: (-sizes[n], n)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        out[name] = TablePlacement(kind="table_wise", ranks=(rank,))
        load[rank] += sizes[name]
    return dict(sorted(out.items(), key=lambda kv: int(kv[0].rsplit("_", 1)[-1]) if kv[0][-1].isdigit() else 0))


def placements_from_plan(plan: ShardingPlan) -> dict[str, TablePlacement]:
    out = {}
    for module_plan in plan.plan.values():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            kind = ps.sharding_type
            ranks = tuple(ps.ranks or ())
            if kind == ShardingType.TABLE_WISE.value:
                out[table] = TablePlacement(kind="table_wise", ranks=ranks[:1])
            elif kind == ShardingType.COLUMN_WISE.value:
                out[table] = TablePlacement(kind="column_wise", ranks=ranks)
            elif kind == ShardingType.ROW_WISE.value:
                out[table] = TablePlacement(kind="row_wise")
            elif kind == ShardingType.DATA_PARALLEL.value:
                out[table] = TablePlacement(kind="data_parallel")
            else:
                raise ValueError(f"table {table}: sharding type {kind} cannot be saved as a placement")
    return out


def save_placements(placements: dict[str, TablePlacement], path: Path) -> None:
    path.write_text(json.dumps({n: dataclasses.asdict(p) for n, p in placements.items()}, indent=2))


def load_placements(path: Path) -> dict[str, TablePlacement]:
    try:
        raw = json.loads(Path(path).read_text())
        return {n: TablePlacement(kind=p["kind"], ranks=tuple(p.get("ranks", ()))) for n, p in raw.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a saved dqrm placement file ({e})") from None

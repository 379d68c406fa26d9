"""Optimizer state on resume: make lazy state exist before a checkpoint is read into it, and carry the tables'
row-wise Adagrad accumulators across a change of plan.

DCP reshards a saved tensor onto any layout of the same global shape, which covers a change of world size for the
dense optimizers' state (replicated) and for the accumulators of table-wise and row-wise tables (one value per row,
a 1-d tensor of the table's rows whichever rank holds them). Two changes alter the shape, and nothing in TorchRec or
DCP translates them, so this module does (ours):

* a table moved between data-parallel and sharded: TorchRec's ``RowWiseAdagrad`` keeps ``sum`` (rows x 1) and
  ``step``, FBGEMM's fused optimizer ``TABLE.momentum1`` (rows); the same numbers, under another name and shape;
* a change in the number of column-wise shards: FBGEMM keeps one accumulator per row *per column shard* (each shard's
  update averages the squared gradient over its own columns), laid out shard after shard (TorchRec's
  ``get_optimizer_rowwise_shard_metadata_and_global_metadata``). From k shards to one accumulator per row the
  carry is exact: the whole row's mean square is the width-weighted mean of the shards' (what one accumulator over
  the same gradients would hold). The other way is not determined by the saved numbers and is refused, naming the
  table and how to resume.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

log = logging.getLogger(__name__)

ROW_STATE_SUFFIXES = (".momentum1", "sum")
"""The names of a table's row-wise Adagrad accumulator: FBGEMM's fused ``TABLE.momentum1``, TorchRec's ``sum``."""


class OptimizerStateMismatch(ValueError):
    """The checkpoint's optimizer state cannot be carried onto this job's (named table, and what to do)."""


def init_lazy_state(optimizer: Any) -> None:
    """Create the state torch's optimizers make on their first step (Adam's moments, Adagrad's sums, the data-parallel
    tables' ``RowWiseAdagrad``), so that a checkpoint is read into it: a step with zero gradients, which moves no
    weight under SGD, Adagrad, row-wise Adagrad or Adam (a zero gradient gives a zero update), and whose counters the
    load then overwrites. The fused optimizer's state exists from the start."""
    for part in _parts(optimizer):
        if isinstance(part, KeyedOptimizerWrapper) and not part.state and part.params:
            grads = {k: p.grad for k, p in part.params.items()}
            part.init_state()
            for k, p in part.params.items():
                p.grad = grads[k]


def _parts(optimizer: Any) -> list[Any]:
    """The keyed optimizers a job's ``CombinedOptimizer`` is made of (the optimizer itself otherwise)."""
    return [p for _, p in optimizer.optimizers] if isinstance(optimizer, CombinedOptimizer) else [optimizer]


def _full_size(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.size())


def _row_state_keys(saved: dict[str, Any], fqn: str) -> list[str]:
    prefix = f"optim.state.{fqn}."
    return [k for k in saved if k.startswith(prefix) and k[len(prefix):].endswith(ROW_STATE_SUFFIXES)]


def _column_widths(saved: dict[str, Any], fqn: str) -> list[int]:
    """The column widths of the saved table's shards, in column order (one width when it was not column-wise)."""
    chunks = saved[f"model.{fqn}"].chunks
    widths: dict[int, int] = {}
    for c in chunks:
        widths.setdefault(int(c.offsets[1]), int(c.sizes[1]))
    return [widths[o] for o in sorted(widths)]


def _every_rank(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (just ``[obj]`` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def agreed(check, *args) -> Any:
    """Run ``check`` on every rank and raise its error on all of them if it raised on any (a rank holds only its own
    tables' state, and a rank that went on alone would wait in the load's collectives)."""
    try:
        result, error = check(*args), None
    except OptimizerStateMismatch as e:
        result, error = None, str(e)
    errors = [e for e in _every_rank(error) if e]
    if errors:
        raise OptimizerStateMismatch(errors[0])
    return result


def plan_row_state_carry(saved: dict[str, Any], optim_state: dict[str, Any], where: Path) -> dict[str, dict]:
    """Which of this job's optimizer entries DCP cannot read as they are (a table's accumulator under another name or
    shape, or a ``step`` the saved placement did not keep), and how each is made: ``{dcp_key: recipe}``. Raises
    ``OptimizerStateMismatch`` where the saved state does not determine this job's."""
    carry: dict[str, dict] = {}
    for fqn, states in optim_state["state"].items():
        for name, t in states.items():
            key = f"optim.state.{fqn}.{name}"
            if key in saved and tuple(saved[key].size) == _full_size(t):
                continue
            table = fqn.rsplit(".", 2)[-2] if fqn.endswith(".weight") else fqn
            if name == "step":  # data-parallel RowWiseAdagrad's counter, absent where the table was sharded
                carry[key] = {"kind": "step"}
                continue
            if not name.endswith(ROW_STATE_SUFFIXES):
                raise OptimizerStateMismatch(
                    f"{where}: optimizer state {key} is {'missing' if key not in saved else 'of another shape'} in "
                    f"the checkpoint (saved {tuple(saved[key].size) if key in saved else None}, this job "
                    f"{_full_size(t)}): the checkpoint was written with another optimizer or model; resume with the "
                    f"optim settings it was written with, or start a new run dir")
            sources = _row_state_keys(saved, fqn)
            if len(sources) != 1:
                raise OptimizerStateMismatch(
                    f"{where}: table {table} has no row-wise Adagrad state in the checkpoint (found {sources or 'none'}); "
                    f"it was written with another optimizer (optim.embedding); resume with that one or start a new run "
                    f"dir")
            source = sources[0]
            rows = _full_size(t)[0] if name == "sum" else None
            widths = _column_widths(saved, fqn)
            table_rows = int(saved[f"model.{fqn}"].size[0])
            target_shards = 1 if name == "sum" else _full_size(t)[0] // table_rows
            if target_shards != 1:
                raise OptimizerStateMismatch(
                    f"{where}: table {table} is split into {target_shards} column-wise shards here but was saved as "
                    f"{len(widths)}: each column shard keeps its own row-wise Adagrad accumulator, which the saved "
                    f"ones do not determine. Resume with the saved split of {table} (plan.overrides="
                    f"{table}:column_wise:RANKS with {len(widths)} ranks) or without column-wise sharding of it")
            saved_numel = int(torch.Size(saved[source].size).numel())
            if saved_numel != table_rows * len(widths) or (rows is not None and rows != table_rows):
                raise OptimizerStateMismatch(
                    f"{where}: table {table}'s saved row-wise Adagrad state has {saved_numel} values for "
                    f"{table_rows} rows in {len(widths)} column shard(s); cannot carry it")
            carry[key] = {"kind": "rows", "source": source, "shape": tuple(saved[source].size), "rows": table_rows,
                          "widths": widths, "table": table}
    return carry


def read_carried(path: Path, carry: dict[str, dict], optim_state: dict[str, Any], step: int) -> None:
    """Read the saved accumulators ``carry`` names (whole, on every rank: one float per row and column shard) and
    write each into this job's tensor: the width-weighted mean of the saved column shards, as ``sum`` (rows x 1) or
    this rank's rows of ``momentum1``; a missing ``step`` becomes the checkpoint's training step."""
    shapes = {r["source"]: r["shape"] for r in carry.values() if r["kind"] == "rows"}
    for other in _every_rank(shapes):  # DCP's load is collective: every rank reads every rank's sources
        shapes.update(other)
    sources = {key: torch.empty(shape) for key, shape in sorted(shapes.items())}
    if sources:
        dcp.load(sources, storage_reader=dcp.FileSystemReader(str(path)))
    targets = {f"optim.state.{fqn}.{name}": t for fqn, states in optim_state["state"].items()
               for name, t in states.items()}
    for key, recipe in carry.items():
        t = targets[key]
        if recipe["kind"] == "step":
            t.fill_(step)
            continue
        shards = sources[recipe["source"]].reshape(len(recipe["widths"]), recipe["rows"])
        weights = torch.tensor(recipe["widths"], dtype=shards.dtype) / sum(recipe["widths"])
        per_row = (weights[:, None] * shards).sum(0) if len(recipe["widths"]) > 1 else shards[0]
        if isinstance(t, ShardedTensor):
            for shard in t.local_shards():
                start, n = shard.metadata.shard_offsets[0], shard.metadata.shard_sizes[0]
                shard.tensor.copy_(per_row[start:start + n])
        else:
            t.copy_(per_row.reshape(t.shape))
        log.info("table %s: row-wise Adagrad state carried from %s to %s", recipe["table"],
                 f"{len(recipe['widths'])} column shards" if len(recipe["widths"]) > 1 else recipe["source"]
                 .rsplit(".", 1)[-1], key.rsplit(".", 1)[-1] + (" (width-weighted mean, exact)"
                                                                 if len(recipe["widths"]) > 1 else ""))


def loadable(optim_state: dict[str, Any], carry: dict[str, dict]) -> dict[str, Any]:
    """``optim_state`` without the entries ``carry`` makes: what DCP reads as saved."""
    kept = {fqn: {name: t for name, t in states.items() if f"optim.state.{fqn}.{name}" not in carry}
            for fqn, states in optim_state["state"].items()}
    return {"state": {fqn: states for fqn, states in kept.items() if states}}  # DCP reads {} as a missing entry


def check_nothing_left_behind(saved: dict[str, Any], optim_state: dict[str, Any], carry: dict[str, dict],
                              where: Path) -> None:
    """Refuse a checkpoint whose optimizer state this job would not read (e.g. Adam's moments, resumed with SGD):
    only a table's ``step`` that its saved data-parallel placement kept and its sharded one does not may stay."""
    wanted = {f"optim.state.{fqn}.{name}" for fqn, states in optim_state["state"].items() for name in states}
    wanted |= {r["source"] for r in carry.values() if r["kind"] == "rows"}
    tables = {fqn for fqn in optim_state["state"] if any(n.endswith(ROW_STATE_SUFFIXES) for n in
                                                         optim_state["state"][fqn])}
    for other_wanted, other_tables in _every_rank((wanted, tables)):  # a rank lists only the tables it holds
        wanted |= other_wanted
        tables |= other_tables
    left = [k for k in saved if k.startswith("optim.state.") and k not in wanted
            and not (k.endswith(".step") and k[len("optim.state."):-len(".step")] in tables)]
    if left:
        raise OptimizerStateMismatch(
            f"{where}: the checkpoint holds optimizer state this job has no place for ({len(left)} entries, e.g. "
            f"{left[0]}): it was written with another optimizer (optim.embedding / optim.dense); resume with the "
            f"settings it was written with, or start a new run dir")


def stateful(optimizer: Any) -> bool:
    """Whether the optimizer keeps state a resume must read (anything but plain SGD)."""
    for part in _parts(optimizer):
        if isinstance(part, KeyedOptimizerWrapper):
            inner = part._optimizer
            if part.params and not (type(inner) is torch.optim.SGD and not inner.defaults.get("momentum")):
                return True
        elif any(part.state_dict()["state"].values()):  # the fused optimizer: its state exists from the start
            return True
    return False

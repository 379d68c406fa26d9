"""``ByteCounter`` counts wire bytes per rank (the cost model of ``sharding.byte_counter``) for every hook and for
TorchRec's model-parallel collectives, at world sizes 2 and 4 on gloo, without patching ``torch.distributed``."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dqrm.sharding.byte_counter import ByteCounter
from tests.dist_utils import run_distributed

COLLECTIVES = ("all_to_all_single", "reduce_scatter_tensor", "reduce_scatter", "all_gather_into_tensor", "all_gather")


@pytest.mark.parametrize("world", [2, 4, 8])
def test_formulas(world):
    from dqrm.sharding.byte_counter import (all_gather_wire_bytes, all_reduce_wire_bytes, all_to_all_wire_bytes,
                                            reduce_scatter_wire_bytes)

    n = 1000 * world
    assert all_reduce_wire_bytes(n, world) == 2 * (world - 1) * 1000
    assert all_gather_wire_bytes(n, world) == (world - 1) * n
    assert reduce_scatter_wire_bytes(n, world) == (world - 1) * 1000
    assert all_to_all_wire_bytes(n, 1000) == n - 1000


def _hooks(rank, world_size):
    """One DDP step of a small MLP under each hook, with the bytes counted."""
    from torch.nn.parallel import DistributedDataParallel

    from dqrm.sharding.ddp_hooks import Fp32AllReduceCount, Int8ErrorFeedbackHook, fp16_hook

    out = {}
    for name in ("fp32", "fp16", "int8_ef"):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 1))
        ddp = DistributedDataParallel(net)
        counter = ByteCounter()
        if name == "fp32":  # DDP's own all-reduce, counted beside it
            Fp32AllReduceCount(counter, "all_reduce fp32 (MLP)", ddp)
        else:
            ddp.register_comm_hook(None, {"fp16": fp16_hook(counter),
                                          "int8_ef": Int8ErrorFeedbackHook(counter).__call__}[name])
        ddp(torch.randn(8, 13)).sum().backward()
        out[name] = dict(counter.bytes)
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_ddp_hooks_count_wire_bytes(world):
    n, rows = 13 * 32 + 32 + 32 + 1, 32 + 1 + 1 + 1  # elements; output rows (a bias one row)
    for sent in run_distributed(_hooks, world_size=world):
        assert sent["fp32"] == {"all_reduce fp32 (MLP)": 2 * (world - 1) * 4 * n / world}
        assert sent["fp16"] == {"all_reduce fp16 (MLP)": 2 * (world - 1) * 2 * n / world}
        assert sent["int8_ef"] == {"all_gather int8 (MLP)": (world - 1) * n,
                                   "all_gather scales (MLP)": (world - 1) * 4 * rows}


class _FlatTable:
    """The one thing the touched-rows exchange reads from a kernel's layout: the row width."""
    local_dims = [16]


def _touched(rank, world_size):
    """A touched-rows exchange (INT8 and not) of a 100-row table: rank r touched rows 0..r+1."""
    from dqrm.sharding.touched_rows import TouchedRowsHook

    out = {}
    for int8 in (False, True):
        counter = ByteCounter()
        grad = torch.zeros(100 * 16)
        grad.view(100, 16)[: rank + 2] = 1.0
        TouchedRowsHook({}, int8, counter)._exchange(grad, _FlatTable(), [torch.arange(rank + 2)], None)
        out[int8] = dict(counter.bytes)
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_touched_rows_count_wire_bytes(world):
    most = world + 1  # rows of the rank that touched most; every rank pads its payload to it
    words = most + most % 2  # delta-coded ids, 2 bytes each, padded to keep the rows 4-byte aligned
    for sent in run_distributed(_touched, world_size=world):
        common = {"all_gather counts (DP tables)": (world - 1) * 3 * 8,
                  "all_gather ids (DP tables)": (world - 1) * 2 * words}
        assert sent[False] == {**common, "all_gather rows (DP tables)": (world - 1) * most * 16 * 4}
        assert sent[True] == {**common, "all_gather rows (DP tables)": (world - 1) * most * 16,
                              "all_gather row steps (DP tables)": (world - 1) * most * 2}


def _torchrec_collectives(rank, world_size):
    """The counting view TorchRec's modules call through: each collective on the installed group, and one on
    another group (not counted); torch.distributed's own functions are untouched throughout."""
    import torchrec.distributed.comm_ops as comm_ops
    import torchrec.distributed.dist_data as dist_data

    originals = {name: getattr(dist, name) for name in COLLECTIVES}
    counter = ByteCounter().install()
    assert all(getattr(dist, name) is fn for name, fn in originals.items())
    assert comm_ops.dist is dist_data.dist is not dist
    via = comm_ops.dist
    splits = list(range(1, world_size + 1))  # rank j receives j + 1 rows of 3 floats
    x = torch.randn(sum(splits), 3)
    via.all_to_all_single(torch.empty(world_size * (rank + 1), 3), x, [rank + 1] * world_size, splits)
    a2a = dict(counter.bytes)
    counter.reset()
    full = torch.randn(4 * world_size, 5)
    via.reduce_scatter_tensor(torch.empty(4, 5), full)
    via.all_gather_into_tensor(torch.empty(4 * world_size, 5), torch.randn(4, 5))
    via.all_gather([torch.empty(4, 5) for _ in range(world_size)], torch.randn(4, 5))
    other = dist.new_group(list(range(world_size)))
    via.all_to_all_single(torch.empty(4 * world_size), torch.randn(4 * world_size), group=other)
    rest = dict(counter.bytes)
    counter.uninstall()
    assert comm_ops.dist is dist and dist_data.dist is dist
    return a2a, rest


@pytest.mark.parametrize("world", [2, 4])
def test_torchrec_collectives_are_counted_on_their_group_only(world):
    for rank, (a2a, rest) in enumerate(run_distributed(_torchrec_collectives, world_size=world)):
        total = sum(range(1, world + 1)) * 3 * 4
        assert a2a == {"all_to_all (model-parallel)": total - (rank + 1) * 3 * 4}
        assert rest == {"reduce_scatter_tensor": (world - 1) * 4 * world * 5 * 4 / world,
                        "all_gather_into_tensor": (world - 1) * 4 * 5 * 4, "all_gather": (world - 1) * 4 * 5 * 4}


def _sharded_step(rank, world_size, data_dir):
    """One training step of the tiny sharded DLRM (every placement kind) with the counter installed."""
    import torchrec.distributed.comm_ops as comm_ops

    from dqrm.sharding.comm import CommConfig, compress_gradients
    from tests.helpers import batches, mixed_placements, sharded_model

    originals = {name: getattr(dist, name) for name in COLLECTIVES}
    model, _ = sharded_model(world_size, mixed_placements(world_size, with_column_wise=True))
    counter = ByteCounter().install()
    compress_gradients(model, CommConfig(), counter)
    assert all(getattr(dist, name) is fn for name, fn in originals.items())
    loss, _ = model(batches(data_dir / "train.parquet", 32, rank=rank, world_size=world_size, limit=1)[0])
    loss.backward()
    counter.uninstall()
    assert comm_ops.dist is dist
    return dict(counter.bytes)


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_model_collectives_are_counted(tmp_path_factory, world):
    from tests.helpers import tiny_data

    data = tiny_data(tmp_path_factory.mktemp("wire-data"))
    for sent in run_distributed(_sharded_step, data, world_size=world):
        assert sent["all_to_all (model-parallel)"] > 0
        # Row-wise tables: the forward reduce-scatters the pooled embeddings of the whole batch (n bytes, (W-1)/W n
        # on the wire), the backward all-gathers this rank's n/W of their gradients ((W-1) n/W): equal.
        assert sent["reduce_scatter_tensor"] == sent["all_gather_into_tensor"] > 0
        assert sent["all_reduce fp32 (MLP)"] > 0 and sent["all_reduce fp32 (DP tables)"] > 0

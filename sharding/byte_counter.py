"""``ByteCounter``: the bytes each rank puts on the wire for each kind of collective, per training step (the
``comm_bytes_per_step`` of a job's summary), and the wire-cost model every caller uses (``all_reduce_wire_bytes``
and its siblings: the one place that says what a collective costs).

The DDP hooks (``sharding.ddp_hooks``, ``sharding.touched_rows``, ``sharding.int8_allreduce``) count what they send
themselves. TorchRec's model-parallel collectives are counted where TorchRec issues them: ``install`` points the
``dist`` name of TorchRec's two collective modules (``torchrec.distributed.comm_ops``, the pooled-embedding and
reduce-scatter ops; ``torchrec.distributed.dist_data``, the KJT input all-to-alls) at a view of
``torch.distributed`` whose collectives also count the calls made on the installed process group.
``torch.distributed`` itself is left alone, so nothing else in the process (DDP, our hooks, other libraries) is
touched. Neither library offers a way to observe a collective's payload: torch's process-group completion hooks
report timings only and exist for NCCL alone, a ``ProcessGroup``'s methods are read-only and its Python subclasses
must be registered in torch's private group tables, a torch function mode would route every tensor op of the
training step through Python, and TorchRec has no collective hook; recomputing the sizes from the sharded modules'
input and output dist objects would duplicate TorchRec's split and codec arithmetic, where counting its calls
sees exactly the (codec-encoded) tensors it sends.
"""

from __future__ import annotations

import collections
import importlib

import torch
import torch.distributed as dist

# TorchRec's modules that issue the model-parallel collectives (each calls them as ``dist.<name>``).
_TORCHREC_COLLECTIVE_MODULES = ("torchrec.distributed.comm_ops", "torchrec.distributed.dist_data")


def all_reduce_wire_bytes(nbytes: float, world_size: int) -> float:
    """Ring all-reduce of an ``nbytes`` tensor: a reduce-scatter then an all-gather, each sending W-1 chunks of
    n/W: 2(W-1)/W * n per rank."""
    return 2 * (world_size - 1) * nbytes / world_size


def all_gather_wire_bytes(nbytes: float, world_size: int) -> float:
    """All-gather of this rank's ``nbytes`` input (ring or direct): every other rank needs it, (W-1) * n per
    rank."""
    return (world_size - 1) * nbytes


def reduce_scatter_wire_bytes(nbytes: float, world_size: int) -> float:
    """Ring reduce-scatter of an ``nbytes`` input (the full, unscattered tensor): W-1 chunks of n/W, (W-1)/W * n
    per rank."""
    return (world_size - 1) * nbytes / world_size


def all_to_all_wire_bytes(nbytes: float, own_bytes: float) -> float:
    """All-to-all (direct): everything this rank's ``nbytes`` input holds but its own split ``own_bytes``."""
    return nbytes - own_bytes


class ByteCounter:
    """Bytes each rank puts on the wire per kind of collective, under the algorithms gloo and NCCL use at these
    sizes: ring all-reduce 2(W-1)/W * n, all-gather (W-1) * n of the rank's input, ring reduce-scatter
    (W-1)/W * n of the full input, all-to-all the input minus the rank's own split (the functions above). It is
    the algorithms' cost model, not a packet capture (no headers, no protocol overhead, no tree or
    recursive-halving variants).

    Kinds are labels, e.g. "all_reduce fp32 (MLP)", "all_gather rows (DP tables)", "all_to_all (model-parallel)".
    ``install(group)`` also counts TorchRec's model-parallel collectives on ``group`` (see the module docstring);
    ``uninstall`` stops that."""

    def __init__(self) -> None:
        self.bytes: collections.Counter[str] = collections.Counter()
        self._group: dist.ProcessGroup | None = None

    def add(self, kind: str, wire_bytes: float) -> None:
        self.bytes[kind] += wire_bytes

    def all_reduce(self, kind: str, nbytes: float, world_size: int) -> None:
        self.add(kind, all_reduce_wire_bytes(nbytes, world_size))

    def all_gather(self, kind: str, nbytes: float, world_size: int) -> None:
        self.add(kind, all_gather_wire_bytes(nbytes, world_size))

    def reduce_scatter(self, kind: str, nbytes: float, world_size: int) -> None:
        self.add(kind, reduce_scatter_wire_bytes(nbytes, world_size))

    def all_to_all(self, kind: str, nbytes: float, own_bytes: float) -> None:
        self.add(kind, all_to_all_wire_bytes(nbytes, own_bytes))

    def reset(self) -> None:
        self.bytes.clear()

    def snapshot(self, steps: int) -> dict[str, float]:
        out = {k: v / max(steps, 1) for k, v in sorted(self.bytes.items())}
        out["total"] = sum(self.bytes.values()) / max(steps, 1)
        return out

    def install(self, group: dist.ProcessGroup | None = None) -> "ByteCounter":
        """Also count TorchRec's model-parallel collectives issued on ``group`` (None: the default group, the one
        DMP shards over unless given another)."""
        self._group = group if group is not None else dist.group.WORLD
        _COUNTING_DIST.counters[self._group] = self
        for name in _TORCHREC_COLLECTIVE_MODULES:
            importlib.import_module(name).dist = _COUNTING_DIST
        return self

    def uninstall(self) -> None:
        """Stop counting TorchRec's collectives; with no counter left, TorchRec's modules see ``torch.distributed``
        itself again."""
        if _COUNTING_DIST.counters.get(self._group) is self:
            del _COUNTING_DIST.counters[self._group]
        self._group = None
        if not _COUNTING_DIST.counters:
            for name in _TORCHREC_COLLECTIVE_MODULES:
                importlib.import_module(name).dist = dist


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _CountingDist:
    """``torch.distributed`` as TorchRec's collective modules see it once a counter is installed: every name is
    torch.distributed's own, and the collectives TorchRec issues (same signatures) first add their wire bytes to
    the counter installed on their group, if any, under the collective's name (the all-to-alls as
    "all_to_all (model-parallel)"). Row-wise tables use the reduce-scatters (forward) and all-gathers (backward)
    of their pooled embeddings, so those are counted too."""

    def __init__(self) -> None:
        self.counters: dict[dist.ProcessGroup, ByteCounter] = {}

    def __getattr__(self, name: str):
        return getattr(dist, name)

    def _counter(self, group) -> tuple[ByteCounter | None, int]:
        counter = self.counters.get(group if group is not None else dist.group.WORLD)
        return counter, (dist.get_world_size(group) if counter is not None else 0)

    def all_to_all_single(self, output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                          async_op=False):
        counter, world = self._counter(group)
        if counter is not None:
            total = nbytes(input)
            if input_split_sizes:  # splits count rows of dim 0
                own = input_split_sizes[dist.get_rank(group)] * (total // max(input.shape[0], 1))
            else:
                own = total // world
            counter.all_to_all("all_to_all (model-parallel)", total, own)
        return dist.all_to_all_single(output, input, output_split_sizes, input_split_sizes, group, async_op)

    def reduce_scatter_tensor(self, output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
        counter, world = self._counter(group)
        if counter is not None:
            counter.reduce_scatter("reduce_scatter_tensor", nbytes(input), world)
        return dist.reduce_scatter_tensor(output, input, op, group, async_op)

    def reduce_scatter(self, output, input_list, op=dist.ReduceOp.SUM, group=None, async_op=False):
        counter, world = self._counter(group)
        if counter is not None:
            counter.reduce_scatter("reduce_scatter", sum(nbytes(t) for t in input_list), world)
        return dist.reduce_scatter(output, input_list, op, group, async_op)

    def all_gather_into_tensor(self, output_tensor, input_tensor, group=None, async_op=False):
        counter, world = self._counter(group)
        if counter is not None:
            counter.all_gather("all_gather_into_tensor", nbytes(input_tensor), world)
        return dist.all_gather_into_tensor(output_tensor, input_tensor, group, async_op)

    def all_gather(self, tensor_list, tensor, group=None, async_op=False):
        counter, world = self._counter(group)
        if counter is not None:
            counter.all_gather("all_gather", nbytes(tensor), world)
        return dist.all_gather(tensor_list, tensor, group, async_op)


_COUNTING_DIST = _CountingDist()

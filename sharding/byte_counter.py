"""``ByteCounter``: the payload bytes each rank hands to each kind of collective, per training step (the
``comm_bytes_per_step`` of a job's summary). The model-parallel all-to-alls are counted by wrapping the
``torch.distributed`` functions TorchRec calls from Python; the DDP hooks (``sharding.ddp_hooks``,
``sharding.touched_rows``) count what they send themselves."""

from __future__ import annotations

import collections
import functools
from typing import Callable

import torch
import torch.distributed as dist


class ByteCounter:
    """Payload bytes this rank passes to each kind of collective (an all-reduce of n bytes counts n; a ring
    implementation puts 2(W-1)/W * n on the wire, an all-gather (W-1)/W * W * n)."""

    def __init__(self) -> None:
        self.bytes: collections.Counter[str] = collections.Counter()
        self._installed = False

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes[kind] += int(nbytes)

    def reset(self) -> None:
        self.bytes.clear()

    def snapshot(self, steps: int) -> dict[str, float]:
        out = {k: v / max(steps, 1) for k, v in sorted(self.bytes.items())}
        out["total"] = sum(self.bytes.values()) / max(steps, 1)
        return out

    def install(self) -> "ByteCounter":
        """Wrap the ``torch.distributed`` collectives TorchRec's model-parallel paths call from Python."""
        if self._installed:
            return self
        for name in ("all_to_all_single", "reduce_scatter_tensor", "all_gather_into_tensor"):
            original = getattr(dist, name)
            setattr(dist, name, _counting(original, name, self))
        self._installed = True
        return self


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _counting(fn: Callable, name: str, counter: ByteCounter) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if name == "all_to_all_single":
            inp = kwargs.get("input", args[1] if len(args) > 1 else None)
            splits = kwargs.get("input_split_sizes", args[3] if len(args) > 3 else None)
            group = kwargs.get("group")
            rank, world = dist.get_rank(group), dist.get_world_size(group)
            total = nbytes(inp)
            if splits:
                row = total // max(inp.shape[0], 1)
                own = splits[rank] * row
            else:
                own = total // world
            counter.add("all_to_all (model-parallel)", total - own)
        else:
            inp = kwargs.get("input", args[1] if len(args) > 1 else None)
            counter.add(name, nbytes(inp))
        return fn(*args, **kwargs)
    return wrapper

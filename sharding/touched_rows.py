"""The touched-rows exchange of data-parallel embedding tables (``TouchedRowsHook``, a DDP comm hook): each rank sends
only the rows its batch touched, as delta-coded ids and values, lossless or INT8 with each rank's own step per row
sent as bfloat16; every rank then holds the average the dense all-reduce gives.

No library exchanges sparse touched rows inside TorchRec's data parallelism, so it is written here.
"""

from __future__ import annotations

import collections
import functools
from typing import Any

import torch
import torch.distributed as dist

from dqrm.sharding.byte_counter import ByteCounter, nbytes
from dqrm.sharding.ddp_hooks import int8_step


def _done(t: torch.Tensor) -> torch.futures.Future:
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(t)
    return fut


def row_steps(maxabs: torch.Tensor) -> torch.Tensor:
    """Symmetric INT8 steps as bfloat16 (fp32's exponent range in 2 bytes): ``int8_step(maxabs)`` rounded up to the
    next bfloat16, so that ``round(x / step)`` stays within [-127, 127] for ``|x| <= maxabs`` and the step is at
    most 2^-8 coarser than the fp32 one."""
    step = int8_step(maxabs.to(torch.float32))
    rounded = step.to(torch.bfloat16)
    up = (rounded.view(torch.int16) + 1).view(torch.bfloat16)  # positive floats: the next pattern is the next value
    return torch.where(rounded.to(torch.float32) < step, up, rounded)


def encode_ids(ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sorted unique row ids as int16 words: the low 16 bits of each gap, then (position, high bits) int32 pairs
    for the rare gaps of 2^16 or more. Returns the words and the number of such pairs."""
    gaps = torch.diff(ids, prepend=ids.new_zeros(1))
    lo = ((gaps & 0xFFFF) ^ 0x8000) - 0x8000  # two's complement of the low 16 bits, fits int16 exactly
    big = (gaps >> 16).nonzero().squeeze(1)
    pairs = torch.stack([big, gaps[big] >> 16], dim=1).to(torch.int32).reshape(-1)
    return torch.cat([lo.to(torch.int16), pairs.view(torch.int16)]), big.numel()


def decode_ids(words: torch.Tensor, n: int, n_big: int) -> torch.Tensor:
    gaps = words[:n].to(torch.int64) & 0xFFFF
    if n_big:
        pairs = words[n:n + 4 * n_big].clone().view(torch.int32).to(torch.int64).view(-1, 2)
        gaps[pairs[:, 0]] += pairs[:, 1] << 16
    return torch.cumsum(gaps, 0)


class TouchedRowsHook:
    """Data-parallel tables: exchange only the rows a batch touched (delta-coded ids + values), optionally as INT8
    with a symmetric step per row (``row_steps``: each rank's own, 2 bytes a row); the result is the same average the
    dense all-reduce gives (bit for bit without INT8; with INT8 each rank's row within half its step, so within
    max|row| / 254 of the FP32 row, however small the row is next to the rest of its table).

    The touched rows come from the ids each table-batched kernel saw in its training forward (recorded by a forward
    hook), so the exchange costs O(touched rows), not O(table); the gradient is updated in place. Without a recorded
    forward it falls back to scanning the gradient for non-zero rows."""

    def __init__(self, layouts_by_param: dict[int, Any], int8: bool, counter: ByteCounter | None) -> None:
        self.layouts, self.int8, self.counter = layouts_by_param, int8, counter
        self.touched: dict[int, list[torch.Tensor]] = collections.defaultdict(list)
        self.scans = 0  # exchanges that had to scan the whole gradient (no recorded forward)
        self.handles = [lay.tbe.register_forward_hook(functools.partial(self._record, key), with_kwargs=True)
                        for key, lay in layouts_by_param.items() if len(set(lay.local_dims)) == 1]

    def _record(self, key: int, module, args, kwargs, output) -> None:
        if not (module.training and torch.is_grad_enabled()):  # (checked outside no_grad, or it is always off)
            return
        with torch.no_grad():
            self._record_rows(key, kwargs)

    def _record_rows(self, key: int, kwargs: dict) -> None:
        self.touched[key].append(self.layouts[key].row_ids(kwargs["indices"].long(), kwargs["offsets"].long()))

    def __call__(self, group, bucket):  # group: the DDP's process group (None: the default one)
        for p, g in zip(bucket.parameters(), bucket.gradients()):
            lay = self.layouts.get(id(p))
            if lay is None or len(set(lay.local_dims)) != 1:
                # Small (dp_whole_max_rows), or not a table we understand: the plain average, as DDP takes it.
                if self.counter is not None:
                    self.counter.all_reduce("all_reduce fp32 (DP tables, whole)", nbytes(g), dist.get_world_size(group))
                g.div_(dist.get_world_size(group))
                dist.all_reduce(g, group=group)
                continue
            self._exchange(g, lay, self.touched.pop(id(p), None), group)
        return _done(bucket.buffer())

    def _exchange(self, g: torch.Tensor, lay, recorded: list[torch.Tensor] | None, group) -> None:
        world, d, dev = dist.get_world_size(group), lay.local_dims[0], g.device
        rows = g.view(-1, d)
        if recorded:
            idx = torch.unique(torch.cat(recorded))  # sorted
        else:
            self.scans += 1
            idx = (rows != 0).any(dim=1).nonzero().squeeze(1)
        vals = rows[idx]
        words, n_big = encode_ids(idx)
        # One header per rank (row and id-word counts), then one payload (ids, for INT8 the rows' steps, then the
        # rows): two collectives.
        header = torch.tensor([idx.numel(), n_big, words.numel()], dtype=torch.float64, device=dev)
        headers = [torch.empty_like(header) for _ in range(world)]
        dist.all_gather(headers, header, group=group)
        most_rows = int(max(h[0] for h in headers))
        most_words = int(max(h[2] for h in headers))
        most_words += most_words % 2  # keeps the rows 4-byte aligned in the payload
        if self.int8:
            steps = row_steps(vals.abs().amax(dim=1)) if vals.numel() else vals.new_zeros(0, dtype=torch.bfloat16)
            values = torch.round(vals / steps.to(vals.dtype).unsqueeze(1)).to(torch.int8)  # within [-127, 127]
        else:
            steps, values = vals.new_zeros(0, dtype=torch.bfloat16), vals
        id_bytes, step_bytes = 2 * most_words, (2 * most_rows if self.int8 else 0)
        row_bytes = most_rows * d * values.element_size()
        payload = torch.zeros(id_bytes + step_bytes + row_bytes, dtype=torch.uint8, device=dev)  # gloo has no int16
        payload[: 2 * words.numel()] = words.view(torch.uint8)
        payload[id_bytes: id_bytes + 2 * steps.numel()] = steps.view(torch.uint8)
        start = id_bytes + step_bytes
        payload[start: start + values.numel() * values.element_size()] = values.reshape(-1).view(torch.uint8)
        if self.counter is not None:  # two all-gathers, the payload's by part (padding to the largest rank included)
            self.counter.all_gather("all_gather counts (DP tables)", nbytes(header), world)
            self.counter.all_gather("all_gather ids (DP tables)", id_bytes, world)
            if self.int8:
                self.counter.all_gather("all_gather row steps (DP tables)", step_bytes, world)
            self.counter.all_gather("all_gather rows (DP tables)", row_bytes, world)
        parts = [torch.empty_like(payload) for _ in range(world)]
        dist.all_gather(parts, payload, group=group)
        rows[idx] = 0  # every other row of the local gradient is zero already
        for h, part in zip(headers, parts):
            n, nb = int(h[0]), int(h[1])
            i = decode_ids(part[:id_bytes].view(torch.int16), n, nb)
            v = part[start: start + n * d * values.element_size()].view(values.dtype).view(n, d).to(g.dtype)
            if self.int8:
                v = v * part[id_bytes: id_bytes + 2 * n].view(torch.bfloat16).to(g.dtype).unsqueeze(1)
            rows.index_add_(0, i, v / world)

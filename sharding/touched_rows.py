"""The touched-rows exchange of data-parallel embedding tables (``TouchedRowsHook``, a DDP comm hook): each rank sends
only the rows its batch touched, as delta-coded ids and values, lossless or INT8 with each rank's own step per row
sent as bfloat16; every rank then holds DDP's average (bit for bit where at most two ranks sent a value).

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


def _scale_as_ddp(g: torch.Tensor, world: int, in_place: bool) -> None:
    """What DDP's reducer does to a gradient before its SUM all-reduce (``TouchedRowsHook``'s docstring)."""
    if in_place:
        g.div_(world)
    else:
        g.mul_(1.0 / world)


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
    with a symmetric step per row (``row_steps``: each rank's own, 2 bytes a row). Without INT8 every rank holds
    DDP's average: bit for bit where at most two ranks sent a value (so everywhere at W <= 2), elsewhere within the
    rounding of another order of addition (below); with INT8 each rank's row is within half its step, so within
    max|row| / 254 of the FP32 row, however small the row is next to the rest of its table.

    Each gradient is scaled as DDP's own reducer scales it before its SUM all-reduce (``Reducer::
    mark_variable_ready_dense``; with a comm hook DDP only copies): multiplied by ``1.0 / W`` if autograd wrote it to
    a tensor of its own (copied into the bucket), divided by W if autograd accumulated it in place in the bucket
    (``gradient_as_bucket_view``, which TorchRec sets, with an optimizer that zeroes gradients in place: from the
    second step on). The two round differently unless W is a power of two. Where autograd left each gradient is
    recorded by a post-accumulate-grad hook (it runs before DDP's), registered here on the touched-rows kernels and,
    for any other parameter, at its bucket's first exchange: call this before training, as ``compress_gradients``
    says, or a parameter's first exchange counts its gradient as copied.

    The touched rows come from the ids each table-batched kernel saw in its training forward (recorded by a forward
    hook), so the exchange costs O(touched rows), not O(table); the gradient is updated in place. Without a recorded
    forward it falls back to scanning the gradient for non-zero rows. Each rank sends its touched rows scaled, and
    every rank adds the W ranks' rows in rank order. DDP's all-reduce adds them in its backend's order, which is not
    rank order and varies along the bucket (gloo's ring starts the sum of each W-th chunk of the bucket at another
    rank; NCCL has rings and trees of its own). Adding two floats is commutative and adding zero exact, so a value
    that at most two ranks sent non-zero is DDP's bit for bit (so is every value at W <= 2); where three or more
    did, the two orders each round W - 1 partial sums, each by at most 2^-24 of itself and none larger than the sum
    of the ranks' |scaled value|, so they differ by at most (W - 1) 2^-23 of that sum. Measured at W = 3 on gloo:
    at most one ulp of that sum, in about a fifth of the values three ranks sent
    (``tests/sharding/test_touched_rows.py``). Bit for bit there would mean summing in the backend's order, which
    depends on its algorithm, its version and the bucket's layout.

    A small kernel (``dp_whole_max_rows``), or one whose tables differ in width, is all-reduced whole after the same
    scaling: bit for bit DDP's when its bucket holds only such kernels (one all-reduce of the bucket, as DDP's);
    one sharing a bucket with a touched-rows kernel is all-reduced alone, which at W >= 3 can add in another order,
    as above."""

    def __init__(self, layouts_by_param: dict[int, Any], int8: bool, counter: ByteCounter | None) -> None:
        self.layouts, self.int8, self.counter = layouts_by_param, int8, counter
        self.touched: dict[int, list[torch.Tensor]] = collections.defaultdict(list)
        self.scans = 0  # exchanges that had to scan the whole gradient (no recorded forward)
        self.handles = [lay.tbe.register_forward_hook(functools.partial(self._record, key), with_kwargs=True)
                        for key, lay in layouts_by_param.items() if len(set(lay.local_dims)) == 1]
        self._grad_storage: dict[int, int] = {}  # id(param) -> storage of its gradient, after its last accumulation
        self._watched: set[int] = set()
        for lay in layouts_by_param.values():
            weights = getattr(lay.tbe, "weights", None)
            if isinstance(weights, torch.Tensor):
                self._watch(weights)

    def _watch(self, param: torch.Tensor) -> None:
        if id(param) not in self._watched and param.requires_grad:
            self._watched.add(id(param))
            self.handles.append(param.register_post_accumulate_grad_hook(self._accumulated))

    def _accumulated(self, param: torch.Tensor) -> None:
        self._grad_storage[id(param)] = param.grad.untyped_storage().data_ptr()

    def _record(self, key: int, module, args, kwargs, output) -> None:
        if not (module.training and torch.is_grad_enabled()):  # (checked outside no_grad, or it is always off)
            return
        with torch.no_grad():
            self._record_rows(key, kwargs)

    def _record_rows(self, key: int, kwargs: dict) -> None:
        self.touched[key].append(self.layouts[key].row_ids(kwargs["indices"].long(), kwargs["offsets"].long()))

    def __call__(self, group, bucket):  # group: the DDP's process group (None: the default one)
        buf, world = bucket.buffer(), dist.get_world_size(group)
        home = buf.untyped_storage().data_ptr()
        whole = []
        for p, g in zip(bucket.parameters(), bucket.gradients()):
            # DDP's test, grad.is_alias_of(bucket view); a gradient not computed this step is zero either way
            in_place = self._grad_storage.pop(id(p), None) == home
            self._watch(p)
            lay = self.layouts.get(id(p))
            if lay is None or len(set(lay.local_dims)) != 1:
                # Small (dp_whole_max_rows), or not a table we understand: the plain average, as DDP takes it.
                _scale_as_ddp(g, world, in_place)
                whole.append(g)
            else:
                self._exchange(g, lay, self.touched.pop(id(p), None), group, in_place=in_place)
        if len(whole) == len(bucket.gradients()):  # DDP's one all-reduce of the bucket, so its order of addition
            whole = [buf]
        for g in whole:
            if self.counter is not None:
                self.counter.all_reduce("all_reduce fp32 (DP tables, whole)", nbytes(g), world)
            dist.all_reduce(g, group=group)
        return _done(buf)

    def _exchange(self, g: torch.Tensor, lay, recorded: list[torch.Tensor] | None, group, *,
                  in_place: bool = False) -> None:
        """Replace ``g`` by the ranks' average of their touched rows; ``in_place``: autograd accumulated ``g`` in
        DDP's bucket, which DDP divides by W rather than multiplying by 1 / W (see the class docstring)."""
        world, d, dev = dist.get_world_size(group), lay.local_dims[0], g.device
        rows = g.view(-1, d)
        if recorded:
            idx = torch.unique(torch.cat(recorded))  # sorted
        else:
            self.scans += 1
            idx = (rows != 0).any(dim=1).nonzero().squeeze(1)
        vals = rows[idx].div(world) if in_place else rows[idx].mul(1.0 / world)  # as DDP scales, before the sum
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
            rows.index_add_(0, i, v)  # in rank order (DDP's backend has an order of its own, see the class)

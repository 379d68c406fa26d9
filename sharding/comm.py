"""Gradient-communication compression for a sharded DLRM, and a counter of the bytes each rank hands to collectives.

* model-parallel all-to-alls: TorchRec's qcomms (``QCommsConfig``), FP16 or INT8, chosen by ``CommConfig.qcomms``;
* data-parallel embedding tables: a DDP comm hook that exchanges only the rows a batch touched (ids + values),
  optionally INT8 with one symmetric scale per table agreed across ranks (``dp_tables``);
* MLP gradients: TorchRec/torch's stock FP16 hook, or an INT8 hook with one scale per output row (agreed across
  ranks) and error feedback (``dense``).

No library exchanges sparse touched rows or INT8 with error feedback inside TorchRec's data parallelism, so those
hooks are written here. The DDP objects they attach to are private attributes of DMP and of the sharded EBC; this
module is the only one that reaches them (besides ``quant.tbe`` for the kernels).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

QCOMMS = ("none", "fp16", "int8")
DP_TABLES = ("dense", "touched", "touched_int8")
DENSE = ("fp32", "fp16", "int8_ef")


@dataclasses.dataclass(kw_only=True)
class CommConfig:
    """How gradients and embeddings travel between ranks."""

    qcomms: str = "none"
    """Precision of TorchRec's model-parallel all-to-alls: none (FP32), fp16 or int8."""
    dp_tables: str = "dense"
    """Data-parallel tables' gradients: dense (DDP all-reduce), touched (only touched rows, lossless),
    touched_int8 (touched rows, INT8 with a per-table scale agreed across ranks)."""
    dense: str = "fp32"
    """MLP gradients: fp32 (DDP all-reduce), fp16 (stock hook), int8_ef (per-row INT8 with error feedback)."""
    count_bytes: bool = True
    """Count the bytes each rank hands to collectives (reported per training step in the summary)."""

    def __post_init__(self) -> None:
        for name, allowed in (("qcomms", QCOMMS), ("dp_tables", DP_TABLES), ("dense", DENSE)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"comm.{name} must be one of {allowed}, got {getattr(self, name)!r}")


# ---- counting -------------------------------------------------------------------------------------------------
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


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _counting(fn: Callable, name: str, counter: ByteCounter) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if name == "all_to_all_single":
            inp = kwargs.get("input", args[1] if len(args) > 1 else None)
            splits = kwargs.get("input_split_sizes", args[3] if len(args) > 3 else None)
            group = kwargs.get("group")
            rank, world = dist.get_rank(group), dist.get_world_size(group)
            total = _nbytes(inp)
            if splits:
                row = total // max(inp.shape[0], 1)
                own = splits[rank] * row
            else:
                own = total // world
            counter.add("all_to_all (model-parallel)", total - own)
        else:
            inp = kwargs.get("input", args[1] if len(args) > 1 else None)
            counter.add(name, _nbytes(inp))
        return fn(*args, **kwargs)
    return wrapper


# ---- qcomms ---------------------------------------------------------------------------------------------------
def sharders_for(cfg: CommConfig, device: torch.device) -> list:
    """TorchRec sharders carrying the qcomms codecs (the planner and DMP must get the same list)."""
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.fbgemm_qcomm_codec import CommType, QCommsConfig, get_qcomm_codecs_registry
    from torchrec.distributed.sharding_plan import get_default_sharders

    if cfg.qcomms == "none":
        return get_default_sharders()
    precision = {"fp16": CommType.FP16, "int8": CommType.INT8}[cfg.qcomms]
    registry = get_qcomm_codecs_registry(QCommsConfig(forward_precision=precision, backward_precision=precision),
                                         device=device)
    return [EmbeddingBagCollectionSharder(qcomm_codecs_registry=registry)]


def check_qcomms(cfg: CommConfig, plan_rows: list[dict]) -> None:
    """Refuse the combinations TorchRec cannot run, before any collective hangs on them."""
    if cfg.qcomms == "int8" and any(r["sharding"] in ("row_wise", "table_row_wise") for r in plan_rows):
        raise NotImplementedError("comm.qcomms=int8 is unsupported with row-wise tables (TorchRec's INT8 codec "
                                  "fails on the row-wise reduce-scatter); use qcomms=fp16 or table-wise placement")


# ---- DDP hooks ------------------------------------------------------------------------------------------------
def _done(t: torch.Tensor) -> torch.futures.Future:
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(t)
    return fut


def fp32_allreduce_hook(counter: ByteCounter | None, kind: str):
    """DDP's own averaging all-reduce (asynchronous, as DDP's built-in one), counted."""
    def hook(state, bucket):  # DDP checks the annotations: leave them off
        buf = bucket.buffer()
        if counter is not None:
            counter.add(kind, _nbytes(buf))
        buf.div_(dist.get_world_size())
        return dist.all_reduce(buf, async_op=True).get_future().then(lambda fut: fut.value()[0])
    return hook


def fp16_hook(counter: ByteCounter | None):
    def hook(state, bucket):  # DDP checks the annotations: leave them off
        if counter is not None:
            counter.add("all_reduce fp16 (MLP)", bucket.buffer().numel() * 2)
        return default_hooks.fp16_compress_hook(None, bucket)
    return hook


class Int8ErrorFeedbackHook:
    """INT8 MLP gradients: per output row (per tensor for biases) symmetric scales agreed by an all-reduce MAX,
    codes all-gathered and summed, and the quantization error carried into the next step."""


    def __init__(self, counter: ByteCounter | None) -> None:
        self.counter = counter
        self.errors: dict[int, torch.Tensor] = {}

    def __call__(self, state, bucket):
        world = dist.get_world_size()
        grads, params = bucket.gradients(), bucket.parameters()
        values, scales = [], []
        for p, g in zip(params, grads):
            v = g + self.errors.get(id(p), 0)  # keyed by parameter: DDP re-buckets after the first step
            rows = v.reshape(v.shape[0], -1) if v.dim() > 1 else v.reshape(1, -1)
            values.append(rows)
            scales.append(rows.abs().amax(dim=1))
        scale = torch.cat(scales)
        dist.all_reduce(scale, op=dist.ReduceOp.MAX)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale) / 127
        codes, offset = [], 0
        for i, rows in enumerate(values):
            s = scale[offset:offset + rows.shape[0]].unsqueeze(1)
            offset += rows.shape[0]
            q = torch.round(rows / s).clamp_(-127, 127)
            self.errors[id(params[i])] = (rows - q * s).reshape(grads[i].shape)
            codes.append(q.to(torch.int8).flatten())
        flat = torch.cat(codes)
        gathered = [torch.empty_like(flat) for _ in range(world)]
        if self.counter is not None:
            self.counter.add("all_gather int8 (MLP)", _nbytes(flat))
            self.counter.add("all_reduce scales (MLP)", _nbytes(scale))
        dist.all_gather(gathered, flat)
        total = torch.stack(gathered).to(torch.int32).sum(0).to(torch.float32)
        out, pos, offset = bucket.buffer(), 0, 0
        for g, rows in zip(grads, values):
            n = rows.numel()
            s = scale[offset:offset + rows.shape[0]].unsqueeze(1)
            offset += rows.shape[0]
            g.copy_((total[pos:pos + n].view_as(rows) * s / world).reshape(g.shape))
            pos += n
        return _done(out)


class TouchedRowsHook:
    """Data-parallel tables: exchange only the rows with a non-zero gradient (ids + values), optionally as INT8
    with one scale per table agreed by an all-reduce MAX; the result is the same average the dense all-reduce
    gives (exactly, without INT8)."""


    def __init__(self, layouts_by_param: dict[int, Any], int8: bool, counter: ByteCounter | None) -> None:
        self.layouts, self.int8, self.counter = layouts_by_param, int8, counter

    def __call__(self, state, bucket):
        for p, g in zip(bucket.parameters(), bucket.gradients()):
            lay = self.layouts.get(id(p))
            if lay is None or len(set(lay.local_dims)) != 1:
                buf = g.clone()  # not a table we understand: plain average
                if self.counter is not None:
                    self.counter.add("all_reduce (DP tables, dense)", _nbytes(buf))
                dist.all_reduce(buf)
                g.copy_(buf / dist.get_world_size())
                continue
            g.copy_(self._exchange(g, lay))
        return _done(bucket.buffer())

    def _exchange(self, g: torch.Tensor, lay) -> torch.Tensor:
        world, d = dist.get_world_size(), lay.local_dims[0]
        rows = g.view(-1, d)
        idx = (rows != 0).any(dim=1).nonzero().squeeze(1)
        vals = rows[idx]
        count = torch.tensor([idx.numel()], dtype=torch.int64)
        counts = [torch.empty_like(count) for _ in range(world)]
        dist.all_gather(counts, count)
        most = int(max(c.item() for c in counts))
        id_dtype = torch.int32 if rows.shape[0] < 2**31 else torch.int64
        ids = torch.zeros(most, dtype=id_dtype)
        ids[: idx.numel()] = idx.to(id_dtype)
        starts = lay.weights_offsets().to("cpu", torch.long) // d  # first row of each table in the flat buffer
        if self.int8:
            table = torch.searchsorted(starts, idx, right=True) - 1
            scale = torch.zeros(starts.numel())
            scale.scatter_reduce_(0, table, vals.abs().amax(dim=1), reduce="amax")
            dist.all_reduce(scale, op=dist.ReduceOp.MAX)
            scale = torch.where(scale == 0, torch.ones_like(scale), scale) / 127
            payload = torch.zeros(most, d, dtype=torch.int8)
            payload[: idx.numel()] = torch.round(vals / scale[table].unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
            if self.counter is not None:
                self.counter.add("all_reduce scales (DP tables)", _nbytes(scale))
        else:
            payload = torch.zeros(most, d, dtype=g.dtype)
            payload[: idx.numel()] = vals
        if self.counter is not None:
            self.counter.add("all_gather ids (DP tables)", idx.numel() * ids.element_size())
            self.counter.add("all_gather rows (DP tables)", idx.numel() * d * payload.element_size())
        all_ids = [torch.empty_like(ids) for _ in range(world)]
        all_vals = [torch.empty_like(payload) for _ in range(world)]
        dist.all_gather(all_ids, ids)
        dist.all_gather(all_vals, payload)
        out = torch.zeros_like(rows)
        for c, i, v in zip(counts, all_ids, all_vals):
            n = int(c.item())
            i = i[:n].long()
            v = v[:n].to(g.dtype)
            if self.int8:
                v = v * scale[torch.searchsorted(starts, i, right=True) - 1].unsqueeze(1)
            out.index_add_(0, i, v)
        return (out / world).view_as(g)


def _dense_ddp(model: nn.Module) -> DistributedDataParallel | None:
    wrapped = getattr(model, "_dmp_wrapped_module", None)
    return wrapped if isinstance(wrapped, DistributedDataParallel) else None


def _dp_table_ddps(model: nn.Module) -> list[DistributedDataParallel]:
    out = []
    for module in model.modules():
        lookups = getattr(module, "_lookups", None)
        if isinstance(lookups, list):
            out += [lk for lk in lookups if isinstance(lk, DistributedDataParallel)]
    return out


def compress_gradients(model: nn.Module, cfg: CommConfig, counter: ByteCounter | None = None) -> None:
    """Register the DDP comm hooks ``cfg`` asks for on a DMP model (call once, before training)."""
    from quant.tbe import find_tbes

    dense = _dense_ddp(model)
    if dense is not None:
        if cfg.dense == "fp16":
            dense.register_comm_hook(None, fp16_hook(counter))
        elif cfg.dense == "int8_ef":
            dense.register_comm_hook(None, Int8ErrorFeedbackHook(counter).__call__)
        elif counter is not None:
            dense.register_comm_hook(None, fp32_allreduce_hook(counter, "all_reduce fp32 (MLP)"))
    layouts = {}
    for lay in find_tbes(model):
        weights = getattr(lay.tbe, "weights", None)
        if isinstance(weights, torch.Tensor):
            layouts[id(weights)] = lay
    for ddp in _dp_table_ddps(model):
        if cfg.dp_tables == "dense":
            if counter is not None:
                ddp.register_comm_hook(None, fp32_allreduce_hook(counter, "all_reduce fp32 (DP tables)"))
        else:
            ddp.register_comm_hook(None, TouchedRowsHook(layouts, cfg.dp_tables == "touched_int8", counter).__call__)

"""Gradient-communication compression for a sharded DLRM, and a counter of the bytes each rank hands to collectives.

* model-parallel all-to-alls: TorchRec's qcomms (``QCommsConfig``), FP16 or INT8, chosen by ``CommConfig.qcomms``
  for the gradients (backward) and ``CommConfig.qcomms_forward`` for the pooled embeddings (forward, off by default:
  a compressed forward also compresses evaluation, so the served model would no longer be the evaluated one);
* data-parallel embedding tables: a DDP comm hook that exchanges only the rows a batch touched (ids + values),
  optionally INT8 with each rank's own symmetric step per row, sent as bfloat16 (``dp_tables``);
* MLP gradients: TorchRec/torch's stock FP16 hook, or an INT8 hook with one scale per output row (each rank's own,
  sent with its codes) and error feedback (``dense``).

No library exchanges sparse touched rows or INT8 with error feedback inside TorchRec's data parallelism, so those
hooks are written here. The DDP objects they attach to are private attributes of DMP and of the sharded EBC; this
module is the only one that reaches them (besides ``sharding.tbe`` for the kernels).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import distributed_c10d
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from sharding import int8_codec
from sharding.tbe import find_tbes

QCOMMS = ("none", "fp16", "int8")
DP_TABLES = ("dense", "touched", "touched_int8")
DENSE = ("fp32", "fp16", "int8_ef")


@dataclasses.dataclass(kw_only=True)
class CommConfig:
    """How gradients and embeddings travel between ranks."""

    qcomms: str = "none"
    """Precision of TorchRec's model-parallel all-to-alls of embedding gradients (backward): none (FP32), fp16, int8."""
    qcomms_forward: str = "none"
    """Precision of the forward all-to-alls (pooled embeddings): none (FP32), fp16 or int8. Anything but none also
    quantizes what evaluation sees, which the exported model does not reproduce."""
    dp_tables: str = "dense"
    """Data-parallel tables' gradients: dense (DDP all-reduce), touched (only touched rows, lossless),
    touched_int8 (touched rows, INT8 with each rank's own step per row: every touched row moves, a rare row with a
    small gradient as much as a frequent one with a large gradient, each within half its own step)."""
    dp_whole_max_rows: int = 1024
    """With touched-row exchange: a data-parallel kernel holding at most this many rows (all its tables together) is
    all-reduced whole instead (0: every kernel exchanges touched rows). A batch touches most rows of such small
    tables, so their touched rows are about as many bytes as the whole gradient, and the exchange's two collectives
    cost more than one small all-reduce (the Kaggle plan's 7 data-parallel tables, 101 rows: about 10% of a step)."""
    dense: str = "fp32"
    """MLP gradients: fp32 (DDP all-reduce), fp16 (stock hook), int8_ef (per-row INT8 with error feedback)."""
    count_bytes: bool = True
    """Count the bytes each rank hands to collectives (reported per training step in the summary)."""

    def __post_init__(self) -> None:
        for name, allowed in (("qcomms", QCOMMS), ("qcomms_forward", QCOMMS), ("dp_tables", DP_TABLES),
                              ("dense", DENSE)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"comm.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.dp_whole_max_rows < 0:
            raise ValueError(f"comm.dp_whole_max_rows must be at least 0, got {self.dp_whole_max_rows}")


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

    if cfg.qcomms == "none" and cfg.qcomms_forward == "none":
        return get_default_sharders()
    precision = {"none": CommType.FP32, "fp16": CommType.FP16, "int8": CommType.INT8}
    registry = get_qcomm_codecs_registry(QCommsConfig(forward_precision=precision[cfg.qcomms_forward],
                                                      backward_precision=precision[cfg.qcomms]), device=device)
    return [EmbeddingBagCollectionSharder(qcomm_codecs_registry=registry)]


def check_qcomms(cfg: CommConfig, plan_rows: list[dict]) -> None:
    """Refuse the combinations TorchRec cannot run, before any collective hangs on them."""
    if "int8" in (cfg.qcomms, cfg.qcomms_forward) and any(r["sharding"] in ("row_wise", "table_row_wise")
                                                          for r in plan_rows):
        raise NotImplementedError("comm.qcomms(_forward)=int8 is unsupported with row-wise tables (TorchRec's INT8 "
                                  "codec fails on the row-wise reduce-scatter); use fp16 or table-wise placement")


# ---- DDP hooks ------------------------------------------------------------------------------------------------
def _done(t: torch.Tensor) -> torch.futures.Future:
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(t)
    return fut


def fp32_allreduce_hook(counter: ByteCounter | None, kind: str):
    """DDP's own averaging all-reduce (asynchronous, as DDP's built-in one), counted."""
    def hook(group, bucket):  # DDP checks the annotations: leave them off
        buf = bucket.buffer()
        if counter is not None:
            counter.add(kind, _nbytes(buf))
        buf.div_(dist.get_world_size(group))
        return dist.all_reduce(buf, group=group, async_op=True).get_future().then(lambda fut: fut.value()[0])
    return hook


def fp16_hook(counter: ByteCounter | None):
    def hook(group, bucket):  # DDP checks the annotations: leave them off
        if counter is not None:
            counter.add("all_reduce fp16 (MLP)", bucket.buffer().numel() * 2)
        return default_hooks.fp16_compress_hook(group, bucket)
    return hook


# torch.distributed's own function object, not the ByteCounter's wrapper: hooks count their bytes themselves.
_all_gather_single = getattr(distributed_c10d, "all_gather_single", None) or distributed_c10d.all_gather_into_tensor


class Int8ErrorFeedbackHook:
    """INT8 MLP gradients: each rank quantizes with its own symmetric scale per output row (per tensor for biases),
    carries its quantization error into the next step (error feedback), and sends codes and scales in one
    asynchronous all-gather; every rank then averages the dequantized gradients. One collective per bucket, and DDP
    overlaps it with the rest of the backward.

    Per bucket, the error and the work buffers are allocated once (fresh megabyte-sized buffers every step cost
    more in page faults than the arithmetic), elementwise passes run over the whole bucket, and only what needs
    the row structure (row maxima, scaling by a row's step) runs per parameter, on broadcast views. On CPU the
    same arithmetic runs as compiled loops (``sharding.int8_codec``): two passes to encode, one to decode."""

    def __init__(self, counter: ByteCounter | None, params: dict[str, torch.Tensor] | None = None) -> None:
        self.counter = counter
        self.errors: dict[int, torch.Tensor] = {}  # per parameter: views of its bucket's error buffer
        self._buckets: dict[tuple[int, ...], _Int8Bucket] = {}
        self.params = dict(params or {})  # name -> parameter, to checkpoint the errors by name

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's carried quantization errors, flat per parameter (zeros before the first step), under keys
        that name the rank: each rank's errors are its own, so a checkpoint holds every rank's."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        return {f"rank{rank}.{name}": self.errors.get(id(p), torch.zeros(p.numel(), device=p.device))
                for name, p in self.params.items() if p.requires_grad}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Carry the saved errors on: into the buckets' buffers, or (before the first step) to where the buckets
        will pick them up when they are made."""
        prefix = f"rank{dist.get_rank() if dist.is_initialized() else 0}."
        for key, value in state.items():
            p = self.params[key[len(prefix):]]
            if id(p) in self.errors:
                self.errors[id(p)].copy_(value.reshape(-1))
            else:
                self.errors[id(p)] = value.reshape(-1).clone()

    def _bucket(self, params: list[torch.Tensor], n: int, world: int, dev: torch.device) -> "_Int8Bucket":
        key = tuple(id(p) for p in params)
        b = self._buckets.get(key)
        if b is None:  # DDP re-buckets after its first step: carry each parameter's error into the new layout
            b = _Int8Bucket(params, n, world, dev)
            for i, o, k, _, _ in b.segments:
                old = self.errors.get(id(params[i]))
                if old is not None:
                    b.err[o:o + k] = old
                self.errors[id(params[i])] = b.err[o:o + k]
            superseded = [old for old in self._buckets if set(old) & set(key)]
            for old in superseded:
                del self._buckets[old]
            self._buckets[key] = b
        return b

    def __call__(self, group, bucket):  # group: the DDP's process group (None: the default one)
        out = bucket.buffer()
        world = dist.get_world_size(group)
        b = self._bucket(bucket.parameters(), out.numel(), world, out.device)
        compiled = out.device.type == "cpu" and out.dtype == torch.float32
        (self._encode_cpu if compiled else self._encode)(b, out)
        if self.counter is not None:
            self.counter.add("all_gather int8 (MLP)", out.numel())
            self.counter.add("all_gather scales (MLP)", 4 * b.rows)
        work = _all_gather_single(b.gathered.view(-1), b.payload, group=group, async_op=True)

        def finish(fut):
            if compiled:
                self._decode_cpu(b, out)
            else:
                self._decode(b, out, world)
            return out
        return work.get_future().then(finish)

    @staticmethod
    def _encode_cpu(b: "_Int8Bucket", out: torch.Tensor) -> None:
        """``_encode`` in two compiled passes per row (``sharding.int8_codec``), the same bits."""
        payload = b.payload.numpy()
        ok = int8_codec.encode(out.numpy(), b.err.numpy(), b.segment_array,
                               payload[: 4 * b.rows].view(np.float32), payload[4 * b.rows:].view(np.int8),
                               np.float32(torch.finfo(torch.float32).tiny))
        if not ok:
            raise FloatingPointError("an MLP gradient holds NaN or Inf, which INT8 compression cannot scale (the "
                                     "loss was finite: look for an exploding gradient, e.g. lower the learning rate)")

    @staticmethod
    def _decode_cpu(b: "_Int8Bucket", out: torch.Tensor) -> None:
        """``_decode`` in one compiled pass (``sharding.int8_codec``), the same bits."""
        gathered = b.gathered.numpy()
        steps = np.ascontiguousarray(gathered[:, : 4 * b.rows]).view(np.float32)  # aligned copy of the steps
        int8_codec.decode(gathered[:, 4 * b.rows:].view(np.int8), steps, b.segment_array, out.numpy())

    @staticmethod
    def _encode(b: "_Int8Bucket", out: torch.Tensor) -> None:
        """Codes and steps into ``b.payload`` (``[steps as bytes][codes]``), the new error into ``b.err``."""
        rows = b.rows
        x, q = b.scratch()
        torch.add(out, b.err, out=x)  # gradient + carried error (in fp32 whatever the gradients' dtype)
        views = b.views(x)
        maxima = [a.amax(dim=1) for a in b.views(torch.abs(x, out=q))]  # q: scratch for |x|
        step = int8_step(torch.cat(maxima) if maxima else x.new_zeros(0))
        b.payload[: 4 * rows] = step.view(torch.uint8)
        for (_, o, k, f, r), v in zip(b.segments, views):
            torch.div(v, step[f:f + r].unsqueeze(1), out=q[o:o + k].view(r, -1))
        q.round_()  # within [-127, 127] by int8_step's construction
        b.payload[4 * rows:].view(torch.int8).copy_(q)
        for (_, o, k, f, r), v in zip(b.segments, views):  # error = x - code * step
            torch.addcmul(v, q[o:o + k].view(r, -1), step[f:f + r].unsqueeze(1), value=-1,
                          out=b.err[o:o + k].view(r, -1))

    @staticmethod
    def _decode(b: "_Int8Bucket", out: torch.Tensor, world: int) -> None:
        """``out`` = the mean over ranks of code * step, from the gathered payloads."""
        rows = b.rows
        steps = b.gathered[:, : 4 * rows].reshape(-1).clone().view(torch.float32).view(world, -1).div_(world)
        codes = b.gathered[:, 4 * rows:].view(torch.int8)
        mean = out if out.dtype == torch.float32 else b.scratch()[0]  # summed in fp32, rounded once
        for _, o, k, f, r in b.segments:  # mean over ranks of code * step
            dst = mean[o:o + k].view(r, -1)
            torch.mul(codes[0, o:o + k].view(r, -1), steps[0, f:f + r].unsqueeze(1), out=dst)
            for w in range(1, world):
                dst.addcmul_(codes[w, o:o + k].view(r, -1), steps[w, f:f + r].unsqueeze(1))
        if mean is not out:
            out.copy_(mean)


class _Int8Bucket:
    """One DDP bucket's layout and buffers. Per parameter with elements: (its index in the bucket, offset, size,
    first row, rows); a bias (or any 0/1-dim parameter) is one row, a higher-dim one is rows of its trailing dims."""

    def __init__(self, params: list[torch.Tensor], n: int, world: int, dev: torch.device) -> None:
        self.segments, offset, first = [], 0, 0
        for i, p in enumerate(params):
            if p.numel():
                r = p.shape[0] if p.dim() > 1 else 1
                self.segments.append((i, offset, p.numel(), first, r))
                first += r
            offset += p.numel()
        self.rows = first
        self.segment_array = np.array([s[1:] for s in self.segments], dtype=np.int64).reshape(-1, 4)
        self.err = torch.zeros(n, device=dev)
        self._scratch: tuple[torch.Tensor, torch.Tensor] | None = None  # the torch codec's; the compiled one needs none
        self.payload = torch.empty(4 * first + n, dtype=torch.uint8, device=dev)
        self.gathered = torch.empty(world, 4 * first + n, dtype=torch.uint8, device=dev)

    def scratch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The torch codec's two work buffers of the bucket's size (x and its codes), made on first use."""
        if self._scratch is None:
            self._scratch = (torch.empty_like(self.err), torch.empty_like(self.err))
        return self._scratch

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[o:o + k].view(r, -1) for _, o, k, _, r in self.segments]


def int8_step(maxabs: torch.Tensor) -> torch.Tensor:
    """Symmetric INT8 step ``maxabs / 127``, at least the smallest normal float: an all-zero row, or a subnormal max
    that underflows or loses precision, would otherwise make ``x / step`` inf, NaN or over 127. With it,
    ``round(x / step)`` is always within [-127, 127] for ``|x| <= maxabs``, with no clamp needed."""
    return (maxabs / 127).clamp_min_(torch.finfo(maxabs.dtype).tiny)


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
                    self.counter.add("all_reduce fp32 (DP tables, whole)", _nbytes(g))
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
        if self.counter is not None:  # what is handed to the collectives, padding to the largest rank included
            self.counter.add("all_gather counts (DP tables)", _nbytes(header))
            self.counter.add("all_gather ids (DP tables)", id_bytes)
            if self.int8:
                self.counter.add("all_gather row steps (DP tables)", step_bytes)
            self.counter.add("all_gather rows (DP tables)", row_bytes)
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


def compress_gradients(model: nn.Module, cfg: CommConfig, counter: ByteCounter | None = None) -> list:
    """Register the DDP comm hooks ``cfg`` asks for on a DMP model (call once, before training); returns the
    hooks that keep state: the INT8 error-feedback hook (checkpointed with the model) and the touched-rows hooks."""
    hooks: list[Int8ErrorFeedbackHook | TouchedRowsHook] = []
    dense = _dense_ddp(model)
    if dense is not None:
        if cfg.dense == "fp16":
            dense.register_comm_hook(dense.process_group, fp16_hook(counter))
        elif cfg.dense == "int8_ef":
            int8 = Int8ErrorFeedbackHook(counter, dict(dense.module.named_parameters()))
            dense.register_comm_hook(dense.process_group, int8.__call__)
            hooks.append(int8)
        elif counter is not None:
            dense.register_comm_hook(dense.process_group, fp32_allreduce_hook(counter, "all_reduce fp32 (MLP)"))
    layouts = {}
    for lay in find_tbes(model):
        weights = getattr(lay.tbe, "weights", None)
        if isinstance(weights, torch.Tensor):
            layouts[id(weights)] = lay
    for ddp in _dp_table_ddps(model):
        if cfg.dp_tables == "dense":
            if counter is not None:
                ddp.register_comm_hook(ddp.process_group, fp32_allreduce_hook(counter, "all_reduce fp32 (DP tables)"))
        else:
            own = {id(p): layouts[id(p)] for p in ddp.module.parameters() if id(p) in layouts}
            own = {k: lay for k, lay in own.items() if sum(lay.local_rows) > cfg.dp_whole_max_rows}
            hook = TouchedRowsHook(own, cfg.dp_tables == "touched_int8", counter)
            ddp.register_comm_hook(ddp.process_group, hook.__call__)
            hooks.append(hook)
    return hooks

"""DDP gradient exchange, counted: DDP's own averaging all-reduce (counted beside it, ``Fp32AllReduceCount``), and
comm hooks that reduce a whole gradient bucket: the stock FP16 hook (counted), and INT8 with error feedback
(``Int8ErrorFeedbackHook``: one scale per output row, each rank's own, sent with its codes; the quantization error is
carried into the next step).

No library has INT8 with error feedback inside TorchRec's data parallelism, so that hook is written here; on CPU its
arithmetic runs as compiled loops (``sharding.int8_codec``).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from dqrm.sharding import int8_codec
from dqrm.sharding.byte_counter import ByteCounter, nbytes

log = logging.getLogger(__name__)


class Fp32AllReduceCount:
    """Counts DDP's own averaging all-reduce without taking it over: DDP keeps its C++ reduction (a comm hook would
    move every bucket through Python and change how DDP scales gradients by 1/W, which it does in two ways that
    round differently unless W is a power of two; such a hook made the default job's step at world size 2 1.040x
    [1.035, 1.054] TorchRec's bare loop against 1.003x without it: ``bench/results/train_throughput.txt`` of code
    commit b21f3d5). DDP all-reduces every bucket once per backward that syncs, and its buckets hold exactly the
    gradients of the parameters it manages, so each such backward adds the ring all-reduce of their bytes. The
    backward is seen by a post-accumulate-grad hook on one parameter (without ``find_unused_parameters``, as TorchRec
    wraps the dense part, every managed parameter gets a gradient in every backward); a backward under ``no_sync``
    (no all-reduce) is not counted."""

    def __init__(self, counter: ByteCounter, kind: str, ddp: torch.nn.parallel.DistributedDataParallel) -> None:
        self.counter, self.kind, self.ddp = counter, kind, ddp
        # DDP's own list (``DistributedDataParallel._module_parameters``) is private: the same filter, by its public
        # ``parameters_to_ignore`` (TorchRec's sharded tables are in it: their optimizer is fused, nothing reduced)
        params = [p for n, p in ddp.module.named_parameters()
                  if p.requires_grad and n not in ddp.parameters_to_ignore]
        self.nbytes = sum(nbytes(p) for p in params)
        self.world = dist.get_world_size(ddp.process_group)
        self.handles = [params[0].register_post_accumulate_grad_hook(self._backward)] if params else []

    def _backward(self, param: torch.Tensor) -> None:
        if self.ddp.require_backward_grad_sync:
            self.counter.all_reduce(self.kind, self.nbytes, self.world)


def fp16_hook(counter: ByteCounter | None):
    def hook(group, bucket):  # DDP checks the annotations: leave them off
        if counter is not None:
            counter.all_reduce("all_reduce fp16 (MLP)", bucket.buffer().numel() * 2, dist.get_world_size(group))
        return default_hooks.fp16_compress_hook(group, bucket)
    return hook


# all_gather_single where torch has it (all_gather_into_tensor is deprecated).
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
        """Carry the saved errors on, from every saved rank's (``Checkpointer.load`` reads them all): at the world
        size that saved them each rank takes its own; at another every rank takes their mean. What the applied
        gradients still owe is the mean over ranks of the carried errors (the sums telescope, see the class
        docstrings; the reduce-scatter hook's W * e2 included), and a mean carried by every one of W' ranks owes
        exactly that at any W'. Into the buckets' buffers, or (before the first step) to where the buckets will pick
        them up when they are made."""
        if not state:
            return
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        saved: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            head, _, name = key.partition(".")
            saved.setdefault(int(head.removeprefix("rank")), {})[name] = value.reshape(-1)
        if sorted(saved) == list(range(world)):
            errors = saved[rank]
        else:
            names = set.intersection(*(set(errs) for errs in saved.values()))
            errors = {name: (sum(errs[name].double() for errs in saved.values()) / len(saved)).float()
                      for name in names}
            if rank == 0:
                log.info("INT8 error-feedback residuals saved by %d ranks carried over to %d as their mean",
                         len(saved), world)
        for name, value in errors.items():
            p = self.params[name]
            if id(p) in self.errors:
                self.errors[id(p)].copy_(value)
            else:
                self.errors[id(p)] = value.clone()

    def _bucket(self, params: list[torch.Tensor], n: int, world: int, dev: torch.device) -> "_Int8Bucket":
        key = tuple(id(p) for p in params)
        b = self._buckets.get(key)
        if b is None:  # DDP re-buckets after its first step: carry each parameter's error into the new layout
            b = self._new_bucket(params, n, world, dev)
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

    @staticmethod
    def _new_bucket(params: list[torch.Tensor], n: int, world: int, dev: torch.device) -> "_Int8Bucket":
        return _Int8Bucket(params, n, world, dev)

    def __call__(self, group, bucket):  # group: the DDP's process group (None: the default one)
        out = bucket.buffer()
        world = dist.get_world_size(group)
        b = self._bucket(bucket.parameters(), out.numel(), world, out.device)
        compiled = out.device.type == "cpu" and out.dtype == torch.float32
        (self._encode_cpu if compiled else self._encode)(b, out)
        if self.counter is not None:
            self.counter.all_gather("all_gather int8 (MLP)", out.numel(), world)
            self.counter.all_gather("all_gather scales (MLP)", 4 * b.rows, world)
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
        self.exchange_buffers(n, world, dev)

    def exchange_buffers(self, n: int, world: int, dev: torch.device) -> None:
        """What the all-gather sends (``[steps as bytes][codes]``) and receives (one such row per rank)."""
        self.payload = torch.empty(4 * self.rows + n, dtype=torch.uint8, device=dev)
        self.gathered = torch.empty(world, 4 * self.rows + n, dtype=torch.uint8, device=dev)

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

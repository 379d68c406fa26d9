"""MLP QAT: symmetric weight fake-quant with one scale per output row; activations float32, or bfloat16 when the
MLPs are trained for bfloat16 serving (``QuantSpec.mlp_compute``, ``use_bfloat16``).

torchao (not in the pinned stack) has a weight-only fake-quant Linear, ``FakeQuantizedLinear`` with
``IntxFakeQuantizeConfig(torch.int4, "per_channel", is_symmetric=True)``, but not this grid: its symmetric mapping
spreads ``max|w|`` over ``[-2^(b-1), 2^(b-1) - 1]`` (scale ``max|w| / 7.5`` at INT4), where the paper's grid and the
artifact's ``QuantizedLinear`` use ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (``max|w| / 7``). Measured with torchao 0.18
beside the stack: 83-89% of INT4 and 99% of INT8 fake-quantized weights differ from these, and one 512x415 layer took
7x the time of ``fake_quant_weight``; so it is not adopted. (torch.ao's dynamic linear also quantizes activations.)
The fake-quant layer and its integer counterpart ``QuantizedLinear`` are therefore written here.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dqrm.quant import qat_kernels

_TINY = np.float32(torch.finfo(torch.float32).tiny)


def row_scales(w: torch.Tensor, bits: int, keepdim: bool = False) -> torch.Tensor:
    """``max|row| / (2^(b-1) - 1)``, at least the smallest normal float (so that ``1 / scale`` is finite; an
    all-zero row gets codes 0 whatever its scale)."""
    # Multiply by the reciprocal: CUDA divides by a Python scalar that way, so CPU and GPU agree bit for bit.
    s = w.detach().abs().amax(dim=1, keepdim=keepdim).mul_(1.0 / (2 ** (bits - 1) - 1))
    return s.clamp_min_(torch.finfo(torch.float32).tiny)


def row_codes(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """``clamp(round(w * (1 / scale)))`` (round half to even), the arithmetic of the QAT forward; ``scale`` is
    ``(rows,)`` or ``(rows, 1)``."""
    inv = torch.reciprocal(scale)
    return torch.mul(w, inv if inv.dim() == 2 else inv.unsqueeze(1)).round_().clamp_(-(2 ** (bits - 1)),
                                                                                      2 ** (bits - 1) - 1)


class _StraightThrough(torch.autograd.Function):
    """Forward ``codes * scale``, backward the identity: one autograd node, a handful of in-place ops (torch's
    ``fake_quantize_per_channel_affine`` gives the same values but measured 8x slower on CPU at these sizes; at MLP
    sizes the cost is op dispatch, so the helpers work in place)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, bits: int) -> torch.Tensor:
        scale = row_scales(w, bits, keepdim=True)
        return row_codes(w, scale, bits).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _compiled_ok(w: torch.Tensor) -> bool:
    """Whether ``quant.qat_kernels`` can fake-quantize ``w`` (a contiguous float32 CPU matrix)."""
    return w.device.type == "cpu" and w.dtype == torch.float32 and w.dim() == 2 and w.is_contiguous()


def fake_quant_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes * scale`` of ``w`` with a straight-through gradient. A float32 CPU matrix takes one compiled call
    (``quant.qat_kernels``, the same bits as ``_StraightThrough``) written into ``w.clone()``: the clone's backward
    is the identity, one C++ autograd node where a Python ``Function`` costs more than the arithmetic at MLP sizes.
    (Nothing saved for the clone's backward reads the overwritten values.)"""
    if _compiled_ok(w):
        out = w.clone()
        half = 2 ** (bits - 1)
        qat_kernels.mlp_fake_quant(w.detach().numpy(), out.detach().numpy(), np.float32(1.0 / (half - 1)),
                                   np.float32(-half), np.float32(half - 1), _TINY)
        return out
    return _StraightThrough.apply(w, bits)


class RowwiseWeightFakeQuant(nn.Module):
    """``W -> codes * scale`` with a straight-through gradient (exact forward)."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.enabled = True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quant_weight(w, self.bits) if self.enabled else w


def linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], bf16: bool,
           float_output: bool) -> torch.Tensor:
    """The MLP layer of training, evaluation and the artifact alike. Float32: ``F.linear`` (a bfloat16 input from the
    layer before is widened, exactly). bfloat16: input, weight and bias rounded to bfloat16 and one bfloat16
    ``F.linear`` (oneDNN on CPU: fp32 accumulation, a bfloat16 result), widened to float32 if ``float_output``.
    Training differentiates the same op that serving runs, so the served logits are the evaluated ones bit for bit
    on the same machine (the kernel oneDNN picks depends on the CPU's ISA: check on the serving host,
    ``tests/quant/test_mlp_compute.py``).

    Why bfloat16 rather than INT8 activations (W4A8/W8A8): torch's dynamic quantized linear
    (``quantized::linear_dynamic``, FBGEMM/oneDNN) takes one activation scale per batch, so a sample's logit would
    depend on the rest of its batch, and neither it nor oneDNN's static ``qlinear_pointwise`` (an opaque prepacked
    weight) can be saved by ``torch.export``; torchao's CPU path is ``torch._int_mm`` plus float epilogues, several
    elementwise passes per layer unless compiled. bfloat16 ``F.linear`` is one torch op in training and serving,
    batch-invariant here and exportable."""
    if not bf16:
        return F.linear(x.float(), w, bias)
    b = None if bias is None else bias.to(torch.bfloat16)
    y = F.linear(x.to(torch.bfloat16), w.to(torch.bfloat16), b)
    return y.float() if float_output else y


class QuantizedLinear(nn.Module):
    """Integer weights (int8 storage of INT-b codes) and fp32 row scales, dequantized (``codes * scale``, the QAT
    forward's values; then rounded to bfloat16 for a bfloat16 layer) on first use and kept in memory, not in the
    state or the artifact; the artifact stores the codes. (Exported as a leaf of the FX trace, so that TorchScript
    keeps the cache.) ``bf16`` and ``float_output`` as in ``linear``, copied from the trained layer."""

    dequantized: Optional[torch.Tensor]

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, bits: int, *,
                 bf16: bool = False, float_output: bool = False) -> None:
        super().__init__()
        self.bits = bits
        self.bf16, self.float_output = bf16, float_output
        self.register_buffer("codes", codes.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(torch.float32).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())
        self.dequantized = None

    def dequantize(self) -> torch.Tensor:
        """``codes * scale`` in float32, the values the QAT forward computed."""
        return self.codes.to(torch.float32) * self.scale.unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized
        if w is None or w.device != x.device:
            w = self.dequantize()
            if self.bf16:
                w = w.to(torch.bfloat16)
            self.dequantized = w
        return linear(x, w, self.bias, self.bf16, self.float_output)

    def _apply(self, fn, recurse=True):  # moved or cast (.to(), .float(), ...): rebuilt at the next forward
        self.dequantized = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self.dequantized = None
        super()._load_from_state_dict(*args, **kwargs)

    @classmethod
    def from_linear(cls, linear: nn.Module, bits: int) -> "QuantizedLinear":
        w = linear.weight.detach().float()
        scale = row_scales(w, bits)
        return cls(row_codes(w, scale, bits), scale, linear.bias, bits, bf16=getattr(linear, "bf16", False),
                   float_output=getattr(linear, "float_output", False))

    def packed_bytes(self) -> int:
        """Size in a packed layout: b-bit codes plus one fp32 scale per row, plus the fp32 bias."""
        rows, cols = self.codes.shape
        return rows * ((cols * self.bits + 7) // 8) + 4 * rows + (0 if self.bias is None else 4 * self.bias.numel())


QuantizedLinear.__annotations__["dequantized"] = Optional[torch.Tensor]  # a type, not this module's string form


class FakeQuantGroup:
    """The fake-quantized weights of several layers, computed together once per weight update.

    At training batch sizes the per-layer cost of ``fake_quant_weight`` is not arithmetic but a fresh allocation,
    a clone, two NumPy views and a compiled call, all with cold caches between the embedding kernels (measured
    ~60 us per layer in the training step for ~10 us of work). Here the first layer that needs its weight after
    any weight changed computes every layer's, into buffers that live as long as the group: one ``copy_`` of each
    weight into its buffer (the copy's backward hands the weight the buffer's gradient unchanged: the
    straight-through estimator), then one compiled call fake-quantizing all buffers in place, behind autograd's
    back (the copy's backward does not read values). The buffers are laid end to end in one storage but are not
    views of it, so that autograd sees one ``copy_`` per layer and nothing else. A layer's result is reused while
    its weight is the same tensor at the same version (an optimizer step, ``load_state_dict`` or any in-place
    write bumps it) and autograd is in the same mode. Same bits as ``fake_quant_weight``; CPU float32 only
    (elsewhere each layer falls back to it). Written here: no library has it.

    A recomputation (new weights, or autograd switched on or off) while an earlier forward's graph still awaits
    its backward rewrites the buffers that graph saved: that backward then stops with autograd's in-place error,
    never a silently wrong gradient. Training loops (forward, backward, step; evaluation between steps) never do
    this; several forwards before one backward with unchanged weights reuse the buffers as they are."""

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.layers: list[FakeQuantLinear] = []
        self._keys: list[tuple] = []
        self._buffers: list[torch.Tensor] = []
        self._flat: np.ndarray | None = None
        self._plan: np.ndarray | None = None
        half = 2 ** (bits - 1)
        self._args = (np.float32(1.0 / (half - 1)), np.float32(-half), np.float32(half - 1), _TINY)

    def add(self, layer: "FakeQuantLinear") -> int:
        self.layers.append(layer)
        self._reset()
        return len(self.layers) - 1

    def _reset(self) -> None:
        self._keys, self._buffers, self._flat, self._plan = [], [], None, None

    def __getstate__(self) -> dict:  # copies (deepcopy, pickle) start without buffers, which hold graph state
        return {**self.__dict__, "_keys": [], "_buffers": [], "_flat": None, "_plan": None}

    @staticmethod
    def _key(w: torch.Tensor) -> tuple:
        return w.data_ptr(), w._version, torch.is_grad_enabled()

    def _allocate(self, weights: list[torch.Tensor]) -> None:
        sizes = [p.numel() for p in weights]
        offsets = np.cumsum([0] + sizes)
        storage = torch.empty(int(offsets[-1])).untyped_storage()
        self._buffers = [torch.empty(0).set_(storage, int(o), p.shape, p.stride()) for o, p in zip(offsets, weights)]
        self._flat = torch.empty(0).set_(storage).numpy()
        self._plan = np.array([[o, p.shape[0], p.shape[1]] for o, p in zip(offsets, weights)], dtype=np.int64)

    def weight(self, index: int) -> torch.Tensor:
        """Layer ``index``'s fake-quantized weight (straight-through gradient)."""
        w = self.layers[index].weight
        if self._keys and self._keys[index] == self._key(w):
            return self._buffers[index]
        if not _compiled_ok(w):
            return fake_quant_weight(w, self.bits)
        weights = [layer.weight for layer in self.layers]
        if not all(map(_compiled_ok, weights)):  # a group split across devices or dtypes
            self._reset()
            return fake_quant_weight(w, self.bits)
        if not self._buffers or any(b.shape != p.shape for b, p in zip(self._buffers, weights)):
            self._allocate(weights)
        for buffer, p in zip(self._buffers, weights):
            buffer.detach_()  # forget the previous step's graph: the copy's only input is the weight
            buffer.copy_(p)
        qat_kernels.mlp_fake_quant_flat(self._flat, self._plan, *self._args)
        self._keys = [self._key(p) for p in weights]
        return self._buffers[index]


class FakeQuantLinear(nn.Module):
    """A Linear whose forward uses the fake-quantized weight. It holds the *same* Parameter objects as the Linear it
    replaces, so an existing DDP wrapper keeps reducing their gradients and state-dict keys do not change (a
    ``torch.nn.utils.parametrize`` parametrization registered after DDP wrapping was seen to lose the all-reduce
    of the weight gradient from the second step on). Layers made by one ``fake_quantize_linears`` call share a
    ``FakeQuantGroup``."""

    def __init__(self, linear: nn.Linear, bits: int, group: FakeQuantGroup | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.fake_quant = RowwiseWeightFakeQuant(bits)
        self.bf16 = self.float_output = False  # see ``linear`` and ``use_bfloat16``
        self._group = group if group is not None and group.bits == bits else None
        self._index = self._group.add(self) if self._group is not None else -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fq = self.fake_quant  # applied here rather than through its module call: a per-layer, per-step cost
        if not fq.enabled:
            w = self.weight
        elif self._group is not None:
            w = self._group.weight(self._index)
        else:
            w = fake_quant_weight(self.weight, fq.bits)
        return linear(x, w, self.bias, self.bf16, self.float_output)


def fake_quantize_linears(module: nn.Module, bits: int, group: FakeQuantGroup | None = None) -> int:
    """Swap every ``nn.Linear`` under ``module`` for a ``FakeQuantLinear`` whose fake-quant is computed with the
    other layers of ``group`` (a new group per call when none is given); returns how many."""
    group = FakeQuantGroup(bits) if group is None else group
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, FakeQuantLinear(child, bits, group))
                count += 1
    return count


def use_bfloat16(dense_arch: nn.Module, over_arch: nn.Module) -> None:
    """Make a DLRM's fake-quant MLPs compute in bfloat16 (``linear``): every layer but the over-arch's last, whose
    one output is the logit (bfloat16 would round logits near 4 to steps of 1/32, and it is 0.1 % of the MACs). The
    dense arch hands float32 to the interaction; inside an arch, activations stay bfloat16 from layer to layer."""
    for arch, keep_last in ((dense_arch, False), (over_arch, True)):
        layers = [m for m in arch.modules() if isinstance(m, FakeQuantLinear)]
        if not layers:
            raise ValueError("use_bfloat16 needs fake-quant MLPs: call fake_quantize_linears first")
        for layer in layers[:-1] if keep_last else layers:
            layer.bf16 = True
        layers[-1].float_output = True

"""Embedding QAT on sharded, fused TBEs: fake-quantize only the rows a batch touches, with a straight-through estimator.

``EmbeddingFakeQuantizer`` is the observer: it holds each table's grid (buffers, checkpointed with the model),
refreshes it on its schedule and hooks the estimator (``quant.embedding_ste``) onto every TBE; a refresh reads the
row-max cache (``quant.row_maxima``) where that is exact.

Granularities:
* ``table`` (the DQRM paper): symmetric, one scale per table, ``alpha = max|W|`` over the whole table (all shards,
  agreed by an all-reduce), recomputed every ``scale_update_every`` training steps and held in between;
* ``row`` (FBGEMM's native format): asymmetric scale and bias from each row's own min and max.

A table grid whose fp16 scale falls below fp16's normal range (small-magnitude tables: ``quant.fake_quant`` states
the rule and its cost) is logged when the scales are refreshed: once per change of which tables those are.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from dqrm.quant.embedding_ste import EmbeddingSTE
from dqrm.quant.fake_quant import small_scale_tables, symmetric_qparams
from dqrm.quant.row_maxima import RowMaxima
from dqrm.sharding.tbe import TBELayout, find_tbes

log = logging.getLogger(__name__)

QUANTIZER_NAME = "embedding_fake_quant"
"""The attribute of a prepared DLRMTrain that holds its ``EmbeddingFakeQuantizer`` (its buffers are checkpointed under
this name)."""


class EmbeddingFakeQuantizer(nn.Module):
    """Holds the per-table grid (a buffer, so it is checkpointed with the model), refreshes it, and hooks the
    straight-through correction onto the TBEs."""

    def __init__(self, layouts: list[TBELayout], table_names: list[str], bits: dict[str, int], granularity: str,
                 scale_update_every: int, pg: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        if granularity not in ("table", "row"):
            raise ValueError(f"granularity must be 'table' or 'row', got {granularity!r}")
        self.granularity, self.scale_update_every, self.pg = granularity, scale_update_every, pg
        self.table_names = list(table_names)
        index = {n: i for i, n in enumerate(self.table_names)}
        self.register_buffer("alpha", torch.zeros(len(table_names)))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("table_bits", torch.tensor([bits[n] for n in self.table_names], dtype=torch.long))
        self._enabled = True
        self._step_count: int | None = None  # the steps buffer's value, known without reading it (on_train_step)
        self._steps_seen: tuple[torch.Tensor | None, int] = (None, -1)  # the buffer and its version after our write
        self._layouts = layouts
        # Layouts whose refresh can read the row-max cache (table grid, one width, sharded: every id that touches a
        # row passes through the TBE's hook); the others are rescanned whole.
        self._incremental = [granularity == "table" and len(set(lay.local_dims)) == 1
                             and not isinstance(getattr(lay.tbe, "weights", None), torch.Tensor)
                             for lay in layouts]
        self.row_maxima = RowMaxima(layouts)
        self._reported_small: tuple[list[str], list[str]] = ([], [])
        self._global = [torch.tensor([index[n] for n in lay.table_names], dtype=torch.long) for lay in layouts]
        self.ste = EmbeddingSTE(layouts, self._global, granularity, self.row_maxima)
        for lay in layouts:
            if granularity == "row" and any(lay.column_sharded()):
                raise NotImplementedError(
                    f"row granularity needs whole rows, but {lay.table_names} are column-wise sharded; "
                    "use granularity='table' or a table-wise/row-wise/data-parallel plan for these tables")
        self._handles = [lay.tbe.register_forward_hook(self._make_hook(i), with_kwargs=True)
                         for i, lay in enumerate(layouts)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        if not value:  # rows change unseen while fake-quant is off: the next refresh rescans everything
            self.forget_rows()
        self._enabled = value

    @property
    def compiled(self) -> bool:
        """On CPU with the table grid, compute the correction in one compiled call (same bits as the torch ops)."""
        return self.ste.compiled

    @compiled.setter
    def compiled(self, value: bool) -> None:
        self.ste.compiled = value

    @property
    def layouts(self) -> list[TBELayout]:
        """The TBEs this quantizer hooks, in order (read-only: for diagnostics of the grid)."""
        return list(self._layouts)

    def table_grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, bias) of every table's symmetric grid (``table`` granularity) as the estimator applies it, in
        ``table_names`` order: ``symmetric_qparams(alpha, table_bits)``."""
        return symmetric_qparams(self.alpha, self.table_bits)

    @property
    def _seen(self) -> dict[int, torch.Tensor]:
        """The row-max cache's rows looked up since the last refresh, by layout."""
        return self.row_maxima.seen

    def seen_rows(self, i: int) -> torch.Tensor:
        """The rows of layout ``i`` looked up since the last refresh (sorted)."""
        return self.row_maxima.seen_rows(i)

    def forget_rows(self) -> None:
        """Drop the per-row maxima: the next refresh rescans every row (after the tables changed unseen)."""
        self.row_maxima.forget()

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        # Any in-process load of the model's state (a resume, load_state_dict by hand) may replace table rows the
        # hooks never saw: the cached row maxima would then be stale and an incremental refresh would keep them.
        self.forget_rows()
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def update_scales(self, incremental: bool = False) -> None:
        """``alpha[t] = max|W_t|`` over every shard of table t on every rank. ``incremental`` (the periodic refresh
        during QAT) rescans only the rows looked up since the previous refresh where that is exact."""
        alpha = torch.zeros_like(self.alpha)
        for i, (lay, gidx) in enumerate(zip(self._layouts, self._global)):
            if incremental and self._incremental[i]:
                for g, local in zip(gidx.tolist(), self.row_maxima.table_maxima(i)):
                    if local is not None:
                        alpha[g] = torch.maximum(alpha[g], local.to(alpha.device))
                continue
            flat, offsets = lay.flat_weights(), lay.weights_offsets().to("cpu", torch.long)
            for t, g in enumerate(gidx.tolist()):
                n = lay.local_rows[t] * lay.local_dims[t]
                if n:
                    start = int(offsets[t])
                    lo, hi = torch.aminmax(flat[start:start + n].detach())  # one pass, no |W| copy of the table
                    alpha[g] = torch.maximum(alpha[g], torch.maximum(-lo, hi).to(alpha.device))
        if self.pg is not None and dist.is_initialized() and dist.get_world_size(self.pg) > 1:
            dist.all_reduce(alpha, op=dist.ReduceOp.MAX, group=self.pg)
        self.alpha.copy_(alpha)
        self._report_small_scales()

    def small_scale_tables(self) -> tuple[list[str], list[str]]:
        """The tables whose grid has a subnormal fp16 scale (every level, a coarser scale), and those of them whose
        scale is held at fp16's smallest step 2^-24 (fewer levels); both empty for the row grid (FBGEMM's own)."""
        if self.granularity != "table":
            return [], []
        subnormal, held = small_scale_tables(self.alpha, self.table_bits)
        return ([n for n, s in zip(self.table_names, subnormal.tolist()) if s],
                [n for n, h in zip(self.table_names, held.tolist()) if h])

    def _report_small_scales(self) -> None:
        subnormal, held = small = self.small_scale_tables()
        if subnormal and small != self._reported_small:
            log.log(logging.WARNING if held else logging.INFO,
                    "embedding QAT: %d of %d tables have a subnormal fp16 scale (below 2^-14: a coarser scale, the "
                    "largest weights may clip): %s; %d of them held at fp16's smallest step 2^-24 (fewer levels): %s",
                    len(subnormal), len(self.table_names), subnormal, len(held), held)
        self._reported_small = small

    def on_train_step(self) -> None:
        """Called once per training forward: refreshes the table scales every ``scale_update_every`` steps.
        The count is kept in Python and written to the ``steps`` buffer (for checkpoints) without reading it back,
        which on a GPU would wait for the device every step; it is re-read only after the buffer was loaded (written
        in place, or replaced by another tensor: ``assign=True``, ``to()``). A write through ``.data`` goes unseen."""
        if self._step_count is None or self.steps is not self._steps_seen[0] or \
                self.steps._version != self._steps_seen[1]:
            self._step_count = int(self.steps)
        if self.granularity == "table" and self._step_count % self.scale_update_every == 0:
            self.update_scales(incremental=True)
        self._step_count += 1
        self.steps.fill_(self._step_count)
        self._steps_seen = (self.steps, self.steps._version)

    def _make_hook(self, i: int):
        def hook(module, args, kwargs, output):
            return self.corrected(i, kwargs, output) if self.enabled else output
        return hook

    def corrected(self, i: int, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        """Layout ``i``'s TBE output plus the fake-quant correction of the rows it pooled, on this grid
        (``EmbeddingSTE.corrected``)."""
        return self.ste.corrected(i, kwargs, output, self.alpha, self.table_bits)


def attach_embedding_qat(model: nn.Module, table_names: list[str], bits: dict[str, int], granularity: str,
                         scale_update_every: int, pg: dist.ProcessGroup | None) -> EmbeddingFakeQuantizer:
    layouts = find_tbes(model)
    if not layouts:
        raise ValueError("no sharded embedding kernels found: call quantize_ on the DistributedModelParallel model")
    return EmbeddingFakeQuantizer(layouts, table_names, bits, granularity, scale_update_every, pg)


def embedding_quantizer(model: nn.Module) -> EmbeddingFakeQuantizer | None:
    """The embedding fake-quantizer of a prepared model (DMP-wrapped or not), or ``None``."""
    inner = model.module if hasattr(model, "module") else model
    return getattr(inner, QUANTIZER_NAME, None)

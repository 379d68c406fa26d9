"""Embedding QAT on sharded, fused TBEs: fake-quantize only the rows a batch touches, with a straight-through estimator.

Pooling is linear, so ``pool(FQ(W)) = pool(W) + pool(FQ(W_touched) - W_touched)``. A forward hook on each TBE adds
the second term, computed without gradient from the rows that TBE owns; the TBE's own backward (and its fused
optimizer) then applies exactly the straight-through gradient to the FP32 master rows. The cost depends on the
batch, not on the table size, and nothing of the table is copied.

Granularities:
* ``table`` (the DQRM paper): symmetric, one scale per table, ``alpha = max|W|`` over the whole table (all shards,
  agreed by an all-reduce), recomputed every ``scale_update_every`` training steps and held in between;
* ``row`` (FBGEMM's native format): asymmetric scale and bias from each row's own min and max.

A table grid whose fp16 scale falls below fp16's normal range (small-magnitude tables: ``quant.fake_quant`` states
the rule and its cost) is logged when the scales are refreshed: once per change of which tables those are.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from quant import qat_kernels
from quant.fake_quant import rowwise_qparams, small_scale_tables, symmetric_qparams
from sharding.tbe import TBELayout, find_tbes

log = logging.getLogger(__name__)

QUANTIZER_NAME = "embedding_fake_quant"
"""The attribute of a prepared DLRMTrain that holds its ``EmbeddingFakeQuantizer`` (its buffers are checkpointed under
this name)."""


_EMPTY_F32 = np.zeros(0, dtype=np.float32)
_EMPTY_U8 = np.zeros(0, dtype=np.uint8)


def _row_absmax(rows: torch.Tensor) -> torch.Tensor:
    """max |w| of each row, without an |W| copy (amax and amin measured faster than abs().amax() on (n, 16))."""
    return torch.maximum(rows.amax(dim=1), rows.amin(dim=1).neg_())


class EmbeddingFakeQuantizer(nn.Module):
    """Holds the per-table grid (a buffer, so it is checkpointed with the model) and the TBE hooks."""

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
        # Incremental refresh of alpha (table granularity): the max |W| of every row, kept per layout, and which rows
        # the hook has seen since the last refresh. Plain SGD changes only the rows a batch looks up, and a sharded
        # (not data-parallel) TBE sees every id that touches its rows, so a refresh rescans only those rows and
        # then takes the max of one float per row instead of reading the whole table.
        self._row_max: dict[int, torch.Tensor] = {}
        self._blocks: dict[int, torch.Tensor] = {}  # CPU: max of _row_max per 64 rows (qat_kernels.BLOCK)
        self._seen: dict[int, torch.Tensor] = {}  # rows looked up since the last refresh, per layout (seen_rows)
        self._incremental = [granularity == "table" and len(set(lay.local_dims)) == 1
                             and not isinstance(getattr(lay.tbe, "weights", None), torch.Tensor)
                             for lay in layouts]
        self._grid_cache: dict = {}
        self._static_cache: dict = {}
        self._reported_small: tuple[list[str], list[str]] = ([], [])
        self.compiled = True
        """On CPU with the table grid, compute the correction in one compiled call (same bits as the torch ops)."""
        self._global = [torch.tensor([index[n] for n in lay.table_names], dtype=torch.long) for lay in layouts]
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

    def forget_rows(self) -> None:
        """Drop the per-row maxima: the next refresh rescans every row (after the tables changed unseen)."""
        self._row_max.clear()
        self._blocks.clear()
        self._seen.clear()

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        # Any in-process load of the model's state (a resume, load_state_dict by hand) may replace table rows the
        # hooks never saw: the cached row maxima would then be stale and an incremental refresh would keep them.
        self.forget_rows()
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def _rows_max(self, i: int, incremental: bool) -> torch.Tensor:
        """max |W| of every row of layout ``i`` (a uniform, sharded TBE), updated from the rows seen when possible."""
        lay = self._layouts[i]
        rows = lay.flat_weights().detach().view(-1, lay.local_dims[0])
        known = self._row_max.get(i)
        compiled = rows.device.type == "cpu" and rows.dtype == torch.float32 and rows.is_contiguous()
        if incremental and known is not None:
            seen = self._seen[i]
            if compiled and seen.dtype == torch.uint8 and i in self._blocks:  # one pass over the bitset (cleared)
                qat_kernels.refresh_row_maxima(rows.numpy(), known.numpy(), seen.numpy(), self._blocks[i].numpy())
                return known
            seen = self.seen_rows(i)
            known[seen] = _row_absmax(rows[seen])
        elif compiled:  # once per job (and after fake-quant was off): one float per row
            known = torch.empty(rows.shape[0])
            blocks = torch.empty(-(-rows.shape[0] // qat_kernels.BLOCK))
            qat_kernels.refresh_row_maxima(rows.numpy(), known.numpy(), _EMPTY_U8, blocks.numpy())
            self._row_max[i], self._blocks[i] = known, blocks
        else:
            known = torch.empty(rows.shape[0], device=rows.device)
            for start in range(0, rows.shape[0], 1 << 18):
                known[start:start + (1 << 18)] = _row_absmax(rows[start:start + (1 << 18)])
            self._row_max[i] = known
        # CPU: a bitset of whole 64-bit words (one per block of row maxima); elsewhere a bool per row.
        self._seen[i] = torch.zeros(-(-rows.shape[0] // qat_kernels.BLOCK) * 8, dtype=torch.uint8) \
            if rows.device.type == "cpu" else torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
        return known

    def seen_rows(self, i: int) -> torch.Tensor:
        """The rows of layout ``i`` looked up since the last refresh (sorted). On CPU they are kept as a bitset
        (marking a bool per row costs twice as much on large tables: a cache miss per id), elsewhere as a bool mask."""
        seen = self._seen[i]
        if seen.dtype == torch.uint8:
            return torch.from_numpy(np.flatnonzero(np.unpackbits(seen.numpy(), bitorder="little")))
        return seen.nonzero().squeeze(1)

    def _mark_seen(self, i: int, rows_at: torch.Tensor) -> None:
        seen = self._seen[i]
        if seen.dtype == torch.uint8:
            qat_kernels.mark_rows(seen.numpy(), rows_at.numpy())
        else:
            seen[rows_at] = True

    @torch.no_grad()
    def update_scales(self, incremental: bool = False) -> None:
        """``alpha[t] = max|W_t|`` over every shard of table t on every rank. ``incremental`` (the periodic refresh
        during QAT) rescans only the rows looked up since the previous refresh where that is exact."""
        alpha = torch.zeros_like(self.alpha)
        for i, (lay, gidx) in enumerate(zip(self._layouts, self._global)):
            if incremental and self._incremental[i]:
                row_max, d = self._rows_max(i, incremental), lay.local_dims[0]
                starts = lay.weights_offsets().to("cpu", torch.long) // d
                if i in self._blocks:  # CPU: per table from the 64-row block maxima and the rows at its ends
                    maxima = np.zeros(len(lay.local_rows), dtype=np.float32)
                    qat_kernels.table_maxima(row_max.numpy(), self._blocks[i].numpy(),
                                             starts[:len(lay.local_rows)].numpy(),
                                             np.asarray(lay.local_rows, dtype=np.int64), maxima)
                    for t, g in enumerate(gidx.tolist()):
                        if lay.local_rows[t]:
                            alpha[g] = torch.maximum(alpha[g], torch.tensor(maxima[t]))
                    continue
                for t, g in enumerate(gidx.tolist()):
                    if lay.local_rows[t]:
                        first = int(starts[t])
                        local = row_max[first:first + lay.local_rows[t]].max().to(alpha.device)
                        alpha[g] = torch.maximum(alpha[g], local)
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
        """Layout ``i``'s TBE output plus the fake-quant correction of the rows it pooled (``kwargs``: the TBE's
        indices, offsets and per-sample weights): ``output`` itself, written in place, on the compiled CPU path;
        ``output + correction`` otherwise. Either way its gradient is the TBE's (straight through)."""
        self._check_uniform_batch(i, kwargs, output)
        corr = self._correction(i, kwargs, output)
        return output if corr is None else output + corr

    def _check_uniform_batch(self, i: int, kwargs: dict, output: torch.Tensor) -> None:
        """The correction finds each id's feature from one batch size for every feature (``offsets`` holds
        features x batch bags): a variable-batch KJT would pool deltas into the wrong bags, so it is refused."""
        features = self._layouts[i].feature_table_map.numel()
        bags = kwargs["offsets"].numel() - 1
        if kwargs.get("batch_size_per_feature_per_rank") is not None or bags != features * output.shape[0]:
            raise NotImplementedError(
                f"embedding QAT needs one batch size for every feature, but the TBE of "
                f"{self._layouts[i].table_names} got {bags} bags for {features} features and {output.shape[0]} "
                f"output rows (a variable-batch KeyedJaggedTensor); give every feature the same batch size (the "
                f"dqrm reader does)")

    def _table_grid(self, i: int, dev: torch.device) -> tuple[torch.Tensor, ...]:
        """Per local table of layout ``i``: (scale, 1/scale, bias, qmax), recomputed only when the scales change."""
        # Tensor version counters change on every in-place write (update_scales, load_state_dict).
        version = (self.alpha._version, self.table_bits._version)
        key = (i, dev, version)
        if key not in self._grid_cache:
            g = self._global[i].to(dev)
            bits = self.table_bits.to(dev)[g]
            scale, bias = symmetric_qparams(self.alpha.to(dev)[g], bits)
            qmax = (2 ** bits - 1).to(torch.float32)
            self._grid_cache = {k: v for k, v in self._grid_cache.items() if k[2] == version}
            self._grid_cache[key] = (scale, 1.0 / scale, bias, qmax)
        return self._grid_cache[key]

    def _static(self, i: int, dev: torch.device) -> dict[str, torch.Tensor]:
        """Layout tensors of layout ``i`` on ``dev`` (made once)."""
        key = (i, dev)
        if key not in self._static_cache:
            lay = self._layouts[i]
            g = self._global[i].to(dev)
            self._static_cache[key] = {
                "ftm": lay.feature_table_map.to(dev), "col0": lay.feature_dim_offsets.to(dev),
                "w_off": lay.weights_offsets().to(dev, torch.long),
                "dims": torch.tensor(lay.local_dims, device=dev),
                "qmax": (2 ** self.table_bits.to(dev)[g] - 1).to(torch.float32),
            }
        return self._static_cache[key]

    def _per_feature(self, i: int, dev: torch.device) -> torch.Tensor:
        """(features, 4): bias, 1/scale, scale and qmax of each feature's table grid (``table`` granularity)."""
        version = (self.alpha._version, self.table_bits._version)
        key = ("feature", i, dev, version)
        if key not in self._grid_cache:
            scale, inv, bias, qmax = self._table_grid(i, dev)
            ftm = self._static(i, dev)["ftm"]
            self._grid_cache[key] = torch.stack([bias, inv, scale, qmax], dim=1)[ftm].contiguous()
        return self._grid_cache[key]

    def _arange(self, n: int, dev: torch.device) -> torch.Tensor:
        have = self._static_cache.get(("arange", dev))
        if have is None or have.numel() < n:
            have = torch.arange(max(n, 2 * (0 if have is None else have.numel()), 1024), device=dev)
            self._static_cache[("arange", dev)] = have
        return have[:n]

    @torch.no_grad()
    def _correction(self, i: int, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
        """``pool(FQ(W_touched) - W_touched)`` in the TBE's output layout (features side by side per sample), or
        ``None`` where it was added to ``output`` in place."""
        if len(set(self._layouts[i].local_dims)) == 1:
            return self._correction_uniform(i, kwargs, output)
        return self._correction_mixed(i, kwargs, output)

    def _correction_uniform(self, i: int, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
        """All tables of the TBE have one width ``d``: few, large tensor ops (the per-step cost is op dispatch).
        Rows come from a (rows, d) view of the flat buffer; each index's grid is its feature's; the deltas are
        pooled per bag by ``embedding_bag`` over the TBE's own offsets (bags are feature-major)."""
        lay, dev = self._layouts[i], output.device
        d = lay.local_dims[0]
        flat = lay.flat_weights()
        psw = kwargs.get("per_sample_weights")
        if self.compiled and self.granularity == "table" and dev.type == "cpu" and \
                flat.dtype == output.dtype == torch.float32 and output.is_contiguous() \
                and (psw is None or psw.dtype == torch.float32):
            # One compiled call, the same bits as the torch ops below (quant.qat_kernels), adding the correction to
            # the TBE's output in place: no autograd op (its gradient is the identity, the STE), and nothing
            # allocated. The TBE's backward does not read its output, and the write does not bump its version.
            seen = self._seen.get(i)
            qat_kernels.embedding_correction(
                kwargs["indices"].numpy(), kwargs["offsets"].numpy(), flat.detach().view(-1, d).numpy(),
                lay.first_rows(dev).numpy(), self._per_feature(i, dev).numpy(),
                _EMPTY_F32 if psw is None else psw.detach().numpy(), _EMPTY_U8 if seen is None else seen.numpy(),
                output.detach().view(output.shape[0], -1).numpy())
            return None
        st = self._static(i, dev)
        indices, offsets = kwargs["indices"].long(), kwargs["offsets"].long()
        features = st["ftm"].numel()
        batch = (offsets.numel() - 1) // features
        n = indices.numel()
        counts = offsets[::batch].diff()
        rows_at = lay.row_ids(indices, offsets)
        if i in self._seen:
            self._mark_seen(i, rows_at)
        rows = flat.view(-1, d).index_select(0, rows_at)
        if self.granularity == "table":
            grid = torch.repeat_interleave(self._per_feature(i, dev), counts, dim=0, output_size=n)
            bias, inv, scale, qmax = grid[:, 0:1], grid[:, 1:2], grid[:, 2:3], grid[:, 3:4]
        else:
            bits = torch.repeat_interleave(self.table_bits.to(dev)[self._global[i].to(dev)][st["ftm"]], counts,
                                           output_size=n)
            scale, bias = rowwise_qparams(rows, bits)
            inv, qmax = 1.0 / scale, (2 ** bits - 1).to(torch.float32).unsqueeze(1)
        # FBGEMM's arithmetic, in place: code = clamp(round((w - bias) / scale)), value = scale * code + bias.
        delta = (rows - bias).mul_(inv).round_().clamp_(min=0)
        delta = torch.minimum(delta, qmax, out=delta).mul_(scale).add_(bias).sub_(rows)
        if psw is not None:
            delta.mul_(psw.unsqueeze(1))
        pooled = torch.nn.functional.embedding_bag(self._arange(n, dev), delta.to(output.dtype), offsets,
                                                   mode="sum", include_last_offset=True)
        return pooled.view(features, batch, d).transpose(0, 1).reshape(output.shape)

    def _correction_mixed(self, i: int, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        """Tables of several widths in one TBE (column-wise shards): per width, scattered into the output."""
        lay, dev = self._layouts[i], output.device
        st = self._static(i, dev)
        indices, offsets = kwargs["indices"].long(), kwargs["offsets"].long()
        psw = kwargs.get("per_sample_weights")
        num_features = st["ftm"].numel()
        batch = (offsets.numel() - 1) // num_features
        bag = torch.repeat_interleave(torch.arange(offsets.numel() - 1, device=dev), offsets.diff())
        feature = bag // batch
        table = st["ftm"][feature]
        flat = lay.flat_weights()
        corr = torch.zeros_like(output)
        uniform = len(set(lay.local_dims)) == 1
        for d in sorted(set(lay.local_dims)):
            sel = None if uniform else (st["dims"][table] == d).nonzero().squeeze(1)
            t_sel = table if sel is None else table[sel]
            idx_sel = indices if sel is None else indices[sel]
            rows = flat[(st["w_off"][t_sel] + idx_sel * d).unsqueeze(1) + torch.arange(d, device=dev)]
            if self.granularity == "table":
                scale, inv, bias, qmax = (x[t_sel].unsqueeze(1) for x in self._table_grid(i, dev))
            else:
                scale, bias = rowwise_qparams(rows, self.table_bits.to(dev)[self._global[i].to(dev)[t_sel]])
                inv, qmax = 1.0 / scale, st["qmax"][t_sel].unsqueeze(1)
            # FBGEMM's arithmetic, in place: code = clamp(round((w - bias) / scale)), value = scale * code + bias.
            delta = (rows - bias).mul_(inv).round_().clamp_(min=0)
            delta = torch.minimum(delta, qmax, out=delta).mul_(scale).add_(bias).sub_(rows)
            if psw is not None:
                delta.mul_((psw if sel is None else psw[sel]).unsqueeze(1))
            f_sel = feature if sel is None else feature[sel]
            sample = (bag if sel is None else bag[sel]) % batch
            if uniform:  # output row s holds features f at columns f*d..: index rows of a (B * F, d) view
                corr.view(-1, d).index_add_(0, sample * num_features + f_sel, delta.to(corr.dtype))
            else:
                pos = (sample * output.shape[1] + st["col0"][f_sel]).unsqueeze(1) + torch.arange(d, device=dev)
                corr.view(-1).index_add_(0, pos.reshape(-1), delta.reshape(-1).to(corr.dtype))
        return corr


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

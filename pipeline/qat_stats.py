"""The health of embedding QAT's integer grid, per table, on the rows training looked up before a log: the scale (for
the ``row`` grid, its range over those rows), the share of their values clipped at the grid's ends and their mean
quantization error.

What is measured, precisely. A forward hook on each TBE of the QAT model keeps a copy of the ids (and offsets) of the
last ``KEEP_STEPS`` training forwards on this rank; ``collect`` (at a log) drops them after use, so the rows are
those looked up by the last ``KEEP_STEPS`` steps before the log, or by all steps since the previous log where fewer
ran: a sample of the interval's lookups, the most recent ones, which keeps the cost of a log independent of the log
interval (all of an interval's ids would grow with it: 333k per rank for 200 steps of the default job, against
6,656 here; ``bench/logging_overhead.py`` times a log). ``collect`` takes each table's distinct rows among the kept
ids and reads them as they are at that moment, on the grid as it is at that moment (the table scales of the latest
refresh, or each row's own min and max for the ``row`` grid):

* clip share: the values whose code ``round((w - bias) / scale)`` falls outside ``[0, 2^b - 1]``, over all values of
  those rows (FBGEMM's arithmetic, as ``quant.fake_quant`` and the training estimator compute it);
* quantization error: the mean over those values of ``|FQ(w) - w|``;
* scale range (``row`` grid): the smallest and largest fp16 row scale among those rows.

Each rank counts the rows it holds: a table-wise table on its owner, a row-wise table's rows on the rank of each
shard, a column-wise shard its own columns, and each replica of a data-parallel table the rows that rank's batches
looked up (a row looked up on two ranks counts twice). ``combine`` adds the counts and sums of the ranks and takes
the extremes of the scales. Nothing is computed per step beyond the copy of the ids; the rest is paid at log time.
"""

from __future__ import annotations

import collections

import torch

from dqrm.quant.embedding_qat import EmbeddingFakeQuantizer
from dqrm.quant.fake_quant import rowwise_qparams

KEEP_STEPS = 4
"""Training forwards whose ids each TBE keeps for the next log (the most recent ones)."""

VALUES, CLIPPED, ABS_ERROR, NEG_MIN_SCALE, MAX_SCALE = range(5)
COLUMNS = 5
"""Per table: values, clipped values, sum of |FQ(w) - w|, -(smallest row scale), largest row scale."""


class GridStats:
    """Keeps the ids the QAT model's TBEs look up in training and, at ``collect``, measures its grid on those rows."""

    def __init__(self, quantizer: EmbeddingFakeQuantizer) -> None:
        self.quantizer = quantizer
        self.layouts = quantizer.layouts
        self.table_names = list(quantizer.table_names)
        index = {n: i for i, n in enumerate(self.table_names)}
        self._global = [torch.tensor([index[n] for n in lay.table_names], dtype=torch.long) for lay in self.layouts]
        self._kept = [collections.deque(maxlen=KEEP_STEPS) for _ in self.layouts]
        self._handles = [lay.tbe.register_forward_hook(self._hook(i), with_kwargs=True)
                         for i, lay in enumerate(self.layouts)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, i: int):
        def hook(module, args, kwargs, output):
            if module.training and self.quantizer.enabled:
                self.keep(i, kwargs["indices"], kwargs["offsets"])
        return hook

    def keep(self, i: int, indices: torch.Tensor, offsets: torch.Tensor) -> None:
        """Keep the ids of one forward of TBE ``i`` (its ``indices``/``offsets`` arguments: bags feature-major), the
        oldest kept forward dropped beyond ``KEEP_STEPS``."""
        self._kept[i].append((indices.detach().clone(), offsets.detach().clone()))

    @torch.no_grad()
    def collect(self) -> torch.Tensor:
        """(tables, ``COLUMNS``) float64 on the CPU: this rank's statistics of the rows looked up by the kept forwards
        (see the module docstring), which are then dropped."""
        q = self.quantizer
        stats = torch.zeros(len(self.table_names), COLUMNS, dtype=torch.float64)
        stats[:, NEG_MIN_SCALE:] = -torch.inf
        grid = q.table_grid() if q.granularity == "table" else None
        for i, lay in enumerate(self.layouts):
            kept = list(self._kept[i])
            self._kept[i].clear()
            if kept:
                self._measure(lay, self._global[i], kept, grid, stats)
        return stats

    def _measure(self, lay, gidx: torch.Tensor, kept: list, grid, stats: torch.Tensor) -> None:
        q = self.quantizer
        dev = kept[0][0].device
        ftm = lay.feature_table_map.to(dev)
        features = ftm.numel()
        # table of each kept id: each feature's ids are one run of the indices (bags are feature-major)
        tables = torch.cat([torch.repeat_interleave(ftm, off[::(off.numel() - 1) // features].diff().long())
                            for _, off in kept])
        ids = torch.cat([idx for idx, _ in kept]).long()
        stride = max(lay.local_rows) + 1
        key = torch.unique(tables * stride + ids)  # distinct (table, row) pairs
        t_all, r_all = key // stride, key % stride
        flat = lay.flat_weights().detach()
        w_off = lay.weights_offsets().to(dev, torch.long)
        dims = torch.tensor(lay.local_dims, device=dev)
        uniform = len(set(lay.local_dims)) == 1
        for d in sorted(set(lay.local_dims)):
            sel = dims[t_all] == d
            t, r = t_all[sel], r_all[sel]
            if not t.numel():
                continue
            if uniform:  # whole rows of a (rows, d) view: one gather of rows
                rows = flat.view(-1, d).index_select(0, w_off[t] // d + r).float()
            else:  # several widths in one buffer (column-wise shards): element by element
                rows = flat[(w_off[t] + r * d).unsqueeze(1) + torch.arange(d, device=dev)].float()
            g = gidx.to(dev)[t]
            bits = q.table_bits.to(dev)[g]
            if grid is not None:
                scale, bias = grid[0].to(dev)[g].unsqueeze(1), grid[1].to(dev)[g].unsqueeze(1)
            else:
                scale, bias = rowwise_qparams(rows, bits)
            qmax = (2 ** bits - 1).to(torch.float32).unsqueeze(1)
            codes = torch.round((rows - bias) * (1.0 / scale))
            clipped = ((codes < 0) | (codes > qmax)).sum(1)
            error = (torch.minimum(codes.clamp(min=0), qmax) * scale + bias - rows).abs().sum(1)
            g = g.cpu()
            stats[:, VALUES].index_add_(0, g, torch.full((g.numel(),), float(d), dtype=torch.float64))
            stats[:, CLIPPED].index_add_(0, g, clipped.cpu().double())
            stats[:, ABS_ERROR].index_add_(0, g, error.cpu().double())
            if grid is None:
                s = scale.squeeze(1).cpu().double()
                stats[:, NEG_MIN_SCALE].scatter_reduce_(0, g, -s, "amax")
                stats[:, MAX_SCALE].scatter_reduce_(0, g, s, "amax")

    @staticmethod
    def combine(per_rank: torch.Tensor) -> torch.Tensor:
        """(ranks, tables, ``COLUMNS``) -> (tables, ``COLUMNS``): counts and sums added, scale extremes taken."""
        return torch.cat([per_rank[..., :NEG_MIN_SCALE].sum(0), per_rank[..., NEG_MIN_SCALE:].amax(0)], dim=1)

    def scalars(self, combined: torch.Tensor) -> dict[str, float]:
        """TensorBoard scalars of ``combine``'s result: ``qat_scale/T`` (table grid: the table's scale, logged
        whether or not the table was looked up), ``qat_scale_min/T`` and ``qat_scale_max/T`` (row grid),
        ``qat_clip_share/T`` and ``qat_quant_error/T`` (tables with rows looked up)."""
        out = {}
        if self.quantizer.granularity == "table":
            scale = self.quantizer.table_grid()[0].cpu()
            out.update({f"qat_scale/{n}": float(scale[t]) for t, n in enumerate(self.table_names)})
        for t, n in enumerate(self.table_names):
            values = float(combined[t, VALUES])
            if not values:
                continue
            if self.quantizer.granularity != "table":
                out[f"qat_scale_min/{n}"] = -float(combined[t, NEG_MIN_SCALE])
                out[f"qat_scale_max/{n}"] = float(combined[t, MAX_SCALE])
            out[f"qat_clip_share/{n}"] = float(combined[t, CLIPPED]) / values
            out[f"qat_quant_error/{n}"] = float(combined[t, ABS_ERROR]) / values
        return out

"""The row-max cache of embedding QAT's table grid: ``max|W|`` of every row of each uniform, sharded TBE, kept between
scale refreshes together with the rows looked up since the last one, so that a refresh rescans only those rows and
then takes the maximum of one float per row instead of reading the whole table.

That is exact because plain SGD changes only the rows a batch looks up, and a sharded (not data-parallel) TBE sees
every id that touches its rows; ``quant.embedding_qat`` decides which layouts qualify.
"""

from __future__ import annotations

import numpy as np
import torch

from dqrm.quant import qat_kernels
from dqrm.sharding.tbe import TBELayout

_EMPTY_U8 = np.zeros(0, dtype=np.uint8)


def _row_absmax(rows: torch.Tensor) -> torch.Tensor:
    """max |w| of each row, without an |W| copy (amax and amin measured faster than abs().amax() on (n, 16))."""
    return torch.maximum(rows.amax(dim=1), rows.amin(dim=1).neg_())


class RowMaxima:
    """Per layout (by index): the maximum of every row, on CPU also per block of 64 rows (``qat_kernels.BLOCK``),
    and the rows seen since the last refresh (``seen``: a bitset of whole 64-bit words on CPU, a bool per row
    elsewhere). The forward hook marks rows through ``seen`` (or ``mark_seen``); a refresh reads ``table_maxima``."""

    def __init__(self, layouts: list[TBELayout]) -> None:
        self.layouts = layouts
        self.row_max: dict[int, torch.Tensor] = {}
        self.blocks: dict[int, torch.Tensor] = {}  # CPU: max of row_max per 64 rows
        self.seen: dict[int, torch.Tensor] = {}  # rows looked up since the last refresh, per layout

    def forget(self) -> None:
        """Drop the per-row maxima: the next refresh rescans every row (after the tables changed unseen)."""
        self.row_max.clear()
        self.blocks.clear()
        self.seen.clear()

    @torch.no_grad()
    def rows_max(self, i: int, incremental: bool) -> torch.Tensor:
        """max |W| of every row of layout ``i`` (a uniform, sharded TBE), updated from the rows seen when possible."""
        lay = self.layouts[i]
        rows = lay.flat_weights().detach().view(-1, lay.local_dims[0])
        known = self.row_max.get(i)
        compiled = rows.device.type == "cpu" and rows.dtype == torch.float32 and rows.is_contiguous()
        if incremental and known is not None:
            seen = self.seen[i]
            if compiled and seen.dtype == torch.uint8 and i in self.blocks:  # one pass over the bitset (cleared)
                qat_kernels.refresh_row_maxima(rows.numpy(), known.numpy(), seen.numpy(), self.blocks[i].numpy())
                return known
            seen = self.seen_rows(i)
            known[seen] = _row_absmax(rows[seen])
        elif compiled:  # once per job (and after fake-quant was off): one float per row
            known = torch.empty(rows.shape[0])
            blocks = torch.empty(-(-rows.shape[0] // qat_kernels.BLOCK))
            qat_kernels.refresh_row_maxima(rows.numpy(), known.numpy(), _EMPTY_U8, blocks.numpy())
            self.row_max[i], self.blocks[i] = known, blocks
        else:
            known = torch.empty(rows.shape[0], device=rows.device)
            for start in range(0, rows.shape[0], 1 << 18):
                known[start:start + (1 << 18)] = _row_absmax(rows[start:start + (1 << 18)])
            self.row_max[i] = known
        # CPU: a bitset of whole 64-bit words (one per block of row maxima); elsewhere a bool per row.
        self.seen[i] = torch.zeros(-(-rows.shape[0] // qat_kernels.BLOCK) * 8, dtype=torch.uint8) \
            if rows.device.type == "cpu" else torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
        return known

    @torch.no_grad()
    def table_maxima(self, i: int) -> list[torch.Tensor | None]:
        """max |W| of each local table of layout ``i`` (``None`` for a table with no local rows), from the cached
        row maxima refreshed with the rows seen since the previous call."""
        lay = self.layouts[i]
        row_max, d = self.rows_max(i, incremental=True), lay.local_dims[0]
        starts = lay.weights_offsets().to("cpu", torch.long) // d
        if i in self.blocks:  # CPU: per table from the 64-row block maxima and the rows at its ends
            maxima = np.zeros(len(lay.local_rows), dtype=np.float32)
            qat_kernels.table_maxima(row_max.numpy(), self.blocks[i].numpy(), starts[:len(lay.local_rows)].numpy(),
                                     np.asarray(lay.local_rows, dtype=np.int64), maxima)
            return [torch.tensor(maxima[t]) if n else None for t, n in enumerate(lay.local_rows)]
        return [row_max[int(starts[t]):int(starts[t]) + n].max() if n else None for t, n in enumerate(lay.local_rows)]

    def seen_rows(self, i: int) -> torch.Tensor:
        """The rows of layout ``i`` looked up since the last refresh (sorted). On CPU they are kept as a bitset
        (marking a bool per row costs twice as much on large tables: a cache miss per id), elsewhere as a bool mask."""
        seen = self.seen[i]
        if seen.dtype == torch.uint8:
            return torch.from_numpy(np.flatnonzero(np.unpackbits(seen.numpy(), bitorder="little")))
        return seen.nonzero().squeeze(1)

    def mark_seen(self, i: int, rows_at: torch.Tensor) -> None:
        seen = self.seen[i]
        if seen.dtype == torch.uint8:
            qat_kernels.mark_rows(seen.numpy(), rows_at.numpy())
        else:
            seen[rows_at] = True

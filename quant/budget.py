"""Per-table bit widths and kept rows under a byte budget: the cheapest-to-lose choice, given measured damages.

Each table has options (bits in {8, 4, 2}, and either every row or only the rows seen at least ``min_count``
times in training, the rest sharing one row), each with its bytes as served (FBGEMM's rows: fp16 scale and bias,
codes, row padding, the table's 128-byte start; plus 4 bytes per kept row for the row map) and a measured damage
(the validation loss it adds, ``pipeline.budget``) and a prior (the share of training lookups it loses: every
lookup of a dropped row, and a fraction of each kept row's for fewer bits). A short warm-up leaves most damages at
the measurement's noise, where the prior decides: bytes then go where lookups are. Choosing one option per table to
minimise the summed cost within the budget is a multiple-choice knapsack, solved exactly here by dynamic
programming over bytes counted in units of ``budget / resolution`` (each option's bytes rounded up, so the choice
never exceeds the budget). Neither
FBGEMM nor TorchRec chooses bit widths; TorchRec's planner places tables by memory but never quantizes them.
"""

from __future__ import annotations

import dataclasses
import math
import types

import numpy as np

from dqrm.quant.convert import RowLayout
from dqrm.quant.fake_quant import SUPPORTED_BITS
from dqrm.quant.spec import QuantSpec

TABLE_ALIGNMENT = 128
"""FBGEMM starts every table of its row buffer on a 128-byte boundary."""
ARTIFACT_OVERHEAD = 128 * 1024
"""Bytes of the artifact's TorchScript file beyond the MLPs (code, table metadata, manifest), kept free: the
default model's is about 92 KB."""


@dataclasses.dataclass(frozen=True)
class Option:
    """One way to store a table."""

    bits: int
    min_count: int
    """Rows seen fewer times than this in training share one row; 0 = every row kept, no map."""
    rows: int
    """Rows of the stored table (kept + 1 with a map)."""
    bytes: int
    """As served: the table's rows in FBGEMM's buffer, plus its map."""
    damage: float
    """Validation loss added, measured."""
    prior: float = 0.0
    """Share of all training lookups lost (``lookups_lost``)."""


PRIOR_LOSS = 0.01
"""Validation loss taken to follow from losing every training lookup: losing 1 % of them counts as 1e-4, which is
above the noise of a 16k-row measurement after a short warm-up and below what a sensitive table measures."""


def precision_loss(bits: int) -> float:
    """Share of a lookup lost by storing its row at ``bits``: the squared rounding step relative to the row's range
    (about 4^-bits; 1.5e-5 at INT8, 3.9e-3 at INT4, 6.3e-2 at INT2)."""
    return 4.0 ** -bits


def lookups_lost(counts: np.ndarray, total: int, bits: int, min_count: int) -> float:
    """The prior of storing a table whose rows were looked up ``counts`` times (of ``total`` over every table) at
    ``bits``, its rows seen fewer than ``min_count`` times sharing one row: those lookups lost whole, the others in
    part."""
    dropped = int(counts[counts < min_count].sum()) if min_count else 0
    return (dropped + (int(counts.sum()) - dropped) * precision_loss(bits)) / max(total, 1)


def table_bytes(rows: int, dim: int, bits: int, row_alignment: int) -> int:
    """Bytes one table of ``rows`` rows takes in FBGEMM's row buffer, its 128-byte table start included."""
    spec = QuantSpec(table_bits={"t": bits}, row_alignment=row_alignment)
    layout = RowLayout.of([types.SimpleNamespace(name="t", num_embeddings=rows, embedding_dim=dim)], spec)
    return -(-layout.total_bytes // TABLE_ALIGNMENT) * TABLE_ALIGNMENT


def option_bytes(rows: int, kept: int | None, dim: int, bits: int, row_alignment: int) -> int:
    """A table stored whole (``kept`` None) or as ``kept`` rows plus the shared row and a 4-byte map entry each."""
    if kept is None:
        return table_bytes(rows, dim, bits, row_alignment)
    return table_bytes(kept + 1, dim, bits, row_alignment) + 4 * kept


def mlp_bytes(sizes: list[tuple[int, int]], bits: int) -> int:
    """Bytes of MLP layers ``(in, out)`` as the artifact stores them (``quant.convert.stored_mlp_bytes``): int8
    codes with fp32 row scales and biases, or fp32 weights and biases when ``bits`` is 0."""
    if bits:
        return sum(o * i + 8 * o for i, o in sizes)
    return sum(4 * (o * i + o) for i, o in sizes)


def bit_choices(dim: int) -> list[int]:
    """Bit widths a table of width ``dim`` can take (whole bytes per row)."""
    return [b for b in sorted(SUPPORTED_BITS, reverse=True) if dim * b % 8 == 0]


def cost(option: Option, noise: float) -> float:
    """What ``choose`` minimises: the measured damage where it exceeds ``noise`` (a measured gain, or a loss within
    the noise, counts as zero), plus the prior in loss units."""
    return (option.damage if option.damage > noise else 0.0) + PRIOR_LOSS * option.prior


def choose(options: list[list[Option]], budget: int, noise: float = 0.0, resolution: int = 4000) -> list[Option]:
    """One option per table with the least summed ``cost`` whose bytes fit ``budget``; among equal costs the larger
    option wins, so that bytes are only given up for a reason. Raises ``ValueError`` when even the smallest options
    do not fit."""
    smallest = sum(min(o.bytes for o in opts) for opts in options)
    if smallest > budget:
        raise ValueError(f"the tables cannot fit {budget:,} bytes: their smallest options take {smallest:,} "
                         f"(every table at its fewest bits and rows); raise the budget")
    unit = max(1, math.ceil(budget / resolution))
    cap = budget // unit
    best = np.zeros(cap + 1)  # least damage of the tables so far within c units (every c >= 0 is reachable)
    picks = []
    for opts in options:
        largest = max(o.bytes for o in opts)
        new = np.full(cap + 1, np.inf)
        pick = np.full(cap + 1, -1)
        for j, o in enumerate(opts):
            u = math.ceil(o.bytes / unit)
            if u > cap:
                continue
            cand = best[:cap + 1 - u] + cost(o, noise) + 1e-12 * (largest - o.bytes) / largest
            better = cand < new[u:]
            new[u:][better] = cand[better]
            pick[u:][better] = j
        best = new
        picks.append(pick)
    if not np.isfinite(best[cap]):
        raise ValueError(f"no choice of options fits {budget:,} bytes at this resolution; raise the budget")
    chosen, c = [], cap
    for opts, pick in zip(reversed(options), reversed(picks)):
        o = opts[int(pick[c])]
        chosen.append(o)
        c -= math.ceil(o.bytes / unit)
    return chosen[::-1]

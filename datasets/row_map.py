"""Shared rows for rare ids: a per-table list of the rows that keep their own embedding, every other id of the table
looked up in one shared row.

A table of ``n`` rows (its id space: ``hash % n``, or the vocabulary's indices) keeps the sorted rows ``K`` (int32);
the reader maps row ``r`` to ``searchsorted(K, r) + 1`` when ``r`` is in ``K`` and to 0 (the shared row) otherwise,
so the model's table has ``len(K) + 1`` rows. Tables without a list are read as before. A missing value stays an
empty bag. The lists are what a byte budget (``quant.budget_bytes``) chose from training-data frequencies; the
same file is read in training, evaluation and by ``pipeline.predict``, and it ships with the artifact (its bytes
count in the artifact's size: 4 per kept row; its SHA-256 is in the artifact's manifest, and loading refuses another
map, even one with the same kept counts).

File format (``numpy.savez``): ``id_space`` (int64, one entry per table: the rows before mapping) and ``C{t+1}``
(sorted int32 kept rows) for each mapped table ``t``.
"""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from dqrm.datasets.schema import FEATURE_NAMES, SPARSE_COLUMNS
from dqrm.datasets.vocab import lookup


@dataclasses.dataclass(frozen=True)
class RowMap:
    """Kept rows per table (``None``: the table is not mapped) and each table's id space."""

    id_space: tuple[int, ...]
    kept: tuple[np.ndarray | None, ...]

    def __post_init__(self) -> None:
        if len(self.id_space) != len(SPARSE_COLUMNS) or len(self.kept) != len(SPARSE_COLUMNS):
            raise ValueError(f"a row map needs {len(SPARSE_COLUMNS)} tables, got {len(self.id_space)} id spaces and "
                             f"{len(self.kept)} kept lists")
        for t, (n, k) in enumerate(zip(self.id_space, self.kept)):
            if k is None:
                continue
            if k.dtype != np.int32 or k.ndim != 1:
                raise ValueError(f"{FEATURE_NAMES[t]}: kept rows must be a 1-d int32 array, got {k.dtype} {k.shape}")
            if len(k) and (k[0] < 0 or k[-1] >= n or (np.diff(k) <= 0).any()):
                raise ValueError(f"{FEATURE_NAMES[t]}: kept rows must be sorted, distinct and in [0, {n})")

    def num_embeddings(self) -> list[int]:
        """Rows of each model table: kept + 1 (the shared row) for a mapped table, the id space otherwise."""
        return [n if k is None else len(k) + 1 for n, k in zip(self.id_space, self.kept)]

    def apply(self, t: int, rows: np.ndarray) -> np.ndarray:
        """Model rows (int64) of table ``t``'s rows in its id space."""
        k = self.kept[t]
        return rows if k is None else lookup(k.view(np.uint32), rows)

    def save(self, path: Path) -> None:
        arrays = {f"C{t + 1}": k for t, k in enumerate(self.kept) if k is not None}
        tmp = Path(path).with_suffix(".tmp.npz")
        np.savez(tmp, id_space=np.asarray(self.id_space, dtype=np.int64), **arrays)
        tmp.replace(path)


def load_row_map(path: str | Path) -> RowMap:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no row map (the kept rows of a byte-budgeted model); it is written by the "
                                f"training job that chose the budget, next to its artifact")
    try:
        with np.load(path) as f:
            id_space = tuple(int(n) for n in f["id_space"])
            kept = tuple(f[f"C{t + 1}"] if f"C{t + 1}" in f.files else None for t in range(len(id_space)))
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as e:  # truncated or corrupt: zip CRCs
        raise ValueError(f"{path}: not a readable row map ({e}); it may be damaged") from None
    try:
        return RowMap(id_space, kept)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def kept_by_count(counts: np.ndarray, min_count: int) -> np.ndarray:
    """The rows seen at least ``min_count`` times (sorted int32)."""
    return np.flatnonzero(counts >= min_count).astype(np.int32)


def check_tables(row_map: RowMap, num_embeddings: Sequence[int], where: str) -> None:
    """The model's tables must be the sizes the map gives (kept + 1 for a mapped table)."""
    need = row_map.num_embeddings()
    bad = [(FEATURE_NAMES[t], n, m) for t, (n, m) in enumerate(zip(num_embeddings, need)) if n != m]
    if bad:
        raise ValueError(f"{where}: tables do not match the row map (feature, rows, rows the map gives): {bad[:4]}"
                         f"{' ...' if len(bad) > 4 else ''}; set model.num_embeddings to the map's sizes")

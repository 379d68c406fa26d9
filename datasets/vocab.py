"""Contiguous categorical ids with a frequency threshold: count each raw 32-bit id over the training data, keep the
ids seen at least ``min_count`` times, and map raw ids to their place in that sorted vocabulary.

This is the other convention of Criteo preprocessing, next to hashing by ``hash % num_embeddings``. TorchRec's
``BinaryCriteoUtils.sparse_to_contiguous`` (frequency threshold 3 by default) loads every NumPy file whole, counts
with a Python dict per value and rewrites the data; here the counting is vectorized over the converter's Parquet,
one column at a time, and only a sorted vocabulary per column is written, applied at read time, so the same Parquet
serves both conventions.

Convention (the reader's ``vocab_dir``): for table ``t`` with sorted vocabulary ``V`` (``vocab/C{t+1}.npy``, uint32),
a raw id ``x`` in ``V`` becomes ``searchsorted(V, x) + 1``; an id seen fewer than ``min_count`` times (out of
vocabulary) and a missing value both become 0. Every row then has exactly one id per table, and the table needs
``len(V) + 1`` rows (``vocab_num_embeddings``).
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow.parquet as pq

from dqrm.datasets.schema import NUM_SPARSE, SPARSE_COLUMNS, detect_layout

log = logging.getLogger(__name__)

_MERGE_AT = 1 << 22  # distinct ids pending before a merge, at least


def count_ids(files: Sequence[Path], table: int, merge_at: int = _MERGE_AT) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct raw ids as uint32, how often each occurs as int64) of categorical column ``table`` over
    ``files``; missing values are not counted. Memory is about the column's distinct ids: each row group is reduced
    with ``np.unique`` and the pieces are merged once they outgrow what is merged already (and ``merge_at``)."""
    ids, counts = np.empty(0, dtype=np.uint32), np.empty(0, dtype=np.int64)
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    pending_size = 0
    for path in files:
        f = pq.ParquetFile(path)
        layout = detect_layout(f.schema_arrow, str(path))
        name = layout.sparse[table]
        for g in range(f.num_row_groups):
            col = f.read_row_group(g, columns=[name]).column(0).combine_chunks().drop_null()
            try:
                u, c = np.unique(layout.hashes(col.to_numpy()), return_counts=True)
            except ValueError as e:
                raise ValueError(f"{path}: row group {g}, column {name!r}: {e}") from None
            pending.append((u, c.astype(np.int64)))
            pending_size += len(u)
            if pending_size >= max(len(ids), merge_at):
                ids, counts = _merge([(ids, counts), *pending])
                pending, pending_size = [], 0
    return _merge([(ids, counts), *pending]) if pending else (ids, counts)


def _merge(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    ids, where = np.unique(np.concatenate([p[0] for p in parts]), return_inverse=True)
    counts = np.bincount(where, weights=np.concatenate([p[1] for p in parts]), minlength=len(ids))
    return ids, counts.astype(np.int64)  # float64 sums of counts are exact below 2^53


def _column_vocab(args: tuple[list[Path], int, int]) -> np.ndarray:
    files, table, min_count = args
    ids, counts = count_ids(files, table)
    return ids[counts >= min_count]


def write_vocabulary(files: Sequence[Path], out_dir: Path, min_count: int, workers: int = 1) -> dict:
    """Count every categorical column over ``files`` (``workers`` columns at a time, in processes) and write
    ``out_dir/C1.npy .. C26.npy`` (sorted uint32 ids seen at least ``min_count`` times) and ``out_dir/vocab.json``;
    returns what ``vocab.json`` holds: the threshold, each column's size and the tables' ``num_embeddings``."""
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")
    if not files:
        raise ValueError("no Parquet files to count")
    jobs = [(list(files), t, min_count) for t in range(NUM_SPARSE)]
    if workers > 1:
        with ProcessPoolExecutor(min(workers, NUM_SPARSE)) as pool:
            vocabs = list(pool.map(_column_vocab, jobs))
    else:
        vocabs = [_column_vocab(j) for j in jobs]
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, v in zip(SPARSE_COLUMNS, vocabs):
        np.save(out_dir / f"{name}.npy", v)
    info = {"min_count": min_count, "sizes": {name: len(v) for name, v in zip(SPARSE_COLUMNS, vocabs)},
            "num_embeddings": [len(v) + 1 for v in vocabs],
            "id_mapping": "index in the sorted vocabulary + 1; out of vocabulary and missing -> 0"}
    (out_dir / "vocab.json").write_text(json.dumps(info, indent=2))
    log.info("vocabulary (min count %d) -> %s; num_embeddings %s", min_count, out_dir, info["num_embeddings"])
    return info


def load_vocab(vocab_dir: str | Path) -> list[np.ndarray]:
    """The 26 sorted vocabularies, memory-mapped (shared by every process reading them on a host)."""
    vocab_dir = Path(vocab_dir)
    out = []
    for name in SPARSE_COLUMNS:
        path = vocab_dir / f"{name}.npy"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no vocabulary file; build one with "
                                    f"`python -m dqrm.datasets.convert --out DIR --vocab-min-count N`")
        v = np.load(path, mmap_mode="r")
        if v.dtype != np.uint32 or v.ndim != 1:
            raise ValueError(f"{path}: expected a 1-d uint32 array, got {v.dtype} with shape {v.shape}")
        out.append(v)
    return out


def vocab_num_embeddings(vocab_dir: str | Path) -> list[int]:
    """Rows each table needs with this vocabulary (``len(vocab) + 1``, row 0 for out-of-vocabulary and missing):
    the value for ``model.num_embeddings``."""
    return [len(v) + 1 for v in load_vocab(vocab_dir)]


def lookup(vocab: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """Contiguous ids (int64) of raw uint32 ids: index in ``vocab`` + 1, or 0 when not in it."""
    raw = raw.astype(np.uint32, copy=False)  # same dtype as the vocabulary, or searchsorted would convert all of it
    idx = np.searchsorted(vocab, raw)
    found = idx < len(vocab)
    found[found] = vocab[idx[found]] == raw[found]
    return np.where(found, idx + 1, 0).astype(np.int64)

"""Parquet -> TorchRec ``Batch``: an ``IterableDataset`` streaming row groups, split evenly across ranks and, inside
a ``DataLoader``, across its worker processes.

Each rank reads a contiguous, equal-sized slice of the rows (every rank must run the same number of steps, or the
collectives of the sharded model would hang); the at most ``world_size - 1`` rows left over are counted and
reported, never dropped silently. Within a row group everything is vectorized with numpy.

Categorical ids are ``hash % num_embeddings[t]`` by default; with ``ReaderConfig.vocab_dir`` they are contiguous
indices into a frequency-thresholded vocabulary instead (``datasets.vocab``: index + 1, 0 for out-of-vocabulary and
missing values, so every row has one id per table). With ``ReaderConfig.row_map`` (``datasets.row_map``), the ids
of a mapped table are then folded onto its kept rows, every other id onto the table's shared row 0.

KJT layout of one batch (B rows, keys cat_0..cat_25; a missing value is an empty bag)::

    keys    : cat_0            cat_1            ...
    lengths : [1 0 1 ... 1]    [1 1 1 ... 0]    ...   (26 * B entries, key-major)
    values  : ids of cat_0 for rows with a value, then cat_1, ...
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dqrm.datasets.row_map import check_tables, load_row_map
from dqrm.datasets.schema import DENSE_COLUMNS, FEATURE_NAMES, SPARSE_COLUMNS, Layout, detect_layout
from dqrm.datasets.vocab import load_vocab, lookup, vocab_num_embeddings

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReaderConfig:
    """How Parquet rows become batches."""

    batch_size: int = 512
    """Rows per batch on each rank."""
    shuffle: bool = False
    """Shuffle rows within each row group, deterministically per (seed, epoch)."""
    seed: int = 0
    """Seed of the shuffle."""
    drop_last: bool = False
    """Drop a final batch smaller than batch_size (it is counted either way)."""
    prefetch: int = 2
    """Batches decoded ahead by a background thread (0 = decode in the caller's thread)."""
    vocab_dir: str | None = None
    """Folder of per-column vocabularies (vocab/C1.npy..) mapping ids to contiguous indices; None = modulo hashing."""
    row_map: str | None = None
    """Row map file (``datasets.row_map``): rare ids of the mapped tables share one row; None = every id its own."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")


@dataclasses.dataclass
class _RowGroupRef:
    path: Path
    layout: Layout
    index: int
    start: int  # global row index of the row group's first row
    rows: int


class ParquetBatches(IterableDataset):
    """Stream ``Batch``es from one or more Parquet files in the project's layout (see ``datasets.schema``).

    Iterated directly, it yields this rank's ``len(self)`` batches. Iterated by a ``DataLoader(ds, batch_size=None,
    num_workers=W)``, each worker (``torch.utils.data.get_worker_info()``) reads its own contiguous stretch of the
    rank's batches, about ``len(self) / W`` of them, so the workers read disjoint rows (mostly disjoint row groups)
    and together yield exactly the rank's batches, the one short batch included (or dropped with ``drop_last``);
    the loader interleaves workers, so the order differs from a single process but the rows do not. With
    ``shuffle``, each worker shuffles its stretch with its own seed ``(seed, epoch, rank, worker)``. ``set_epoch``
    reaches the workers when they are started per epoch (the default ``persistent_workers=False``). TorchRec's
    Criteo datasets split rows only by rank; the worker split is ours.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        num_embeddings: Sequence[int],
        cfg: ReaderConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(num_embeddings) != len(SPARSE_COLUMNS):
            raise ValueError(f"num_embeddings needs {len(SPARSE_COLUMNS)} entries, got {len(num_embeddings)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.num_embeddings = np.asarray(num_embeddings, dtype=np.uint64)
        self.epoch = 0
        self._vocab: list[np.ndarray] | None = None
        self.row_map = load_row_map(cfg.row_map) if cfg.row_map is not None else None
        if self.row_map is not None:
            check_tables(self.row_map, num_embeddings, cfg.row_map)
            self.id_space = np.asarray(self.row_map.id_space, dtype=np.uint64)  # what ids are hashed into
        else:
            self.id_space = self.num_embeddings
        if cfg.vocab_dir is not None:
            sizes = vocab_num_embeddings(cfg.vocab_dir)
            small = [(FEATURE_NAMES[t], int(n), s) for t, (n, s) in enumerate(zip(self.id_space, sizes)) if n < s]
            if small:
                raise ValueError(f"{cfg.vocab_dir}: tables too small for the vocabulary (feature, rows, needed): "
                                 f"{small}; set num_embeddings to datasets.vocab.vocab_num_embeddings(vocab_dir) = "
                                 f"{sizes}")
        self._groups: list[_RowGroupRef] = []
        total = 0
        for p in map(Path, paths):
            if not p.is_file():
                raise FileNotFoundError(f"{p}: no such Parquet file")
            try:
                meta = pq.ParquetFile(p).metadata
            except (pa.ArrowInvalid, OSError) as e:
                raise ValueError(f"{p}: not a readable Parquet file ({e})") from e
            layout = detect_layout(meta.schema.to_arrow_schema(), str(p))
            for i in range(meta.num_row_groups):
                n = meta.row_group(i).num_rows
                self._groups.append(_RowGroupRef(p, layout, i, total, n))
                total += n
        if total == 0:
            raise ValueError(f"{', '.join(map(str, paths)) or 'no files given'}: no rows to read (an empty split? "
                             f"check the converter's summary)")
        self.total_rows = total
        per_rank = total // world_size
        self.rows_unused = total - per_rank * world_size
        self.row_begin, self.row_end = rank * per_rank, (rank + 1) * per_rank
        full, rest = divmod(per_rank, cfg.batch_size)
        self.num_batches = full + (1 if rest and not cfg.drop_last else 0)
        self.rows_dropped_last = rest if cfg.drop_last else 0

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _worker_share(self) -> tuple[int, int, int, int]:
        """(first row, end row, batches, worker id) this process reads: the whole rank slice outside a DataLoader
        worker, else a contiguous, batch-aligned stretch of it."""
        info = torch.utils.data.get_worker_info()
        if info is None or info.num_workers == 1:
            return self.row_begin, self.row_end, self.num_batches, -1
        bs = self.cfg.batch_size
        per_rank = self.row_end - self.row_begin
        batches = -(-per_rank // bs)  # the short last batch counted, dropped below if drop_last
        first, last = info.id * batches // info.num_workers, (info.id + 1) * batches // info.num_workers
        lo, hi = self.row_begin + first * bs, min(self.row_begin + last * bs, self.row_end)
        short = last == batches and self.rows_dropped_last > 0
        return lo, hi, last - first - short, info.id

    def _row_groups(self, rng: np.random.Generator, begin: int, end: int) -> list[tuple[_RowGroupRef, int, int]]:
        """Row groups overlapping rows [begin, end), with the local [lo, hi) rows to keep; in a per-epoch random
        order when shuffling."""
        out = []
        for g in self._groups:
            lo, hi = max(begin, g.start), min(end, g.start + g.rows)
            if lo < hi:
                out.append((g, lo - g.start, hi - g.start))
        if self.cfg.shuffle:
            out = [out[i] for i in rng.permutation(len(out))]
        return out

    def _decode(self, table: pa.Table, layout: Layout, where: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                             np.ndarray]:
        """Labels, log-transformed counts, ids and id presence of ``table``'s rows; a label that is not 0 or 1
        (or missing) is an error naming the file, row group and row (``where``: path, row group, its first row
        in ``table``)."""
        path, group, first = where
        label = table.column(layout.label)
        if label.null_count:
            row = int(np.flatnonzero(~label.is_valid().to_numpy(zero_copy_only=False))[0])
            raise ValueError(f"{path}: row group {group}, row {first + row}: label is missing ({label.null_count} "
                             f"rows without one in this stretch); training and scoring need 0/1 labels")
        labels = label.to_numpy().astype(np.float32)
        bad = (labels != 0) & (labels != 1)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{path}: row group {group}, row {first + row}: label is {label[row].as_py()!r}, "
                             f"expected 0 or 1 ({int(bad.sum())} such rows in this stretch)")
        dense = np.empty((table.num_rows, len(DENSE_COLUMNS)), dtype=np.float32)
        for j, c in enumerate(layout.dense):
            x = table.column(c).to_numpy(zero_copy_only=False)  # float64 with NaN where null
            dense[:, j] = np.log1p(np.maximum(np.nan_to_num(x, nan=0.0), 0.0))
        ids = np.empty((len(SPARSE_COLUMNS), table.num_rows), dtype=np.int64)
        valid = np.empty((len(SPARSE_COLUMNS), table.num_rows), dtype=bool)
        if self.cfg.vocab_dir is not None and self._vocab is None:
            self._vocab = load_vocab(self.cfg.vocab_dir)  # here, not in __init__: each worker maps its own copy
        for t, c in enumerate(layout.sparse):
            col = table.column(c).combine_chunks()
            valid[t] = col.is_valid().to_numpy(zero_copy_only=False)
            try:
                raw = layout.hashes(col.fill_null(0).to_numpy())
            except ValueError as e:
                raise ValueError(f"{path}: row group {group}, column {c!r}: {e}") from None
            if self._vocab is None:
                ids[t] = (raw.astype(np.uint64) % self.id_space[t]).astype(np.int64)
            else:
                ids[t] = np.where(valid[t], lookup(self._vocab[t], raw), 0)
            if self.row_map is not None:
                ids[t] = self.row_map.apply(t, ids[t])
        if self._vocab is not None:
            valid[:] = True  # a missing value is id 0, like an out-of-vocabulary one
        return labels, dense, ids, valid

    def __iter__(self) -> Iterator[Batch]:
        # The background thread only runs Arrow and numpy: torch ops from a second thread would fight the
        # training thread for the OpenMP pool (seen: 40x slower steps). Tensors are made in the caller's thread.
        arrays = self._arrays() if self.cfg.prefetch <= 0 else _prefetched(self._arrays(), self.cfg.prefetch)
        return (_make_batch(*a) for a in arrays)

    def _arrays(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        bs = self.cfg.batch_size
        begin, end, expected, worker = self._worker_share()
        rng = np.random.default_rng([self.cfg.seed, self.epoch, self.rank] + ([worker] if worker >= 0 else []))
        pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        pending_rows = 0
        emitted = 0
        for g, lo, hi in self._row_groups(rng, begin, end):
            try:
                # Opened per row group (a footer read, well under 1 ms): a reader kept open holds ~13 MB of buffers
                # after a read, so keeping every file open would grow memory with the number of files.
                with pq.ParquetFile(g.path) as f:
                    table = f.read_row_group(g.index).slice(lo, hi - lo)
            except (pa.ArrowInvalid, OSError) as e:
                raise ValueError(f"{g.path}: row group {g.index} cannot be read ({e}); was the file changed or "
                                 f"removed while the job ran?") from None
            parts = self._decode(table, g.layout, (g.path, g.index, lo))
            if self.cfg.shuffle:
                order = rng.permutation(table.num_rows)
                parts = (parts[0][order], parts[1][order], parts[2][:, order], parts[3][:, order])
            pending.append(parts)
            pending_rows += table.num_rows
            if pending_rows < bs:
                continue
            labels, dense, ids, valid = _concat(pending)
            n_full = (pending_rows // bs) * bs
            for s in range(0, n_full, bs):
                yield _batch_arrays(labels[s:s + bs], dense[s:s + bs], ids[:, s:s + bs], valid[:, s:s + bs])
                emitted += 1
            pending = [(labels[n_full:], dense[n_full:], ids[:, n_full:], valid[:, n_full:])]
            pending_rows -= n_full
        if pending_rows and not self.cfg.drop_last:
            yield _batch_arrays(*_concat(pending))
            emitted += 1
        assert emitted == expected, (emitted, expected)


_DONE = object()


def _prefetched(source: Iterator[Batch], depth: int) -> Iterator[Batch]:
    """Run ``source`` in a background thread, ``depth`` items ahead; its exceptions surface here. Closing the
    returned generator early (e.g. ``islice``) stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for item in source:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_DONE)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(e)

    thread = threading.Thread(target=work, name="dqrm-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def _concat(parts):
    if len(parts) == 1:
        return parts[0]
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            np.concatenate([p[2] for p in parts], axis=1), np.concatenate([p[3] for p in parts], axis=1))


def _batch_arrays(labels: np.ndarray, dense: np.ndarray, ids: np.ndarray, valid: np.ndarray):
    """(labels, dense, values, lengths) in the KJT layout, numpy only."""
    lengths = valid.reshape(-1).astype(np.int32)
    values = ids[valid]  # boolean indexing of the key-major array keeps the KJT order
    return np.ascontiguousarray(labels), np.ascontiguousarray(dense), values, lengths


def _make_batch(labels: np.ndarray, dense: np.ndarray, values: np.ndarray, lengths: np.ndarray) -> Batch:
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=FEATURE_NAMES, values=torch.from_numpy(values), lengths=torch.from_numpy(lengths)
    )
    return Batch(dense_features=torch.from_numpy(dense), sparse_features=kjt, labels=torch.from_numpy(labels))

"""Shared rows for rare ids: the reader folds every id of a mapped table that is not kept onto row 0 and numbers the
kept ones 1.. in order; unmapped tables and missing values read as before."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dqrm.datasets.reader import ParquetBatches, ReaderConfig
from dqrm.datasets.row_map import RowMap, kept_by_count, load_row_map
from dqrm.datasets.schema import DENSE_COLUMNS, FEATURE_NAMES, SCHEMA, SPARSE_COLUMNS

SIZES = [50 + 7 * i for i in range(26)]


def _write(path, rows=600, seed=0):
    rng = np.random.default_rng(seed)
    cols = {"label": pa.array(rng.integers(0, 2, rows).astype(np.int8))}
    for c in DENSE_COLUMNS:
        cols[c] = pa.array(rng.integers(0, 100, rows).astype(np.int32))
    for c in SPARSE_COLUMNS:
        cols[c] = pa.array(rng.integers(0, 2**32, rows, dtype=np.uint64).astype(np.uint32), mask=rng.random(rows) < 0.1)
    pq.write_table(pa.table(cols, schema=SCHEMA), path, row_group_size=128)
    return pq.read_table(path).to_pylist()


def _ids(data: ParquetBatches) -> dict[str, list[list[int]]]:
    out = {f: [] for f in FEATURE_NAMES}
    for batch in data:
        for f in FEATURE_NAMES:
            jt = batch.sparse_features[f]
            out[f].extend(v.tolist() for v in jt.to_dense())
    return out


def test_kept_rows_are_numbered_and_the_rest_share_row_zero(tmp_path):
    rows = _write(tmp_path / "d.parquet")
    kept = [None] * 26
    kept[3] = np.array([0, 5, 17, SIZES[3] - 1], dtype=np.int32)
    kept[20] = np.arange(0, SIZES[20], 3, dtype=np.int32)
    path = tmp_path / "map.npz"
    RowMap(tuple(SIZES), tuple(kept)).save(path)
    row_map = load_row_map(path)
    assert row_map.num_embeddings()[3] == 5 and row_map.num_embeddings()[0] == SIZES[0]
    data = ParquetBatches([tmp_path / "d.parquet"], row_map.num_embeddings(),
                          ReaderConfig(batch_size=100, row_map=str(path)))
    got = _ids(data)
    for t in (0, 3, 20):
        f, c = FEATURE_NAMES[t], SPARSE_COLUMNS[t]
        for row, ids in zip(rows, got[f]):
            if row[c] is None:
                assert ids == []  # a missing value stays an empty bag
                continue
            r = row[c] % SIZES[t]  # hashed into the table's id space, as without a map
            if kept[t] is None:
                assert ids == [r]
            else:
                where = np.flatnonzero(kept[t] == r)
                assert ids == [int(where[0]) + 1 if len(where) else 0]
    assert sum(ids == [0] for ids in got[FEATURE_NAMES[3]]) > 400  # most of table 3 shares the row


def test_tables_must_have_the_maps_sizes(tmp_path):
    _write(tmp_path / "d.parquet")
    kept = [None] * 26
    kept[3] = np.array([1, 2], dtype=np.int32)
    RowMap(tuple(SIZES), tuple(kept)).save(tmp_path / "map.npz")
    with pytest.raises(ValueError, match=r"map.npz: tables do not match the row map.*'cat_3', 71, 3"):
        ParquetBatches([tmp_path / "d.parquet"], SIZES, ReaderConfig(row_map=str(tmp_path / "map.npz")))


def test_bad_maps_name_the_file_and_table(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz: no row map"):
        load_row_map(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz: not a readable row map"):
        load_row_map(tmp_path / "junk.npz")
    kept = [None] * 26
    kept[5] = np.array([4, 2], dtype=np.int32)
    with pytest.raises(ValueError, match="cat_5: kept rows must be sorted"):
        RowMap(tuple(SIZES), tuple(kept))
    kept[5] = np.array([2, SIZES[5]], dtype=np.int32)
    with pytest.raises(ValueError, match="cat_5"):
        RowMap(tuple(SIZES), tuple(kept))


def test_a_damaged_map_is_refused_naming_the_file(tmp_path):
    """Truncated or with one bit flipped (found by bench.faults: both were a traceback from inside numpy's zip
    reader): a one-line error naming the file."""
    kept = [None] * 26
    kept[9] = np.arange(0, SIZES[9], 3, dtype=np.int32)
    RowMap(tuple(SIZES), tuple(kept)).save(tmp_path / "map.npz")
    whole = (tmp_path / "map.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[: len(whole) * 2 // 3])
    flipped = bytearray(whole)
    flipped[len(whole) // 2] ^= 0x10  # inside C10's codes: the zip member's CRC no longer matches
    (tmp_path / "flip.npz").write_bytes(bytes(flipped))
    for name in ("cut.npz", "flip.npz"):
        with pytest.raises(ValueError, match=f"{name}: not a readable row map .*; it may be damaged"):
            load_row_map(tmp_path / name)


def test_kept_by_count():
    assert kept_by_count(np.array([0, 3, 1, 5, 2]), 2).tolist() == [1, 3, 4]

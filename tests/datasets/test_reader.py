"""Parquet -> Batch: every value lands where a plain per-row decode says, ranks split the rows exactly."""

import itertools
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dqrm.datasets.reader import ParquetBatches, ReaderConfig
from dqrm.datasets.schema import DENSE_COLUMNS, FEATURE_NAMES, SCHEMA, SPARSE_COLUMNS

SIZES = [7 + 3 * i for i in range(26)]


def _write(path, rows=1003, row_group_size=100, seed=0):
    rng = np.random.default_rng(seed)
    cols = {"label": pa.array(rng.integers(0, 2, rows).astype(np.int8))}
    for c in DENSE_COLUMNS:
        cols[c] = pa.array(rng.integers(-3, 10_000, rows).astype(np.int32), mask=rng.random(rows) < 0.2)
    for c in SPARSE_COLUMNS:
        cols[c] = pa.array(rng.integers(0, 2**32, rows, dtype=np.uint64).astype(np.uint32), mask=rng.random(rows) < 0.1)
    pq.write_table(pa.table(cols, schema=SCHEMA), path, row_group_size=row_group_size)
    return pq.read_table(path).to_pylist()


def _expected(row):
    dense = [math.log1p(max(row[c], 0)) if row[c] is not None else 0.0 for c in DENSE_COLUMNS]
    ids = {f: ([row[c] % n] if row[c] is not None else []) for f, c, n in zip(FEATURE_NAMES, SPARSE_COLUMNS, SIZES)}
    return float(row["label"]), dense, ids


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_batches_match_plain_decode_and_ranks_partition_rows(tmp_path, world_size):
    rows = _write(tmp_path / "d.parquet")
    seen = []
    for rank in range(world_size):
        data = ParquetBatches([tmp_path / "d.parquet"], SIZES, ReaderConfig(batch_size=64), rank=rank,
                              world_size=world_size)
        got = list(data)
        assert len(got) == len(data)
        for b in got:
            jt = {f: v.to_dense() for f, v in b.sparse_features.to_dict().items()}  # per-row id lists
            for i in range(b.labels.numel()):
                seen.append((b.labels[i].item(), b.dense_features[i].tolist(),
                             {f: jt[f][i].tolist() for f in FEATURE_NAMES}))
    per_rank = len(rows) // world_size
    assert len(seen) == per_rank * world_size  # at most world_size - 1 rows unused, and counted:
    assert ParquetBatches([tmp_path / "d.parquet"], SIZES, ReaderConfig(), world_size=world_size).rows_unused == \
        len(rows) - per_rank * world_size
    for (label, dense, ids), row in zip(seen, rows):
        e_label, e_dense, e_ids = _expected(row)
        assert label == e_label and ids == e_ids
        assert np.allclose(dense, e_dense, rtol=1e-6)


def test_shuffle_is_deterministic_per_epoch_and_a_permutation(tmp_path):
    _write(tmp_path / "d.parquet")
    data = ParquetBatches([tmp_path / "d.parquet"], SIZES, ReaderConfig(batch_size=50, shuffle=True, seed=3))
    first = torch.cat([b.dense_features for b in data])
    again = torch.cat([b.dense_features for b in data])
    data.set_epoch(1)
    other = torch.cat([b.dense_features for b in data])
    assert torch.equal(first, again) and not torch.equal(first, other)
    key = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert key(first) == key(other)


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        ParquetBatches([tmp_path / "missing.parquet"], SIZES, ReaderConfig())
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="junk.parquet: not a readable Parquet file"):
        ParquetBatches([tmp_path / "junk.parquet"], SIZES, ReaderConfig())
    pq.write_table(pa.table({"label": pa.array([1], pa.int8())}), tmp_path / "narrow.parquet")
    with pytest.raises(ValueError, match="narrow.parquet: column 'I1' is missing"):
        ParquetBatches([tmp_path / "narrow.parquet"], SIZES, ReaderConfig())
    table = pq.read_table(_write(tmp_path / "ok.parquet") and tmp_path / "ok.parquet")
    pq.write_table(table.set_column(1, "I1", table.column("I1").cast(pa.float64())), tmp_path / "typed.parquet")
    with pytest.raises(ValueError, match="typed.parquet: column 'I1' has type double, expected int32"):
        ParquetBatches([tmp_path / "typed.parquet"], SIZES, ReaderConfig())


@pytest.mark.parametrize("layout", ["nvtabular", "merlin"])
def test_layouts_met_in_the_wild_read_the_same(layout, tmp_path):
    _write(tmp_path / "d.parquet", rows=300)
    table = pq.read_table(tmp_path / "d.parquet")
    cols = {"label": table.column("label").cast(pa.int32())}
    for i, c in enumerate(DENSE_COLUMNS):
        cols[f"int_{i}" if layout == "nvtabular" else c] = table.column(c)
    for i, c in enumerate(SPARSE_COLUMNS):  # hashes stored as signed int32, as NVTabular and Merlin do
        raw = table.column(c).combine_chunks()
        mask = raw.is_null().to_numpy(zero_copy_only=False)
        as_int32 = pa.array(raw.fill_null(0).to_numpy().astype(np.uint32).view(np.int32), mask=mask)
        cols[f"cat_{i}" if layout == "nvtabular" else c] = as_int32
    pq.write_table(pa.table(cols), tmp_path / "wild.parquet")
    ours = list(ParquetBatches([tmp_path / "d.parquet"], SIZES, ReaderConfig(batch_size=100)))
    wild = list(ParquetBatches([tmp_path / "wild.parquet"], SIZES, ReaderConfig(batch_size=100)))
    for a, b in zip(ours, wild, strict=True):
        assert torch.equal(a.labels, b.labels) and torch.equal(a.dense_features, b.dense_features)
        assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
        assert torch.equal(a.sparse_features.lengths(), b.sparse_features.lengths())


def test_a_categorical_beyond_32_bits_is_an_error_not_masked(tmp_path):
    _write(tmp_path / "d.parquet", rows=300)
    table = pq.read_table(tmp_path / "d.parquet")
    cols = {"label": table.column("label").cast(pa.int32())}
    for i, c in enumerate(DENSE_COLUMNS):
        cols[f"int_{i}"] = table.column(c)
    for i, c in enumerate(SPARSE_COLUMNS):
        cols[f"cat_{i}"] = table.column(c).cast(pa.int64())
    wide = cols["cat_7"].to_pylist()
    wide[3] = 1 << 40
    cols["cat_7"] = pa.array(wide, pa.int64())
    pq.write_table(pa.table(cols), tmp_path / "wide.parquet")
    with pytest.raises(ValueError, match=r"wide\.parquet: row group 0, column 'cat_7': value 1099511627776 is not "
                                         r"a 32-bit hash"):
        list(ParquetBatches([tmp_path / "wide.parquet"], SIZES, ReaderConfig(batch_size=100, prefetch=0)))


def test_background_prefetch_changes_nothing_and_reports_errors(tmp_path):
    _write(tmp_path / "d.parquet")
    cfg = dict(batch_size=64, shuffle=True, seed=5)
    a = list(ParquetBatches([tmp_path / "d.parquet"], SIZES, ReaderConfig(**cfg, prefetch=0)))
    b = list(ParquetBatches([tmp_path / "d.parquet"], SIZES, ReaderConfig(**cfg, prefetch=3)))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.dense_features, y.dense_features)
        assert torch.equal(x.sparse_features.values(), y.sparse_features.values())
    data = ParquetBatches([tmp_path / "d.parquet"], SIZES, ReaderConfig(batch_size=64, prefetch=2))
    (tmp_path / "d.parquet").write_bytes(b"gone")  # the file changes under the reader
    with pytest.raises(ValueError, match=r"d\.parquet: row group 0 cannot be read .* changed or removed"):
        list(data)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux's /proc/self/fd")
@pytest.mark.parametrize("shuffle", [False, True])
def test_files_are_not_kept_open(tmp_path, shuffle):
    # An open Parquet reader keeps ~13 MB of buffers after a read: kept open, 20 part files of a 10 GiB day cost the
    # reader ~260 MB more than 3 files (bench.ingest), and a Terabyte folder has thousands.
    paths = [tmp_path / f"part-{i}.parquet" for i in range(6)]
    for i, path in enumerate(paths):
        _write(path, rows=200, seed=i)
    data = ParquetBatches(paths, SIZES, ReaderConfig(batch_size=50, shuffle=shuffle, prefetch=0))
    it = iter(data)
    next(itertools.islice(it, len(data) - 2, None))  # suspended inside the last file

    def open_parquet() -> list[str]:
        fds = Path("/proc/self/fd")
        return [t for t in (os.readlink(fds / fd) for fd in os.listdir(fds) if (fds / fd).is_symlink())
                if t.startswith(str(tmp_path))]

    assert open_parquet() == []
    assert sum(1 for _ in it) == 1 and open_parquet() == []


def _rows(batches) -> list[tuple]:
    """(label, dense, ids per feature) of every row, sorted: the multiset of what was read."""
    out = []
    for b in batches:
        jt = {f: v.to_dense() for f, v in b.sparse_features.to_dict().items()}
        for i in range(b.labels.numel()):
            out.append((b.labels[i].item(), tuple(b.dense_features[i].tolist()),
                        tuple(tuple(jt[f][i].tolist()) for f in FEATURE_NAMES)))
    return sorted(out)


@pytest.mark.parametrize("drop_last, shuffle", [(False, False), (True, False), (False, True)])
def test_dataloader_workers_split_the_rank_rows_exactly(tmp_path, drop_last, shuffle):
    _write(tmp_path / "d.parquet", rows=1003, row_group_size=100)
    cfg = ReaderConfig(batch_size=64, drop_last=drop_last, shuffle=shuffle, seed=1)
    for rank in range(2):
        data = ParquetBatches([tmp_path / "d.parquet"], SIZES, cfg, rank=rank, world_size=2)
        alone = list(data)
        loaded = list(torch.utils.data.DataLoader(data, batch_size=None, num_workers=2))
        assert len(loaded) == len(alone) == len(data)  # 501 rows: 7 full batches, and a short one unless dropped
        assert sum(b.labels.numel() for b in loaded) == (448 if drop_last else 501)
        assert [b.labels.numel() for b in loaded].count(64) == 7
        assert _rows(loaded) == _rows(alone)  # the same rows, none twice, none missing
        if not shuffle:  # the loader alternates workers; worker 1 reads batches 4.. (of 8, counting the short one)
            assert torch.equal(loaded[0].labels, alone[0].labels) and torch.equal(loaded[1].labels, alone[4].labels)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # more workers than this machine's cores
def test_more_workers_than_batches(tmp_path):
    _write(tmp_path / "d.parquet", rows=100, row_group_size=30)
    data = ParquetBatches([tmp_path / "d.parquet"], SIZES, ReaderConfig(batch_size=64))
    loaded = list(torch.utils.data.DataLoader(data, batch_size=None, num_workers=3))  # worker 0 reads nothing
    assert [b.labels.numel() for b in loaded] == [64, 36] and _rows(loaded) == _rows(data)

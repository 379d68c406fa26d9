"""Frequency-thresholded vocabulary: exact ids kept from a hand-made file with known counts, exact mapped ids."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dqrm.datasets.convert import main as convert
from dqrm.datasets.reader import ParquetBatches, ReaderConfig
from dqrm.datasets.schema import FEATURE_NAMES, SCHEMA, SPARSE_COLUMNS
from dqrm.datasets.vocab import count_ids, lookup, vocab_num_embeddings

# Seven rows; with --split kaggle rows 1-6 are train, row 7 is test (val gets none).
# C1 in train: 0000000a x3, 000000ff x2, deadbeef x1 (and once more in the test row, which must not count).
# C2: ffffffff everywhere except a missing value in row 3. C3..C26: 00000001 in every row.
C1 = ["0000000a", "0000000a", "000000ff", "deadbeef", "0000000A", "000000ff", "deadbeef"]
C2 = ["ffffffff", "ffffffff", "", "ffffffff", "ffffffff", "ffffffff", "ffffffff"]


def _tsv(path):
    lines = []
    for i, (c1, c2) in enumerate(zip(C1, C2)):
        fields = [str(i % 2)] + [str(i)] * 13 + [c1, c2] + ["00000001"] * 24
        lines.append("\t".join(fields))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("min_count, c1_vocab", [(2, [0xA, 0xFF]), (1, [0xA, 0xFF, 0xDEADBEEF])])
def test_vocabulary_keeps_ids_seen_often_enough_in_train(tmp_path, min_count, c1_vocab):
    out = tmp_path / "o"
    assert convert([str(_tsv(tmp_path / "train.txt")), "--out", str(out), "--split", "kaggle", "--workers", "1",
                    "--vocab-min-count", str(min_count)]) == 0
    v1 = np.load(out / "vocab" / "C1.npy")
    assert v1.dtype == np.uint32 and v1.tolist() == c1_vocab
    assert np.load(out / "vocab" / "C2.npy").tolist() == [0xFFFFFFFF]
    assert all(np.load(out / "vocab" / f"{c}.npy").tolist() == [1] for c in SPARSE_COLUMNS[2:])
    sizes = [len(c1_vocab) + 1, 2] + [2] * 24
    assert vocab_num_embeddings(out / "vocab") == sizes
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["vocab"]["num_embeddings"] == sizes and manifest["vocab"]["sizes"]["C1"] == len(c1_vocab)
    assert manifest["vocab"]["from"] == ["train.parquet"] and manifest["vocab"]["min_count"] == min_count

    cfg = ReaderConfig(batch_size=100, vocab_dir=str(out / "vocab"))
    (train,) = ParquetBatches([out / "train.parquet"], sizes, cfg)
    (test,) = ParquetBatches([out / "test.parquet"], sizes, cfg)
    rank = {v: i + 1 for i, v in enumerate(c1_vocab)}  # index in the sorted vocabulary + 1, else 0
    ids = {f: (t.values().tolist(), t.lengths().tolist()) for f, t in train.sparse_features.to_dict().items()}
    assert ids["cat_0"] == ([rank.get(int(c, 16), 0) for c in C1[:6]], [1] * 6)
    assert ids["cat_1"] == ([1, 1, 0, 1, 1, 1], [1] * 6)  # the missing value is id 0, not an empty bag
    assert all(ids[f] == ([1] * 6, [1] * 6) for f in FEATURE_NAMES[2:])
    assert test.sparse_features["cat_0"].values().tolist() == [rank.get(0xDEADBEEF, 0)]
    # without vocab_dir the ids stay hashes modulo the table size, missing values empty bags
    (hashed,) = ParquetBatches([out / "train.parquet"], sizes, ReaderConfig(batch_size=100))
    assert hashed.sparse_features["cat_1"].lengths().tolist() == [1, 1, 0, 1, 1, 1]
    assert hashed.sparse_features["cat_0"].values().tolist() == [int(c, 16) % sizes[0] for c in C1[:6]]


def test_vocabulary_over_existing_outputs_and_too_small_tables(tmp_path, capsys):
    out = tmp_path / "o"
    assert convert([str(_tsv(tmp_path / "day.tsv")), "--out", str(out), "--workers", "1"]) == 0
    assert convert(["--out", str(out), "--vocab-min-count", "2", "--vocab-from", "train"]) == 1
    assert "no train.parquet" in capsys.readouterr().err
    assert convert(["--out", str(out), "--vocab-min-count", "2", "--vocab-from", "day", "--workers", "2"]) == 0
    assert np.load(out / "vocab" / "C1.npy").tolist() == [0xA, 0xFF, 0xDEADBEEF]  # all 7 rows count here
    assert "set model.num_embeddings to:\n4,2,2" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"too small.*'cat_0', 3, 4"):
        ParquetBatches([out / "day.parquet"], [3] + [2] * 25, ReaderConfig(vocab_dir=str(out / "vocab")))


def test_counts_merge_across_row_groups_and_files(tmp_path):
    rng = np.random.default_rng(0)
    raw = [rng.integers(0, 50, 1000).astype(np.uint32) * np.uint32(80_000_000) for _ in range(2)]
    files = []
    for k, r in enumerate(raw):
        mask = rng.random(len(r)) < 0.1
        cols = {c: pa.array(np.zeros(len(r), np.uint32)) for c in SPARSE_COLUMNS}
        cols["C5"] = pa.array(r, mask=mask)
        cols = {"label": pa.array(np.zeros(len(r), np.int8)),
                **{f"I{i}": pa.array(np.zeros(len(r), np.int32)) for i in range(1, 14)}, **cols}
        pq.write_table(pa.table(cols, schema=SCHEMA), tmp_path / f"{k}.parquet", row_group_size=64)
        files.append(tmp_path / f"{k}.parquet")
        raw[k] = r[~mask]
    expected_ids, expected_counts = np.unique(np.concatenate(raw), return_counts=True)
    for merge_at in (1, 100, 1 << 22):  # merging after every row group, now and then, once at the end
        ids, counts = count_ids(files, 4, merge_at=merge_at)
        assert ids.dtype == np.uint32 and ids.tolist() == expected_ids.tolist()
        assert counts.tolist() == expected_counts.tolist()


def test_lookup():
    vocab = np.array([3, 7, 4_000_000_000], dtype=np.uint32)
    raw = np.array([7, 3, 5, 0, 4_000_000_000, 4_294_967_295], dtype=np.uint32)
    assert lookup(vocab, raw).tolist() == [2, 1, 0, 0, 3, 0]
    assert lookup(np.empty(0, np.uint32), raw).tolist() == [0] * 6

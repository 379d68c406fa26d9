"""The synthetic default data: deterministic, Criteo-shaped, with its best achievable metrics recorded."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from dqrm.datasets.schema import DENSE_COLUMNS, SCHEMA, SPARSE_COLUMNS
from dqrm.datasets.synthetic import SyntheticConfig, ensure_synthetic

CARDS = (3, 4, 10, 14, 24, 27, 60, 100, 200, 300, 600, 1000, 1500, 2500, 5000, 8000, 10000, 20000, 40000, 90000,
         150000, 300000, 500000, 800000, 1000000, 1000000)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    cfg = SyntheticConfig(num_train=60_000, num_val=5000, num_test=5000, cardinalities=CARDS, row_group_size=20_000)
    return cfg, ensure_synthetic(cfg, tmp_path_factory.mktemp("a")), ensure_synthetic(cfg, tmp_path_factory.mktemp("b"))


def test_same_config_same_bytes_and_cache_reuse(generated):
    cfg, a, b = generated
    for split in ("train", "val", "test"):
        assert (a / f"{split}.parquet").read_bytes() == (b / f"{split}.parquet").read_bytes()
    mtime = (a / "train.parquet").stat().st_mtime_ns
    assert ensure_synthetic(cfg, a.parent) == a and (a / "train.parquet").stat().st_mtime_ns == mtime
    other = SyntheticConfig(num_train=60_000, num_val=5000, num_test=5000, cardinalities=CARDS, seed=99)
    assert other.key() != cfg.key()


def test_criteo_shape(generated):
    cfg, root, _ = generated
    table = pq.read_table(root / "train.parquet")
    assert table.schema.equals(SCHEMA)
    assert pq.ParquetFile(root / "train.parquet").metadata.num_row_groups == 3
    labels = table.column("label").to_numpy()
    assert 0.2 < labels.mean() < 0.3  # Criteo Kaggle's CTR is about 0.25
    # Missing values in both kinds of features, heavy-tailed counts, some negative counts.
    assert sum(table.column(c).null_count for c in DENSE_COLUMNS) > 0.05 * len(table) * len(DENSE_COLUMNS)
    assert sum(table.column(c).null_count for c in SPARSE_COLUMNS) > 0
    dense = np.concatenate([table.column(c).drop_null().to_numpy() for c in DENSE_COLUMNS])
    assert dense.min() < 0 and dense.max() > 1000 * np.median(np.maximum(dense, 1))
    for c, card in zip(SPARSE_COLUMNS, CARDS):
        ids = table.column(c).drop_null().to_numpy()
        assert ids.max() < card
    # Zipf-like: in the largest table, the most frequent id is far above average and most ids are rare.
    ids = table.column("C26").drop_null().to_numpy()
    counts = np.bincount(ids, minlength=CARDS[-1])
    seen = counts[counts > 0]
    assert counts.max() > 100 * seen.mean()
    assert (seen == 1).mean() > 0.5


def test_bayes_metrics_recorded(generated):
    _, root, _ = generated
    meta = json.loads((root / "meta.json").read_text())
    for split in ("train", "val", "test"):
        best = meta["splits"][split]["bayes"]
        assert 0.7 < best["auc"] < 1.0 and 0 < best["logloss"] < 0.6


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="26 entries"):
        SyntheticConfig(cardinalities=(10, 20))
    with pytest.raises(ValueError, match="base_ctr"):
        SyntheticConfig(base_ctr=1.5)

"""The bundled default dataset: deterministic Criteo-shaped click logs from a hidden ground-truth model.

No library generates data that overfits like Criteo, so this is written here. What makes it Criteo-like:

* 13 heavy-tailed integer counts (log-normal, a few with negative values as in Criteo's I2), each missing at its
  own rate;
* 26 categorical features whose ids follow Zipf laws over cardinalities from 3 to 1,000,000, some missing;
* labels drawn from ``sigmoid(logit)`` of a hidden model: a per-id effect for every table (so the long tail of rare
  ids carries signal that can only be memorized from a few noisy labels, the cause of DLRM's overfitting after one
  or two epochs), pairwise dot-product interactions between some tables, and a non-linear dense part.

Because the true click probability of each row is known, the best achievable (Bayes) AUC, accuracy and log loss
of each split are computed and stored next to the data in ``meta.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dqrm.datasets.schema import DENSE_COLUMNS, LABEL, NUM_DENSE, SCHEMA, SPARSE_COLUMNS

log = logging.getLogger(__name__)

# From a handful to a million, like Criteo's spread (REFERENCE.md §3): 12 tables above 100k ids (Kaggle has 7).
DEFAULT_CARDINALITIES = (
    3, 4, 10, 14, 24, 27, 60, 100, 300, 1000, 3000, 10000, 30000,
    100000, 200000, 300000, 400000, 500000, 600000, 700000, 800000, 900000, 1000000, 1000000, 500000, 300000,
)
SPLITS = ("train", "val", "test")
_FORMAT_VERSION = 1


@dataclasses.dataclass(kw_only=True)
class SyntheticConfig:
    """Shape of the generated dataset; every field changes the data, so all of them key the cache."""

    num_train: int = 600_000
    """Rows in the training split."""
    num_val: int = 50_000
    """Rows in the validation split."""
    num_test: int = 200_000
    """Rows in the test split (large enough that 0.1 accuracy points are above sampling noise)."""
    cardinalities: tuple[int, ...] = DEFAULT_CARDINALITIES
    """Number of distinct ids of each of the 26 categorical features."""
    zipf_exponent: float = 0.95
    """Exponent of the Zipf law the ids are drawn from (larger = fewer rare ids)."""
    id_effect_scale: float = 0.6
    """Standard deviation of the hidden per-id logit effect in tables of at most head_cardinality ids."""
    tail_effect_scale: float = 0.05
    """Standard deviation of the per-id effect in larger tables: weak signal, much memorizable noise."""
    head_cardinality: int = 100
    """Tables up to this size carry the strong, quickly learned signal."""
    interaction_dim: int = 4
    """Width of the hidden factor vectors behind the pairwise interactions."""
    base_ctr: float = 0.25
    """Approximate click-through rate."""
    row_group_size: int = 65_536
    """Rows per Parquet row group."""
    seed: int = 1234
    """Seed of the generator; the same config always writes the same bytes."""

    def __post_init__(self) -> None:
        self.cardinalities = tuple(self.cardinalities)
        if len(self.cardinalities) != len(SPARSE_COLUMNS):
            raise ValueError(f"cardinalities needs {len(SPARSE_COLUMNS)} entries, got {len(self.cardinalities)}")
        if min(self.cardinalities) < 1 or max(self.cardinalities) >= 2**32:
            raise ValueError("every cardinality must be in [1, 2**32)")
        for name in ("num_train", "num_val", "num_test", "row_group_size", "interaction_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 < self.base_ctr < 1.0:
            raise ValueError(f"base_ctr must be in (0, 1), got {self.base_ctr}")
        if self.zipf_exponent <= 0:
            raise ValueError(f"zipf_exponent must be positive, got {self.zipf_exponent}")

    def key(self) -> str:
        blob = json.dumps([_FORMAT_VERSION, dataclasses.asdict(self)], sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


class _HiddenModel:
    """The ground truth: per-id effects, factor vectors for interacting tables, dense response curves."""

    def __init__(self, cfg: SyntheticConfig, rng: np.random.Generator) -> None:
        self.cfg = cfg
        n = len(cfg.cardinalities)
        # Small tables carry strong signal learned within an epoch; the long tail of the large tables carries weak
        # signal, so memorizing its rare ids from a few noisy labels is what makes a DLRM overfit.
        scales = np.where(np.array(cfg.cardinalities) <= cfg.head_cardinality, cfg.id_effect_scale,
                          cfg.tail_effect_scale)
        self.effects = [rng.normal(0.0, s, c).astype(np.float32) for s, c in zip(scales, cfg.cardinalities)]
        self.missing_effect = rng.normal(0.0, 0.3, n).astype(np.float32)
        # Zipf ranks are shuffled so that frequent ids are spread over the id space, like hashes.
        self.perms = [rng.permutation(c).astype(np.int64) for c in cfg.cardinalities]
        self.cdfs = []
        for c in cfg.cardinalities:
            w = 1.0 / np.arange(1, c + 1, dtype=np.float64) ** cfg.zipf_exponent
            self.cdfs.append(np.cumsum(w) / w.sum())
        self.cat_missing = np.where(rng.random(n) < 0.3, rng.uniform(0.05, 0.45, n), 0.0)
        k = cfg.interaction_dim
        head = np.flatnonzero(np.array(cfg.cardinalities) <= cfg.head_cardinality)
        self.pairs = [(int(a), int(b)) for a, b in rng.choice(head, size=(10, 2)) if a != b]
        inter_tables = sorted({t for p in self.pairs for t in p})
        self.factors = {t: rng.normal(0.0, 0.6 / np.sqrt(k), (cfg.cardinalities[t], k)).astype(np.float32)
                        for t in inter_tables}
        self.dense_mu = rng.uniform(0.0, 4.0, NUM_DENSE)
        self.dense_sigma = rng.uniform(0.7, 2.0, NUM_DENSE)
        self.dense_shift = np.where(rng.random(NUM_DENSE) < 0.2, 3, 0)  # a few columns go negative
        self.dense_missing = rng.uniform(0.0, 0.45, NUM_DENSE)
        self.dense_weight = rng.normal(0.0, 0.5, NUM_DENSE)
        self.dense_center = rng.uniform(0.5, 3.0, NUM_DENSE)
        self.bias = 0.0
        self.bias = self._calibrate_bias(cfg.base_ctr, np.random.default_rng(cfg.seed + 1))

    def _calibrate_bias(self, ctr: float, rng: np.random.Generator) -> float:
        """The intercept that gives the requested click-through rate (bisection on a calibration sample)."""
        _, logit = self._draw(50_000, rng)
        lo, hi = -20.0, 20.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if np.mean(1.0 / (1.0 + np.exp(-(logit + mid)))) < ctr:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    def sample(self, rows: int, rng: np.random.Generator) -> tuple[pa.Table, np.ndarray]:
        columns, logit = self._draw(rows, rng)
        prob = 1.0 / (1.0 + np.exp(-(logit + self.bias)))
        labels = (rng.random(rows) < prob).astype(np.int8)
        table = pa.table({LABEL: pa.array(labels), **columns}, schema=SCHEMA)
        return table, prob

    def _draw(self, rows: int, rng: np.random.Generator) -> tuple[dict[str, pa.Array], np.ndarray]:
        logit = np.zeros(rows, dtype=np.float64)
        columns: dict[str, pa.Array] = {}
        for j, name in enumerate(DENSE_COLUMNS):
            x = np.floor(np.exp(rng.normal(self.dense_mu[j], self.dense_sigma[j], rows))) - self.dense_shift[j]
            x = np.minimum(x, 2**31 - 1).astype(np.int32)
            missing = rng.random(rows) < self.dense_missing[j]
            z = np.log1p(np.maximum(x, 0).astype(np.float64))
            logit += np.where(missing, 0.1, self.dense_weight[j] * np.tanh(z - self.dense_center[j]))
            columns[name] = pa.array(x, mask=missing)
        ids = []
        for t, name in enumerate(SPARSE_COLUMNS):
            idx = self.perms[t][np.searchsorted(self.cdfs[t], rng.random(rows), side="right").clip(
                max=len(self.perms[t]) - 1)]
            missing = rng.random(rows) < self.cat_missing[t]
            logit += np.where(missing, self.missing_effect[t], self.effects[t][idx])
            ids.append((idx, missing))
            columns[name] = pa.array(idx.astype(np.uint32), mask=missing)
        for a, b in self.pairs:
            (ia, ma), (ib, mb) = ids[a], ids[b]
            dot = np.einsum("ij,ij->i", self.factors[a][ia], self.factors[b][ib])
            logit += np.where(ma | mb, 0.0, dot)
        return columns, logit


def bayes_metrics(prob: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Metrics of the true click probabilities: the best any model can score on this split."""
    import torch
    from torchmetrics.functional.classification import binary_auroc

    p = torch.from_numpy(prob)
    y = torch.from_numpy(labels.astype(np.int64))
    eps = 1e-12
    logloss = -(y * torch.log(p + eps) + (1 - y) * torch.log(1 - p + eps)).mean()
    return {
        "auc": float(binary_auroc(p, y)),
        "accuracy": float(((p >= 0.5).long() == y).double().mean()),
        "logloss": float(logloss),
        "ctr": float(y.double().mean()),
    }


def default_cache_dir() -> Path:
    if "DQRM_CACHE_DIR" in os.environ:
        return Path(os.environ["DQRM_CACHE_DIR"])
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "datasets").is_dir():  # a source checkout (make env)
        return checkout / ".cache"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dqrm"  # an installed dqrm


def ensure_synthetic(cfg: SyntheticConfig, cache_dir: Path | None = None) -> Path:
    """Generate the dataset for ``cfg`` once and return its folder (``train/val/test.parquet`` + ``meta.json``)."""
    root = (cache_dir or default_cache_dir()) / f"synthetic-{cfg.key()}"
    if (root / "meta.json").exists():
        return root
    tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    model = _HiddenModel(cfg, rng)
    meta: dict = {"config": dataclasses.asdict(cfg), "format_version": _FORMAT_VERSION, "splits": {}}
    for split, rows in zip(SPLITS, (cfg.num_train, cfg.num_val, cfg.num_test)):
        log.info("generating synthetic %s split: %d rows -> %s", split, rows, root)
        writer = pq.ParquetWriter(tmp / f"{split}.parquet", SCHEMA)
        probs, labels = [], []
        for start in range(0, rows, cfg.row_group_size):
            n = min(cfg.row_group_size, rows - start)
            table, prob = model.sample(n, rng)
            writer.write_table(table, row_group_size=cfg.row_group_size)
            probs.append(prob)
            labels.append(table.column(LABEL).to_numpy())
        writer.close()
        meta["splits"][split] = {"rows": rows, "bayes": bayes_metrics(np.concatenate(probs), np.concatenate(labels))}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    try:
        tmp.rename(root)
    except OSError:  # another rank or process finished first; its copy is identical
        if not (root / "meta.json").exists():
            raise
    return root


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Generate (or locate) the bundled synthetic Criteo-shaped dataset.")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where datasets are cached (default: .cache/)")
    parser.add_argument("--num-train", type=int, default=SyntheticConfig.num_train, help="training rows")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    root = ensure_synthetic(SyntheticConfig(num_train=args.num_train), args.cache_dir)
    meta = json.loads((root / "meta.json").read_text())
    print(root)
    for split, info in meta["splits"].items():
        b = info["bayes"]
        print(f"{split:5s} rows={info['rows']:>9,d} ctr={b['ctr']:.4f} best AUC={b['auc']:.4f} "
              f"best acc={b['accuracy']:.4f} best logloss={b['logloss']:.4f}")


if __name__ == "__main__":
    main()

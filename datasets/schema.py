"""The project's Parquet layout for Criteo-shaped click logs, shared by the generator, the converter and the reader.

One row per impression::

    label  int8    0/1, never null
    I1..I13 int32  raw integer counts (may be negative), null = missing
    C1..C26 uint32 the 32-bit categorical hash as an unsigned integer, null = missing

The reader also takes the two layouts met in the wild, detected from the schema: TorchRec/NVTabular stage 1
(``label, int_0..int_12, cat_0..cat_25``, int32, hashes as signed int32) and Merlin (``label, I1..I13, C1..C26``,
int32, hashes as signed int32).

Conventions (documented in the README):

* dense transform: ``log(1 + max(x, 0))`` (the DLRM reference), missing -> 0;
* categorical id of table ``t``: ``hash % num_embeddings[t]``; a missing value is an empty bag
  (length 0 in the ``KeyedJaggedTensor``), so it pools to the zero vector. With a vocabulary
  (``ReaderConfig.vocab_dir``, ``datasets.vocab``): the hash's index in it + 1, and 0 for out-of-vocabulary and
  missing values.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pyarrow as pa

NUM_DENSE = 13
NUM_SPARSE = 26
LABEL = "label"
DENSE_COLUMNS = [f"I{i}" for i in range(1, NUM_DENSE + 1)]
SPARSE_COLUMNS = [f"C{i}" for i in range(1, NUM_SPARSE + 1)]
# Feature names used in the KeyedJaggedTensor and the EmbeddingBagConfigs.
FEATURE_NAMES = [f"cat_{i}" for i in range(NUM_SPARSE)]

SCHEMA = pa.schema(
    [pa.field(LABEL, pa.int8(), nullable=False)]
    + [pa.field(c, pa.int32()) for c in DENSE_COLUMNS]
    + [pa.field(c, pa.uint32()) for c in SPARSE_COLUMNS]
)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Column names of one Parquet layout and how its categorical hashes are stored."""

    name: str
    label: str
    dense: tuple[str, ...]
    sparse: tuple[str, ...]
    signed_hash: bool  # hashes stored as signed int32: recover the 32-bit value with `v & 0xffffffff`

    def hashes(self, values: np.ndarray) -> np.ndarray:
        """The 32-bit categorical hashes (uint32) of a column's stored integer values."""
        raw = values.astype(np.int64)
        if self.signed_hash and raw.size and (raw.min() < -(1 << 31) or raw.max() >= 1 << 32):
            bad = raw[(raw < -(1 << 31)) | (raw >= 1 << 32)][0]
            raise ValueError(f"value {int(bad)} is not a 32-bit hash (signed or unsigned); it would lose bits")
        return (raw & 0xFFFFFFFF if self.signed_hash else raw).astype(np.uint32)


PROJECT = Layout("dqrm", LABEL, tuple(DENSE_COLUMNS), tuple(SPARSE_COLUMNS), signed_hash=False)
NVTABULAR = Layout("torchrec/nvtabular", "label", tuple(f"int_{i}" for i in range(NUM_DENSE)),
                   tuple(f"cat_{i}" for i in range(NUM_SPARSE)), signed_hash=True)
MERLIN = Layout("merlin", "label", tuple(DENSE_COLUMNS), tuple(SPARSE_COLUMNS), signed_hash=True)


def detect_layout(schema: pa.Schema, path: str) -> Layout:
    """Which of the three known layouts a file has (by its columns and types); errors name the file and column."""
    if "int_0" in schema.names:
        layout = NVTABULAR
    elif SPARSE_COLUMNS[0] in schema.names and schema.field(SPARSE_COLUMNS[0]).type == pa.int32():
        layout = MERLIN
    else:
        check_schema(schema, path)
        return PROJECT
    for name in (layout.label, *layout.dense, *layout.sparse):
        idx = schema.get_field_index(name)
        if idx < 0:
            raise ValueError(f"{path}: column {name!r} is missing ({layout.name} layout detected)")
        if not pa.types.is_integer(schema.field(idx).type):
            raise ValueError(f"{path}: column {name!r} has type {schema.field(idx).type}, expected an integer "
                             f"({layout.name} layout)")
    return layout


def check_schema(schema: pa.Schema, path: str) -> None:
    """Raise ``ValueError`` naming the file and the first column that does not match the project's layout."""
    for field in SCHEMA:
        idx = schema.get_field_index(field.name)
        if idx < 0:
            raise ValueError(
                f"{path}: column {field.name!r} is missing; expected the dqrm layout "
                f"(label, I1..I13, C1..C26); convert raw Criteo with `python -m dqrm.datasets.convert`"
            )
        got = schema.field(idx).type
        if got != field.type:
            raise ValueError(f"{path}: column {field.name!r} has type {got}, expected {field.type}")


def parquet_files(root: Path, name: str) -> list[Path]:
    """The files of one output of the converter under ``root``: ``NAME.parquet``, else every ``*.parquet`` below the
    folder ``NAME/`` (nested folders too, e.g. ``train/day_3/part-00000.parquet``) in natural order of their paths
    (``day_2`` before ``day_10``, parts in line order), so every rank sees the same order. Raises
    ``FileNotFoundError`` when there is neither."""
    single, folder = root / f"{name}.parquet", root / name
    if single.is_file():
        return [single]
    files = sorted(folder.rglob("*.parquet"), key=lambda p: _natural(p.relative_to(folder))) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{root}: no {name}.parquet or {name}/*.parquet; convert raw Criteo first with "
                                f"`python -m dqrm.datasets.convert`")
    return files


def _natural(path: Path) -> list[list]:
    # re.split with a group alternates text and digit runs, so equal positions always hold comparable types
    return [[int(s) if i % 2 else s for i, s in enumerate(re.split(r"(\d+)", part))] for part in path.parts]

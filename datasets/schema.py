"""The project's Parquet layout for Criteo-shaped click logs, shared by the generator, the converter and the reader.

One row per impression::

    label  int8    0/1, never null
    I1..I13 int32  raw integer counts (may be negative), null = missing
    C1..C26 uint32 the 32-bit categorical hash as an unsigned integer, null = missing

Conventions (documented in the README):

* dense transform: ``log(1 + max(x, 0))`` (the DLRM reference), missing -> 0;
* categorical id of table ``t``: ``hash % num_embeddings[t]``; a missing value is an empty bag
  (length 0 in the ``KeyedJaggedTensor``), so it pools to the zero vector.
"""

from __future__ import annotations

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


def check_schema(schema: pa.Schema, path: str) -> None:
    """Raise ``ValueError`` naming the file and the first column that does not match the project's layout."""
    for field in SCHEMA:
        idx = schema.get_field_index(field.name)
        if idx < 0:
            raise ValueError(
                f"{path}: column {field.name!r} is missing; expected the dqrm layout "
                f"(label, I1..I13, C1..C26); convert raw Criteo with `python -m datasets.convert`"
            )
        got = schema.field(idx).type
        if got != field.type:
            raise ValueError(f"{path}: column {field.name!r} has type {got}, expected {field.type}")

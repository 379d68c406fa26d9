"""Clean blocks of Criteo TSV -> Arrow columns in one compiled pass over the bytes (numba).

Arrow's CSV reader splits a line into 40 strings and ``datasets.criteo_text`` then converts each string column;
together they ran at about 3 us a row, ten times TorchRec's ``tsv_to_npys`` and well short of what a
converter of 4 billion rows needs. Real Criteo lines are regular (40 tab-separated fields, counts of a few digits,
hashes of exactly 8 hex digits or empty), so a block made only of such lines is parsed here in one loop over its
bytes, about 0.2 us a row: a label ``0``/``1``, 13 counts (``-?[0-9]+`` within int32, or empty), 26 hashes
(8 characters of ``[0-9a-fA-F]``, or empty), tabs between, a newline at the end (39 fields without the label).

Anything else (a wrong field count, a carriage return, a count beyond int32, a bad digit, a 7-character hash)
makes :func:`parse_tsv_block` return None, and the caller hands that block to Arrow's reader and the general
checks, which name the line and field or skip the row as asked: this path never decides that a row is bad.
Written for this project: neither TorchRec nor Arrow has a Criteo-specific parser. Kept because it pays:
0.17 us a row against 1.41 us through Arrow's reader and the fast column decoders (``bench/results/parse_paths.txt``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from numba import njit

from dqrm.datasets.schema import NUM_DENSE, NUM_SPARSE, SCHEMA

PAD = 8
"""Zero bytes after the lines (and before, for symmetry) in a block buffer: the hash loop reads 9 bytes ahead."""

_INT32_MAX = 2**31 - 1

HEX = np.full(256, 255, dtype=np.uint8)
"""Value of each byte as a hex digit, 255 for a byte that is not one (shared with ``datasets.criteo_text``)."""
for _i, _c in enumerate(b"0123456789abcdef"):
    HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    HEX[_c] = 10 + _i


@njit(cache=True, nogil=True)
def _parse(buf, start, stop, labeled, label, dense, dense_ok, sparse, sparse_ok):  # pragma: no cover - compiled
    """Rows parsed from ``buf[start:stop]`` into the output arrays (columns first), or -1 at the first byte that
    is not a clean Criteo line. ``buf[stop:]`` must hold at least 9 bytes that are not tabs or newlines."""
    n = 0
    i = start
    while i < stop:
        if n == label.shape[0]:
            return -1
        if labeled:
            c = buf[i]
            if (c != 48 and c != 49) or buf[i + 1] != 9:
                return -1
            label[n] = c - 48
            i += 2
        else:
            label[n] = 0
        for j in range(NUM_DENSE):
            c = buf[i]
            neg = c == 45  # '-'
            if neg:
                i += 1
                c = buf[i]
            v = 0
            digits = 0
            while 48 <= c <= 57:
                v = v * 10 + (c - 48)
                digits += 1
                if digits > 10:
                    return -1
                i += 1
                c = buf[i]
            if c != 9:
                return -1
            if digits == 0:
                if neg:
                    return -1
                dense[j, n] = 0
                dense_ok[j, n] = False
            else:
                if v > _INT32_MAX + neg:
                    return -1
                dense[j, n] = -v if neg else v
                dense_ok[j, n] = True
            i += 1
        for j in range(NUM_SPARSE):
            end = 10 if j == NUM_SPARSE - 1 else 9  # newline after the last field, tabs between
            if buf[i] == end:
                sparse[j, n] = 0
                sparse_ok[j, n] = False
                i += 1
                continue
            v = 0
            for k in range(8):
                h = HEX[buf[i + k]]
                if h == 255:
                    return -1
                v = (v << 4) | h
            if buf[i + 8] != end:
                return -1
            sparse[j, n] = v
            sparse_ok[j, n] = True
            i += 9
        n += 1
    return n


def _columns(values: np.ndarray, valid: np.ndarray, typ: pa.DataType, n: int) -> list[pa.Array]:
    bits = np.packbits(valid, axis=1, bitorder="little")
    complete = valid.all(axis=1)
    return [pa.Array.from_buffers(typ, n, [None if complete[j] else pa.py_buffer(bits[j]), pa.py_buffer(values[j])])
            for j in range(values.shape[0])]


def parse_tsv_block(buf: np.ndarray, labeled: bool) -> pa.Table | None:
    """The rows of ``buf`` (uint8: ``PAD`` bytes, whole lines each ending in a newline, ``PAD`` zero bytes) in the
    project schema, or None when the block is not clean (see the module help); unlabeled lines get label 0."""
    start, stop = PAD, len(buf) - PAD
    # Capacity is the block's line count, not its bytes over the shortest possible line (40): the columns stay
    # referenced until their row group is written, and that bound reserved 6x what real (~240-byte) lines fill.
    cap = int(np.count_nonzero(buf[start:stop] == 10))
    label = np.empty(cap, dtype=np.int8)
    dense, dense_ok = np.empty((NUM_DENSE, cap), dtype=np.int32), np.empty((NUM_DENSE, cap), dtype=np.bool_)
    sparse, sparse_ok = np.empty((NUM_SPARSE, cap), dtype=np.uint32), np.empty((NUM_SPARSE, cap), dtype=np.bool_)
    n = _parse(buf, start, stop, labeled, label, dense, dense_ok, sparse, sparse_ok)
    if n <= 0:
        return None
    columns = [pa.Array.from_buffers(pa.int8(), n, [None, pa.py_buffer(label[:n])])]
    columns += _columns(dense[:, :n], dense_ok[:, :n], pa.int32(), n)
    columns += _columns(sparse[:, :n], sparse_ok[:, :n], pa.uint32(), n)
    return pa.Table.from_arrays(columns, schema=SCHEMA)

"""Clean blocks of Criteo TSV -> Arrow columns in one numpy pass each, no Arrow tokenizer and no per-row Python.

Arrow's CSV reader splits a line into 40 strings and ``datasets.criteo_text`` then converts each string column;
both passes cost about as much as each other, and together they kept the converter under half the speed it can
reach. Real Criteo lines are regular (40 tab-separated fields, counts of a few digits, hashes of exactly 8 hex
digits or empty), so a block made only of such lines is parsed here straight from its bytes:

1. every byte below 32 is a delimiter; the block is clean when there are ``fields`` of them per line, all tabs but
   the last, a newline (so a field never holds a byte below 32);
2. a count (at most 8 characters, an optional ``-``) is read as the 8 bytes that end where it ends, the bytes
   before its start replaced by ``'0'``, checked and summed as 8 decimal digits in one uint64 (SWAR);
3. a hash is read as the 8 bytes where it starts, checked and packed as 8 hex digits in one uint64 (SWAR).

Anything else (a wrong field count, a carriage return, a longer count, a bad digit, a label other than 0/1) makes
:func:`parse_tsv_block` return None, and the caller hands that block to Arrow's reader and the general checks,
which name the line and field or skip the row as asked: the fast path never decides that a row is bad. Written
for this project: neither TorchRec nor Arrow has a Criteo-specific parser.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from datasets.schema import SCHEMA

PAD = 8
"""Bytes before and after the lines in a block buffer, so every 8-byte read stays inside it."""

_U64 = np.uint64
_ASCII0 = _U64(0x3030303030303030)
_HIGH = _U64(0xF0F0F0F0F0F0F0F0)
_LOW = _U64(0x0F0F0F0F0F0F0F0F)
_ONES = _U64(0x0101010101010101)
_SIX = _U64(0x0606060606060606)
_LOWER = _U64(0x2020202020202020)
# A count of L characters is the last L of the 8 bytes read: keep those, and '0' the 8 - L bytes before them.
_KEEP = np.array([0] + [(2**64 - 1) ^ ((1 << 8 * (8 - n)) - 1) for n in range(1, 9)], dtype=np.uint64)
_ZERO_PAD = _ASCII0 & ~_KEEP
_FIRST = np.array([0] + [8 * (8 - n) for n in range(1, 9)], dtype=np.uint64)  # bit offset of the first character
_MAX_COUNT_CHARS = 8
_HEX_CHARS = 8


def _array(values: np.ndarray, valid_bits: np.ndarray | None, typ: pa.DataType, n: int) -> pa.Array:
    return pa.Array.from_buffers(typ, n, [None if valid_bits is None else pa.py_buffer(valid_bits),
                                          pa.py_buffer(values)])


def _counts(x: np.ndarray, lengths: np.ndarray) -> np.ndarray | None:
    """int32 values of right-aligned decimal fields (8 bytes ending at each field's end), or None if any is not
    ``-?[0-9]+`` of at most 8 characters (empty fields read as 0)."""
    x &= _KEEP[lengths]
    x |= _ZERO_PAD[lengths]
    first = _FIRST[lengths]
    neg = ((x >> first) & _U64(0xFF)) == _U64(ord("-"))
    if neg.any():
        if (neg & (lengths == 1)).any():  # a lone '-'
            return None
        x += (neg.astype(np.uint64) * _U64(ord("0") - ord("-"))) << first
    if not (((x & _HIGH) == _ASCII0) & (((x + _SIX) & _HIGH) == _ASCII0)).all():  # bytes '0'..'9' only
        return None
    x -= _ASCII0  # digits, the most significant in the lowest byte
    x = (x * _U64(10) + (x >> _U64(8))) & _U64(0x00FF00FF00FF00FF)
    x = (x * _U64(100) + (x >> _U64(16))) & _U64(0x0000FFFF0000FFFF)
    x = (x * _U64(10000) + (x >> _U64(32))) & _U64(0xFFFFFFFF)
    values = x.astype(np.int32)
    if neg.any():
        np.negative(values, out=values, where=neg)
    return values


def _hashes(x: np.ndarray, present: np.ndarray) -> np.ndarray | None:
    """uint32 values of 8-hex-digit fields read as uint64 (first character in the lowest byte), or None if a
    present field holds a byte other than ``[0-9a-fA-F]``. Correct for bytes of 32 and above, which is all a
    field holds once the block's delimiters are checked."""
    nib = x & _LOW
    t = x >> _U64(6)
    t &= _ONES
    t *= _U64(9)
    nib += t  # letters: low nibble + 9
    np.add(nib, _SIX, out=t)
    t >>= _U64(4)
    t &= _ONES
    t *= _U64(0x27)
    t += nib
    t += _ASCII0  # the lower-case hex digit of each nibble
    x |= _LOWER
    ok = x == t
    np.bitwise_and(nib, _HIGH, out=t)
    ok &= t == _U64(0)
    ok |= ~present
    if not ok.all():
        return None
    nib <<= _U64(4)
    nib |= nib >> _U64(12)  # each even byte: its digit << 4 | the next byte's digit
    nib &= _U64(0x00FF00FF00FF00FF)
    return nib.view(np.uint16).astype(np.uint8).view(">u4").astype(np.uint32)


def parse_tsv_block(buf: np.ndarray, labeled: bool) -> pa.Table | None:
    """The rows of ``buf`` (uint8: ``PAD`` bytes, whole lines each ending in a newline, ``PAD`` bytes) in the
    project schema, or None when the block is not clean (see the module help); unlabeled lines get label 0."""
    body = buf[PAD:len(buf) - PAD]
    nf = 40 if labeled else 39
    delim = np.flatnonzero(body < 32)
    if delim.size == 0 or delim.size % nf:
        return None
    n = delim.size // nf
    expected = np.full(nf, 9, dtype=np.uint8)
    expected[-1] = 10
    if not (body[delim].reshape(n, nf) == expected).all():
        return None
    d = delim.reshape(n, nf)
    line_start = np.empty(n, dtype=np.int64)
    line_start[0] = 0
    np.add(d[:-1, -1], 1, out=line_start[1:])
    lengths = np.empty((n, nf), dtype=np.int64)
    np.subtract(d[:, 0], line_start, out=lengths[:, 0])
    np.subtract(d[:, 1:], d[:, :-1], out=lengths[:, 1:])
    lengths[:, 1:] -= 1
    u64 = np.ndarray((buf.size - 7,), dtype=np.uint64, buffer=buf, strides=(1,))  # u64[k]: bytes k..k+7

    columns = []
    if labeled:
        label = body[line_start]
        if not ((lengths[:, 0] == 1) & ((label == ord("0")) | (label == ord("1")))).all():
            return None
        columns.append(_array(label - np.uint8(ord("0")), None, pa.int8(), n))
    else:
        columns.append(_array(np.zeros(n, dtype=np.int8), None, pa.int8(), n))
    o = 1 if labeled else 0
    dense_len = lengths[:, o:o + 13]
    if dense_len.max() > _MAX_COUNT_CHARS:
        return None
    dense = _counts(u64[d[:, o:o + 13] + (PAD - 8)], dense_len)  # the 8 bytes ending at each field's end
    if dense is None:
        return None
    sparse_len = lengths[:, o + 13:]
    present = sparse_len == _HEX_CHARS
    if not (present | (sparse_len == 0)).all():
        return None
    sparse = _hashes(u64[d[:, o + 12:o + 38] + (PAD + 1)], present)  # the 8 bytes from each field's start
    if sparse is None:
        return None
    for values, valid, typ in ((dense, dense_len > 0, pa.int32()), (sparse, present, pa.uint32())):
        values, valid = np.ascontiguousarray(values.T), np.ascontiguousarray(valid.T)
        bits = np.packbits(valid, axis=1, bitorder="little")
        complete = valid.all(axis=1)
        for j in range(values.shape[0]):
            columns.append(_array(values[j], None if complete[j] else bits[j], typ, n))
    return pa.Table.from_arrays(columns, schema=SCHEMA)

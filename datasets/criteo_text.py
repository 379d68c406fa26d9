"""Raw Criteo text -> Arrow columns in the project schema, with no Python per row (see ``datasets.convert``): clean
TSV blocks are parsed from their bytes by ``datasets.tsv_blocks``; everything else (the Kaggle CSV, any block with
an irregular line) goes through Arrow's CSV reader for the splitting and vectorized numpy for the validation and
the hex -> uint32 conversion, which is also what names a bad line and field.

Three parse paths for one format, each kept because it pays (``bench/results/parse_paths.txt``, CPU time per row on
clean sample lines): the compiled block parser (0.17 us) is 8x Arrow's reader with the fast column decoders
(1.41 us), which is the only path for the CSV and for irregular lines; those fast decoders (``_hex_to_uint32``,
``_int_column``) halve that path's cost over the general ones (2.88 us), which stay for irregular columns."""

from __future__ import annotations

import gzip
import io
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from dqrm.datasets.schema import DENSE_COLUMNS, LABEL, SCHEMA, SPARSE_COLUMNS
from dqrm.datasets.tsv_blocks import HEX as _HEX, PAD, parse_tsv_block

_INT_RE = r"^-?[0-9]+$"


class BadInputError(ValueError):
    """A row or file that is not Criteo data, with where it is."""


def detect_format(path: Path) -> tuple[str, bool]:
    """('tsv' | 'csv', has_label) from the first line."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            first = f.readline(1 << 16)
    except (OSError, EOFError) as e:
        raise BadInputError(f"{path}: cannot read ({e})") from None
    if not first:
        raise BadInputError(f"{path}: empty file")
    if first.startswith(b"Id,Label,"):
        return "csv", True
    fields = first.rstrip(b"\r\n").split(b"\t")
    if len(fields) == 40:
        return "tsv", True
    if len(fields) == 39:
        return "tsv", False
    raise BadInputError(f"{path}: line 1 has {len(fields)} tab-separated fields; Criteo TSV has 40 (39 without "
                        f"label) and the Kaggle CSV starts with 'Id,Label,' — is this a Criteo file?")


def open_rows(path: Path, fmt: str, labeled: bool, byte_range: tuple[int, int] | None, header: bool, block_size: int,
              invalid: list) -> pcsv.CSVStreamingReader:
    """Arrow's streaming reader of every field as a string over the file (or its ``[begin, end)`` bytes); rows with a
    wrong field count are skipped and appended to ``invalid`` as (Arrow row number, what, text), Arrow numbering the
    stream's lines from 1 (a skipped header included)."""
    return _csv_rows(_open_stream(path, byte_range), fmt, labeled, header, block_size, invalid, 1)


def _open_stream(path: Path, byte_range: tuple[int, int] | None) -> pa.NativeFile:
    if byte_range is None:
        return pa.input_stream(str(path), compression="gzip" if path.suffix == ".gz" else None)
    # Read, not memory-mapped: every page of a mapped range would stay resident (and count as the process's memory)
    # until the range is done, adding up to --chunk-bytes to each worker's peak (bench.ingest: 760 MB vs 460).
    return pa.PythonFile(_Range(path, *byte_range), mode="r")


class _Range(io.RawIOBase):
    """Bytes ``[begin, end)`` of a file as a stream."""

    def __init__(self, path: Path, begin: int, end: int) -> None:
        self._file = open(path, "rb", buffering=0)
        self._file.seek(begin)
        self._left = end - begin

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._file.readinto(memoryview(b)[:self._left])
        self._left -= n
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def _csv_rows(stream: pa.NativeFile, fmt: str, labeled: bool, header: bool, block_size: int, invalid: list,
              first_number: int) -> pcsv.CSVStreamingReader:
    """``open_rows`` over a stream whose first line is line ``first_number`` of what the caller numbers."""
    names = ([LABEL] if labeled else []) + DENSE_COLUMNS + SPARSE_COLUMNS
    if fmt == "csv":
        names = ["Id"] + names

    def on_invalid(row):
        invalid.append((row.number + first_number - 1, f"has {row.actual_columns} fields, expected "
                        f"{row.expected_columns}", row.text[:80]))
        return "skip"

    # Empty lines are rows too (of empty fields, so they fail the label check): Arrow's row numbers then stay
    # line numbers.
    return pcsv.open_csv(
        stream,
        read_options=pcsv.ReadOptions(column_names=names, skip_rows=1 if header else 0,
                                      block_size=block_size, use_threads=False),
        parse_options=pcsv.ParseOptions(delimiter="," if fmt == "csv" else "\t", invalid_row_handler=on_invalid,
                                        ignore_empty_lines=False),
        convert_options=pcsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=False,
                                            quoted_strings_can_be_null=False),
    )


def _line_blocks(stream: pa.NativeFile, block_size: int) -> Iterator[np.ndarray]:
    """Buffers of about ``block_size`` bytes of text at a time, cut after a newline: ``PAD`` zero bytes, whole lines
    (a last line without a newline gets one), ``PAD`` zero bytes; one copy of the text."""
    carry = b""
    while True:
        chunk = stream.read(block_size)
        if not chunk:
            if carry:
                yield _padded(carry, b"\n")
            return
        cut = chunk.rfind(b"\n") + 1
        if cut == 0:  # a line longer than a block
            carry += chunk
            continue
        view = memoryview(chunk)
        buf = _padded(carry, view[:cut])
        carry = bytes(view[cut:])
        yield buf


def _padded(head: bytes, tail) -> np.ndarray:
    buf = np.zeros(PAD + len(head) + len(tail) + PAD, dtype=np.uint8)
    buf[PAD:PAD + len(head)] = np.frombuffer(head, dtype=np.uint8)
    buf[PAD + len(head):len(buf) - PAD] = np.frombuffer(tail, dtype=np.uint8)
    return buf


def parsed_batches(path: Path, fmt: str, labeled: bool, byte_range: tuple[int, int] | None, header: bool,
                   block_size: int, invalid: list) -> Iterator[tuple[pa.RecordBatch | None, pa.Table, list]]:
    """(Arrow batch or None, table, problems) in line order, as ``parse_batch`` of ``open_rows``' batches would
    give them, ``invalid`` filled the same way. A TSV block that ``datasets.tsv_blocks`` parses cleanly comes with no
    batch and no problems; any other block (and a whole CSV) goes through Arrow's reader and ``parse_batch``."""
    if fmt != "tsv":
        for batch in open_rows(path, fmt, labeled, byte_range, header, block_size, invalid):
            yield batch, *parse_batch(batch, labeled)
        return
    number = 1  # Arrow's row number of the block's first line
    with _open_stream(path, byte_range) as stream:
        for buf in _line_blocks(stream, block_size):
            table = parse_tsv_block(buf, labeled)
            if table is not None:
                yield None, table, []
                number += table.num_rows
            else:
                text = pa.py_buffer(buf[PAD:len(buf) - PAD])
                for batch in _csv_rows(pa.BufferReader(text), fmt, labeled, False, block_size, invalid, number):
                    yield batch, *parse_batch(batch, labeled)
                number += int(np.count_nonzero(buf == ord("\n")))


def _hex_to_uint32_general(col: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, valid, bad) of a string column: 8 hex digits -> uint32; '' -> missing; anything else -> bad."""
    lengths = pc.binary_length(col).to_numpy(zero_copy_only=False)
    valid = lengths == 8
    bad = (lengths != 8) & (lengths != 0)
    fixed = pc.if_else(pa.array(valid), col, pa.scalar("00000000")).cast(pa.binary(8))
    raw = np.frombuffer(fixed.buffers()[1], dtype=np.uint8)[fixed.offset * 8:(fixed.offset + len(fixed)) * 8]
    nibbles = _HEX[raw].reshape(-1, 8)
    bad |= valid & (nibbles == 255).any(axis=1)
    nib = nibbles.astype(np.uint32)
    values = np.zeros(len(col), dtype=np.uint32)
    for k in range(8):
        values = (values << np.uint32(4)) | (nib[:, k] & np.uint32(15))
    return values, valid & ~bad, bad


def _int_column_general(col: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, valid, bad) of a string column of integer counts; '' -> missing."""
    empty = pc.equal(pc.binary_length(col), 0).to_numpy(zero_copy_only=False)
    ok = pc.match_substring_regex(col, _INT_RE).to_numpy(zero_copy_only=False)
    bad = ~ok & ~empty
    safe = pc.if_else(pa.array(ok), col, pa.scalar("0"))
    big = pc.greater(pc.binary_length(safe), 11).to_numpy(zero_copy_only=False)  # cannot fit int32
    bad |= big
    safe = pc.if_else(pa.array(~big), safe, pa.scalar("0"))
    values = safe.cast(pa.int64()).to_numpy()
    overflow = (values > 2**31 - 1) | (values < -(2**31))
    bad |= overflow
    return np.where(ok & ~bad, values, 0).astype(np.int32), ok & ~bad, bad


_HIGH_NIBBLES = np.uint64(0xF0F0F0F0F0F0F0F0)


def _string_parts(col: pa.Array) -> tuple[np.ndarray, np.ndarray] | None:
    """(offsets, data bytes) of a plain string column without nulls (what the CSV reader gives), zero-copy."""
    if not isinstance(col, pa.StringArray) or col.null_count:
        return None
    _, offsets, data = col.buffers()
    offsets = np.frombuffer(offsets, dtype=np.int32)[col.offset:col.offset + len(col) + 1]
    return offsets, np.frombuffer(data, dtype=np.uint8)[offsets[0]:offsets[-1]] if data is not None else \
        np.zeros(0, dtype=np.uint8)


def _hex_to_uint32(col: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, valid, bad) of a string column: 8 hex digits -> uint32; '' -> missing; anything else -> bad.
    Kept beside the general path because it halves the Arrow path's cost (``bench.parse_paths``). Fast path, when
    every field is 8 characters or empty (real Criteo): the data buffer is then the valid fields' 8 bytes back to
    back, decoded in place (bytes -> nibbles by table, nibble pairs -> big-endian uint32)."""
    parts = _string_parts(col)
    if parts is not None:
        offsets, data = parts
        lengths = np.diff(offsets)
        valid = lengths == 8
        if valid.sum() * 8 == data.size:  # every field is 8 characters or empty
            nib = _HEX[data]  # 255 marks a byte that is not a hex digit
            bad_valid = (nib.view(np.uint64) & _HIGH_NIBBLES) != 0
            decoded = ((nib[0::2] << np.uint8(4)) | (nib[1::2] & np.uint8(15))).view(">u4").astype(np.uint32)
            values, bad = np.zeros(len(col), dtype=np.uint32), np.zeros(len(col), dtype=bool)
            values[valid], bad[valid] = decoded, bad_valid
            return values, valid & ~bad, bad
    return _hex_to_uint32_general(col)


def _int_column(col: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, valid, bad) of a string column of integer counts; '' -> missing.
    Kept beside the general path because it halves the Arrow path's cost (``bench.parse_paths``). Fast path: Arrow's
    own string -> int32 cast of the non-empty fields (empty ones masked as null, zero-copy). It rejects what the
    general path rejects except hex ('0x10') and over-long zero-padded numbers, so a column with an 'x' or a field
    over 11 characters takes the general path, as does any column the cast refuses (which then names the bad rows)."""
    parts = _string_parts(col)
    if parts is not None:
        offsets, data = parts
        lengths = np.diff(offsets)
        valid = lengths > 0
        if not valid.any():
            return np.zeros(len(col), dtype=np.int32), valid, np.zeros(len(col), dtype=bool)
        if lengths.max() <= 11 and not ((data == ord("x")) | (data == ord("X"))).any():
            _, off_buf, data_buf = col.buffers()
            bits = np.packbits(np.concatenate([np.zeros(col.offset, dtype=bool), valid]), bitorder="little")
            masked = pa.StringArray.from_buffers(len(col), off_buf, data_buf, pa.py_buffer(bits), offset=col.offset)
            try:
                values = pc.fill_null(pc.cast(masked, pa.int32()), 0).to_numpy()
            except pa.ArrowInvalid:
                pass
            else:
                return values, valid, np.zeros(len(col), dtype=bool)
    return _int_column_general(col)


def parse_batch(batch: pa.RecordBatch, labeled: bool) -> tuple[pa.Table, list[tuple[np.ndarray, str]]]:
    """All rows of a batch in the project schema, and (bad rows, field) for each field, in column order."""
    n = batch.num_rows
    columns: dict[str, pa.Array] = {}
    problems: list[tuple[np.ndarray, str]] = []
    if labeled:
        lab = batch.column(LABEL)
        is0, is1 = pc.equal(lab, "0").to_numpy(zero_copy_only=False), pc.equal(lab, "1").to_numpy(zero_copy_only=False)
        problems.append((~(is0 | is1), LABEL))
        columns[LABEL] = pa.array(is1.astype(np.int8))
    else:
        columns[LABEL] = pa.array(np.zeros(n, dtype=np.int8))
    for c in DENSE_COLUMNS:
        values, valid, bad = _int_column(batch.column(c))
        problems.append((bad, c))
        columns[c] = pa.array(values, mask=~valid)
    for c in SPARSE_COLUMNS:
        values, valid, bad = _hex_to_uint32(batch.column(c))
        problems.append((bad, c))
        columns[c] = pa.array(values, mask=~valid)
    return pa.table(columns, schema=SCHEMA), problems


def describe_expected(name: str) -> str:
    return "0 or 1" if name == LABEL else "an integer that fits int32" if name in DENSE_COLUMNS else "8 hex digits"

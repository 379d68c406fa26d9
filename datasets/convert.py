"""Raw Criteo -> the project's Parquet layout: ``python -m datasets.convert INPUT... --out DIR``.

Reads raw TSV (Kaggle ``train.txt``/``test.txt``, Terabyte ``day_N``, gzip too) and the Kaggle competition CSV
(``Id,Label,I1..I13,C1..C26`` header), streaming in blocks (bounded memory), one process per input file, and writes
one Parquet file per input with row groups sized for streaming reads, plus ``_manifest.json`` with row counts.
Parsing is Arrow's CSV reader; the validation and the hex -> uint32 conversion are vectorized numpy, so no Python
runs per row. TorchRec's converters (``BinaryCriteoUtils``) write NumPy arrays, not this layout, so this is ours.

Split conventions (``--split``):
  * ``kaggle``: one Kaggle ``train.txt`` -> ``train.parquet`` (days 1-6, the first 6/7 of the rows) and the 7th day
    halved into ``val.parquet`` (first half) and ``test.parquet`` (second half);
  * ``terabyte``: ``day_0..day_22`` -> ``train/day_N.parquet``; ``day_23`` halved into ``val/`` (first half) and
    ``test/`` (second half), TorchRec's order;
  * ``files`` (default): one output per input, same stem.

Bad rows (wrong field count, a count that is not an integer or overflows int32, a categorical that is not 8 hex
digits, a label that is not 0/1) stop the conversion with the file, line and field; with ``--skip-bad-rows`` they
are skipped, counted by reason and reported at the end and in the manifest. Empty fields are missing values.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import logging
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from datasets.schema import DENSE_COLUMNS, LABEL, SCHEMA, SPARSE_COLUMNS

log = logging.getLogger(__name__)

_HEX = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = 10 + _i
_INT_RE = r"^-?[0-9]+$"


class BadInputError(ValueError):
    """A row or file that is not Criteo data, with where it is."""


@dataclasses.dataclass
class FileResult:
    source: str
    outputs: dict[str, int]
    skipped: dict[str, int]
    labeled: bool
    seconds: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConvertOptions:
    """How one file is converted."""

    skip_bad_rows: bool = False
    """Skip (count and report) malformed rows instead of stopping at the first."""
    row_group_size: int = 262_144
    """Rows per Parquet row group."""
    block_size: int = 16 << 20
    """Bytes of text parsed at a time (memory stays a small multiple of this)."""


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


def _reader(path: Path, fmt: str, labeled: bool, opts: ConvertOptions, bad: list):
    names = ([LABEL] if labeled else []) + DENSE_COLUMNS + SPARSE_COLUMNS
    if fmt == "csv":
        names = ["Id"] + names
    stream = pa.input_stream(str(path), compression="gzip" if path.suffix == ".gz" else None)

    def on_invalid(row):
        bad.append((row.number, f"has {row.actual_columns} fields, expected {row.expected_columns}", row.text[:80]))
        return "skip"

    return pcsv.open_csv(
        stream,
        read_options=pcsv.ReadOptions(column_names=names, skip_rows=1 if fmt == "csv" else 0,
                                      block_size=opts.block_size, use_threads=False),
        parse_options=pcsv.ParseOptions(delimiter="," if fmt == "csv" else "\t", invalid_row_handler=on_invalid),
        convert_options=pcsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=False,
                                            quoted_strings_can_be_null=False),
    )


def _hex_to_uint32(col: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def _int_column(col: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def _convert_batch(batch: pa.RecordBatch, labeled: bool, first_line: int, path: Path, opts: ConvertOptions,
                   skipped: dict[str, int]) -> pa.Table:
    n = batch.num_rows
    bad_any = np.zeros(n, dtype=bool)
    columns: dict[str, pa.Array] = {}
    problems: list[tuple[np.ndarray, str]] = []
    if labeled:
        lab = batch.column(LABEL)
        is0, is1 = pc.equal(lab, "0").to_numpy(zero_copy_only=False), pc.equal(lab, "1").to_numpy(zero_copy_only=False)
        bad = ~(is0 | is1)
        problems.append((bad, LABEL))
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
    for bad, name in problems:
        if bad.any():
            if not opts.skip_bad_rows:
                row = int(np.flatnonzero(bad)[0])
                value = batch.column(name)[row].as_py()
                raise BadInputError(f"{path}: line {first_line + row}: field {name} = {value!r} is not "
                                    f"{'0 or 1' if name == LABEL else 'an integer that fits int32' if name in DENSE_COLUMNS else '8 hex digits'}"
                                    f" (pass --skip-bad-rows to skip such rows and count them)")
            reason = f"bad {name}"
            skipped[reason] = skipped.get(reason, 0) + int((bad & ~bad_any).sum())
            bad_any |= bad
    table = pa.table(columns, schema=SCHEMA)
    return table.filter(pa.array(~bad_any)) if bad_any.any() else table


def _targets(path: Path, out: Path, split: str, total_rows: int | None) -> list[tuple[Path, int]]:
    """(output file, rows it takes) in order; the last takes the rest (-1)."""
    if split == "kaggle":
        day = total_rows // 7
        train = total_rows - day
        half = day // 2
        return [(out / "train.parquet", train), (out / "val.parquet", half), (out / "test.parquet", -1)]
    stem = path.name.removesuffix(".gz")
    for ext in (".txt", ".tsv", ".csv"):
        stem = stem.removesuffix(ext)
    if split == "terabyte":
        if stem == "day_23":
            return [(out / "val" / f"{stem}.parquet", total_rows // 2), (out / "test" / f"{stem}.parquet", -1)]
        return [(out / "train" / f"{stem}.parquet", -1)]
    return [(out / f"{stem}.parquet", -1)]


def count_lines(path: Path) -> int:
    opener = gzip.open if path.suffix == ".gz" else open
    n = 0
    with opener(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            n += chunk.count(b"\n")
    return n


def convert_file(path: Path, out: Path, split: str, opts: ConvertOptions, progress=None) -> FileResult:
    t0 = time.perf_counter()
    fmt, labeled = detect_format(path)
    needs_count = split == "kaggle" or (split == "terabyte" and path.name.startswith("day_23"))
    total = count_lines(path) - (1 if fmt == "csv" else 0) if needs_count else None
    targets = _targets(path, out, split, total)
    bad_rows: list = []
    skipped: dict[str, int] = {}
    outputs: dict[str, int] = {}
    line = 2 if fmt == "csv" else 1
    t_idx, t_rows = 0, 0
    writer, tmp = None, None

    def open_target(i):
        target = targets[i][0]
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = target.with_name(target.name + ".partial")
        return pq.ParquetWriter(tmp_path, SCHEMA), tmp_path

    def close_target(i):
        writer.close()
        tmp.replace(targets[i][0])
        outputs[str(targets[i][0])] = t_rows

    writer, tmp = open_target(0)
    pending: list[pa.Table] = []
    pending_rows = 0
    try:
        for batch in _reader(path, fmt, labeled, opts, bad_rows):
            if bad_rows and not opts.skip_bad_rows:
                number, what, text = bad_rows[0]
                raise BadInputError(f"{path}: line {number}: {what}: {text!r} (pass --skip-bad-rows to skip)")
            table = _convert_batch(batch, labeled, line, path, opts, skipped)
            line += batch.num_rows + len(bad_rows)
            if bad_rows:
                skipped["wrong field count"] = skipped.get("wrong field count", 0) + len(bad_rows)
                bad_rows.clear()
            if progress:
                progress(batch.num_rows)
            while table.num_rows:
                want = targets[t_idx][1]
                take = table.num_rows if want < 0 else min(table.num_rows, want - t_rows)
                pending.append(table.slice(0, take))
                pending_rows += take
                t_rows += take
                table = table.slice(take)
                if pending_rows >= opts.row_group_size:
                    writer.write_table(pa.concat_tables(pending), row_group_size=opts.row_group_size)
                    pending, pending_rows = [], 0
                if want >= 0 and t_rows == want:
                    if pending:
                        writer.write_table(pa.concat_tables(pending), row_group_size=opts.row_group_size)
                        pending, pending_rows = [], 0
                    close_target(t_idx)
                    t_idx, t_rows = t_idx + 1, 0
                    writer, tmp = open_target(t_idx)
        if pending:
            writer.write_table(pa.concat_tables(pending), row_group_size=opts.row_group_size)
        close_target(t_idx)
    except pa.ArrowInvalid as e:
        raise BadInputError(f"{path}: {e}") from None
    finally:
        if tmp is not None and tmp.exists():
            writer.close()
            tmp.unlink()
    return FileResult(str(path), outputs, skipped, labeled, time.perf_counter() - t0)


def _convert_one(args):
    return convert_file(*args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m datasets.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", type=Path, nargs="+", help="raw Criteo files (.txt, day_N, .csv, optionally .gz)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--split", choices=("files", "kaggle", "terabyte"), default="files",
                   help="how inputs map to train/val/test (see module help)")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip malformed rows (counted and reported)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="files converted in parallel")
    p.add_argument("--row-group-size", type=int, default=ConvertOptions.row_group_size, help="rows per row group")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    missing = [str(f) for f in args.inputs if not f.is_file()]
    if missing:
        print(f"error: no such input file: {', '.join(missing)}", file=sys.stderr)
        return 1
    opts = ConvertOptions(skip_bad_rows=args.skip_bad_rows, row_group_size=args.row_group_size)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    jobs = [(f, args.out, args.split, opts) for f in args.inputs]
    try:
        if args.workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(min(args.workers, len(jobs))) as pool:
                results = list(pool.map(_convert_one, jobs))
        else:
            from tqdm import tqdm

            results = []
            for job in jobs:
                with tqdm(desc=job[0].name, unit=" rows", unit_scale=True, file=sys.stderr) as bar:
                    results.append(convert_file(*job, progress=bar.update))
    except BadInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    rows = sum(sum(r.outputs.values()) for r in results)
    skipped = {}
    for r in results:
        for k, v in r.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
    seconds = time.perf_counter() - t0
    manifest = {"format": "dqrm criteo parquet v1", "split": args.split, "rows": rows, "skipped": skipped,
                "conventions": {"dense": "raw int32, transform at read time", "categorical": "uint32 hash",
                                "kaggle_split": "first 6/7 train, 7th day: first half val, second half test",
                                "terabyte_split": "day_0..22 train, day_23: first half val, second half test"},
                "files": [dataclasses.asdict(r) for r in results]}
    manifest_path = args.out / "_manifest.json"
    if manifest_path.is_file():  # keep what earlier conversions into this folder recorded
        old = json.loads(manifest_path.read_text())
        mine = {o for r in results for o in r.outputs}
        kept = [f for f in old.get("files", []) if not set(f["outputs"]) & mine]
        manifest["files"] = kept + manifest["files"]
        manifest["rows"] = sum(sum(f["outputs"].values()) for f in manifest["files"])
    manifest_path.write_text(json.dumps(manifest, indent=2))
    print(f"converted {rows:,} rows from {len(results)} file(s) in {seconds:.1f} s "
          f"({rows / max(seconds, 1e-9):,.0f} rows/s) -> {args.out}")
    if skipped:
        print("skipped rows: " + ", ".join(f"{k}: {v:,}" for k, v in sorted(skipped.items())))
    if any(not r.labeled for r in results):
        print("note: unlabeled input (Kaggle test.txt): label written as 0; use it for prediction, not evaluation")
    return 0


if __name__ == "__main__":
    sys.exit(main())

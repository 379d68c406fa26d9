"""Raw Criteo -> the project's Parquet layout: ``python -m dqrm.datasets.convert INPUT... --out DIR``.

Reads raw TSV (Kaggle ``train.txt``/``test.txt``, Terabyte ``day_N``, gzip too) and the Kaggle competition CSV
(``Id,Label,I1..I13,C1..C26`` header), streaming in blocks (bounded memory), and writes Parquet with row groups sized
for streaming reads, plus ``_manifest.json`` listing every output with its row count. Clean 1 MiB blocks are
parsed by one compiled loop (``datasets.tsv_blocks``); a block with any irregular line goes through Arrow's CSV reader
and vectorized numpy checks, which name the bad line, so no Python runs per row either way. TorchRec's
converters (``BinaryCriteoUtils``) write NumPy arrays from one process per file, not this layout, so this is ours.

Parallelism: a plain (not gzip) input larger than ``--chunk-bytes`` is cut into byte ranges that start on line
starts (``datasets.chunks``); all ranges of all inputs go to ``--workers`` processes. Each range of an output is
written as its own part file, so such an input becomes a folder of parts in line order instead of one file
(``train/day_3/part-00000.parquet``, ``part-00001.parquet``, ...). Which parts exist depends only on the input and
``--chunk-bytes``, never on ``--workers``. A gzip input is one stream, one process. The reader takes either form
(``datasets.schema.parquet_files``).

Split conventions (``--split``), by row position in the input (a skipped bad row still holds its position):
  * ``kaggle``: one Kaggle ``train.txt`` -> ``train`` (days 1-6, the first 6/7 of the rows) and the 7th day
    halved into ``val`` (first half) and ``test`` (second half);
  * ``terabyte``: ``day_0..day_22`` -> ``train/day_N``; ``day_23`` halved into ``val/`` (first half) and
    ``test/`` (second half), TorchRec's order;
  * ``files`` (default): one output per input, same stem.
Each output is ``NAME.parquet``, or the folder ``NAME/`` of parts when its input was converted in several ranges.

Bad rows (wrong field count, an empty line, a count that is not an integer or overflows int32, a categorical that
is not 8 hex digits, a label that is not 0/1) stop the conversion with the file, line and field; with
``--skip-bad-rows`` they are skipped, counted by reason and reported at the end and in the manifest. Line numbers
are the input's own, whichever range a line fell in. Empty fields are missing values.

Vocabulary (``--vocab-min-count N``, see ``datasets.vocab``): after converting, count each categorical column's raw
ids over the outputs named by ``--vocab-from`` (default ``train``) and write ``vocab/C1.npy ..`` with the ids seen
at least N times; the reader's ``vocab_dir`` then maps ids to contiguous indices instead of hashing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import json
import logging
import os
import sys
import time
import zlib
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dqrm.datasets.chunks import count_newlines, ends_with_newline, line_ranges
from dqrm.datasets.criteo_text import BadInputError, describe_expected, detect_format, parsed_batches
from dqrm.datasets.schema import SCHEMA, parquet_files
from dqrm.datasets.vocab import write_vocabulary

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConvertOptions:
    """How one file is converted."""

    skip_bad_rows: bool = False
    """Skip (count and report) malformed rows instead of stopping at the first."""
    row_group_size: int = 262_144
    """Rows per Parquet row group."""
    block_size: int = 1 << 20
    """Bytes of text parsed at a time (memory stays a small multiple of this; about 1 MiB keeps the parse in cache)."""
    chunk_bytes: int = 512 << 20
    """A plain input larger than this is converted in ranges of about this many bytes, one part file each."""

    def __post_init__(self) -> None:
        for name in ("row_group_size", "block_size", "chunk_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclasses.dataclass
class FileResult:
    source: str
    outputs: dict[str, int]
    """Every file written for this input (parts in line order) -> its rows."""
    skipped: dict[str, int]
    labeled: bool
    seconds: float
    chunks: int


@dataclasses.dataclass(frozen=True)
class _Output:
    """One file a chunk writes: the rows at input positions [start, end) (end None = to the end) that it holds."""

    path: Path
    start: int
    end: int | None
    target: int  # index of the split output (train, val, ...) it belongs to


@dataclasses.dataclass(frozen=True)
class ChunkJob:
    """One process's work: a byte range of one input (the whole stream when ``byte_range`` is None)."""

    path: Path
    fmt: str
    labeled: bool
    index: int
    byte_range: tuple[int, int] | None
    first_line: int | None
    """The input's line number of the range's first line; None where nothing but an error message needs it (every
    output starts at the input's first row and the last ends at its end), which then counts it
    (:meth:`line_of_first`)."""
    outputs: tuple[_Output, ...]
    opts: ConvertOptions

    def line_of_first(self) -> int:
        if self.first_line is not None:
            return self.first_line
        return 1 + (count_newlines(self.path, 0, self.byte_range[0]) if self.byte_range else 0)


@dataclasses.dataclass
class ChunkResult:
    outputs: dict[Path, tuple[int, int]]  # final path -> (target index, rows); written as `path.partial`
    skipped: dict[str, int]


def _row_numbers(first: int, n: int, invalid: np.ndarray) -> np.ndarray:
    """Arrow's row numbers of the ``n`` rows of a batch: the first ``n`` numbers from ``first`` on that are not in
    ``invalid`` (sorted numbers of rows Arrow skipped for their field count, each at least ``first``)."""
    good_before = (invalid - first) - np.arange(len(invalid))  # good rows ahead of each invalid one
    i = np.arange(n)
    return first + i + np.searchsorted(good_before, i, side="right")


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def convert_chunk(job: ChunkJob, progress: Callable[[int], None] | None = None) -> ChunkResult:
    """Convert one range (or whole stream) into ``path.partial`` files for its outputs; the caller renames them once
    every range of the input has succeeded. Raises ``BadInputError`` naming the input's true line."""
    opts = job.opts
    header = job.fmt == "csv" and (job.byte_range is None or job.byte_range[0] == 0)
    data_first_line = 2 if job.fmt == "csv" else 1
    invalid: list = []  # (Arrow row number, what, text) of rows with a wrong field count, in row order
    behind = 0  # invalid[:behind] lie before the rows seen so far
    next_number = 2 if header else 1  # Arrow numbers rows from 1 within the stream, a skipped header included
    skipped: dict[str, int] = {}
    rows = [0] * len(job.outputs)
    pending: list[list[pa.Table]] = [[] for _ in job.outputs]
    writers: list[pq.ParquetWriter] = []

    first_line = None

    def line(number: int) -> int:
        nonlocal first_line
        if first_line is None:
            first_line = job.line_of_first()
        return first_line - 1 + int(number)

    def flush(k: int) -> None:
        if pending[k]:
            writers[k].write_table(pa.concat_tables(pending[k]), row_group_size=opts.row_group_size)
            pending[k] = []

    def raise_invalid(k: int) -> None:
        number, what, text = invalid[k]
        hint = ""
        if not job.labeled and what.startswith("has 40 fields") and line(number) == 2:  # format from line 1
            hint = ("; line 1 has 39 fields, so the file was read as unlabeled test data: is line 1 missing its "
                    "label?")
        raise BadInputError(f"{job.path}: line {line(number)}: {what}: {text!r}{hint} (pass --skip-bad-rows to skip)")

    try:
        for o in job.outputs:
            o.path.parent.mkdir(parents=True, exist_ok=True)
            # Plain encoding: dictionaries cost a third of the write time and the hashes overflow them anyway.
            writers.append(pq.ParquetWriter(_partial(o.path), SCHEMA, use_dictionary=False))
        rows_in = _reading(job.path, parsed_batches(job.path, job.fmt, job.labeled, job.byte_range, header,
                                                    opts.block_size, invalid))
        for batch, table, problems in rows_in:
            n = table.num_rows
            numbers = _row_numbers(next_number, n, np.array([r[0] for r in invalid[behind:]], dtype=np.int64))
            next_number = int(numbers[-1]) + 1 if n else next_number
            bad_any = np.zeros(n, dtype=bool)
            for bad, name in problems:
                if opts.skip_bad_rows and bad.any():
                    skipped[f"bad {name}"] = skipped.get(f"bad {name}", 0) + int((bad & ~bad_any).sum())
                bad_any |= bad
            if not opts.skip_bad_rows:
                # The earliest problem wins; an invalid row parsed ahead of this batch waits for the batches before it.
                row = int(np.argmax(bad_any)) if bad_any.any() else None
                if behind < len(invalid) and invalid[behind][0] < (numbers[row] if row is not None else next_number):
                    raise_invalid(behind)
                if row is not None:
                    name = next(name for bad, name in problems if bad[row])
                    if all(batch.column(c)[row].as_py() in (None, "", b"") for c in batch.column_names):
                        raise BadInputError(f"{job.path}: line {line(numbers[row])} is empty (no value in any field; "
                                            f"pass --skip-bad-rows to skip such rows and count them)")
                    raise BadInputError(f"{job.path}: line {line(numbers[row])}: field {name} = "
                                        f"{batch.column(name)[row].as_py()!r} is not {describe_expected(name)}"
                                        f" (pass --skip-bad-rows to skip such rows and count them)")
            while behind < len(invalid) and invalid[behind][0] < next_number:
                behind += 1
            if progress:
                progress(n)
            if bad_any.any():
                table, numbers = table.filter(pa.array(~bad_any)), numbers[~bad_any]
            # input positions only where an output starts or ends inside the input (then the plan counted first_line)
            positions = None if job.first_line is None else numbers + (job.first_line - 1 - data_first_line)
            routed = 0
            for k, o in enumerate(job.outputs):
                lo = 0 if o.start == 0 else int(np.searchsorted(positions, o.start))
                hi = len(numbers) if o.end is None else int(np.searchsorted(positions, o.end))
                if hi > lo:
                    pending[k].append(table.slice(lo, hi - lo))
                    rows[k] += hi - lo
                    routed += hi - lo
                    if sum(t.num_rows for t in pending[k]) >= opts.row_group_size:
                        flush(k)
            assert routed == table.num_rows, f"{job.path}: rows outside every output ({routed} of {table.num_rows})"
        if invalid and not opts.skip_bad_rows:
            raise_invalid(0)
        if invalid:
            skipped["wrong field count"] = len(invalid)
        for k, w in enumerate(writers):
            flush(k)
            w.close()
    except BaseException as e:
        for w, o in zip(writers, job.outputs):
            w.close()
            _partial(o.path).unlink(missing_ok=True)
        if isinstance(e, pa.ArrowInvalid):
            raise BadInputError(f"{job.path}: {e}") from None
        raise
    return ChunkResult({o.path: (o.target, r) for o, r in zip(job.outputs, rows)}, skipped)


def _stem(path: Path) -> str:
    stem = path.name.removesuffix(".gz")
    for ext in (".txt", ".tsv", ".csv"):
        stem = stem.removesuffix(ext)
    return stem


def _needs_total(path: Path, split: str) -> bool:
    return split == "kaggle" or (split == "terabyte" and _stem(path) == "day_23")


def _targets(path: Path, out: Path, split: str, total_rows: int | None) -> list[tuple[Path, int, int | None]]:
    """(output, first row position, end position or None = to the end) of each output of one input, in order."""
    if split == "kaggle":
        day = total_rows // 7
        train = total_rows - day
        half = day // 2
        return [(out / "train.parquet", 0, train), (out / "val.parquet", train, train + half),
                (out / "test.parquet", train + half, None)]
    stem = _stem(path)
    if split == "terabyte":
        if stem == "day_23":
            return [(out / "val" / f"{stem}.parquet", 0, total_rows // 2),
                    (out / "test" / f"{stem}.parquet", total_rows // 2, None)]
        return [(out / "train" / f"{stem}.parquet", 0, None)]
    return [(out / f"{stem}.parquet", 0, None)]


def _damaged_gzip(path: Path, e: BaseException) -> BadInputError:
    return BadInputError(f"{path}: the gzip stream is damaged or ends early ({e}); re-download or re-compress it")


def _reading(path: Path, batches: Iterator) -> Iterator:
    """``batches``, with a damaged gzip input's decompression error turned into one naming the file (only errors
    of reading the input: a failed write, like a full disk, keeps its own error)."""
    while True:
        try:
            item = next(batches)
        except StopIteration:
            return
        except (EOFError, zlib.error) as e:
            raise _damaged_gzip(path, e) from None
        except OSError as e:  # Arrow's decompressor: an OSError without an errno ("Truncated compressed stream")
            if path.suffix != ".gz" or e.errno is not None:
                raise
            raise _damaged_gzip(path, e) from None
        yield item


def count_lines(path: Path) -> int:
    """Lines of a (possibly gzip) file, a last line without a newline included."""
    if path.suffix != ".gz":
        return count_newlines(path) + (0 if ends_with_newline(path) else 1)
    n, last = 0, b"\n"
    try:
        with gzip.open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                n += block.count(b"\n")
                last = block[-1:]
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise _damaged_gzip(path, e) from None
    return n + (last != b"\n")


@dataclasses.dataclass
class _Plan:
    """One input: its split outputs and the chunk jobs that write them."""

    path: Path
    labeled: bool
    targets: list[tuple[Path, int, int | None]]
    jobs: list[ChunkJob]


def _plan(inputs: Sequence[Path], out: Path, split: str, opts: ConvertOptions,
          run: Callable[[Callable, list], list]) -> list[_Plan]:
    """Chunk every input and, where its rows are split by position (``_needs_total``), find each chunk's first line;
    the newline counts run through ``run`` (in parallel). Elsewhere a chunk's first line is counted only if an error
    message needs it: counting every range first cost a sixth of a conversion's time."""
    formats = [detect_format(p) for p in inputs]
    ranges = [[None] if p.suffix == ".gz" else line_ranges(p, opts.chunk_bytes) for p in inputs]
    tasks = []  # (input index, byte range or None for a whole-file line count)
    for i, (p, r) in enumerate(zip(inputs, ranges)):
        if len(r) > 1 and _needs_total(p, split):
            tasks += [(i, rng) for rng in r]
        elif _needs_total(p, split):
            tasks.append((i, None))
    counts = run(_count, [(inputs[i], rng) for i, rng in tasks])
    plans = []
    for i, (path, (fmt, labeled), r) in enumerate(zip(inputs, formats, ranges)):
        mine = [c for (j, _), c in zip(tasks, counts) if j == i]
        header = 1 if fmt == "csv" else 0
        if len(r) > 1 and mine:
            lines = sum(mine) + (0 if ends_with_newline(path) else 1)
            firsts = np.concatenate([[1], 1 + np.cumsum(mine[:-1])]).tolist()
        elif len(r) > 1:  # every row to one output: no range's first line is needed up front
            lines, firsts = None, [None] * len(r)
        else:
            lines, firsts, r = (mine[0] if mine else None), [1], [None]
        targets = _targets(path, out, split, None if lines is None else lines - header)
        jobs = []
        for c, (rng, first) in enumerate(zip(r, firsts)):
            p0 = None if first is None else first - 1 - header  # position of the chunk's first line
            p1 = None if c == len(r) - 1 or first is None else p0 + mine[c]
            outputs = tuple(
                _Output(t_path if len(r) == 1 else t_path.with_suffix("") / f"part-{c:05d}.parquet", s, e, t)
                for t, (t_path, s, e) in enumerate(targets)
                if len(r) == 1 or ((e is None or (s < e and p0 < e)) and (p1 is None or s < p1)))
            jobs.append(ChunkJob(path, fmt, labeled, c, rng, first, outputs, opts))
        plans.append(_Plan(path, labeled, targets, jobs))
    return plans


def _count(args: tuple[Path, tuple[int, int] | None]) -> int:
    path, rng = args
    return count_lines(path) if rng is None else count_newlines(path, *rng)


def _finish(plan: _Plan, results: list) -> FileResult | BaseException | None:
    """Rename the parts of an input whose every chunk succeeded (removing what an earlier conversion left in the
    other form: ``NAME.parquet`` vs ``NAME/part-*.parquet``); otherwise delete them and return the first error."""
    done = [r for r in results if isinstance(r, ChunkResult)]
    if len(done) < len(results):
        for r in done:
            for path in r.outputs:
                _partial(path).unlink(missing_ok=True)
        _remove_empty_folders(plan)
        return next((r for r in results if isinstance(r, BaseException)), None)
    written = {path: t_rows for r in done for path, t_rows in r.outputs.items()}
    for t_path, _, _ in plan.targets:
        folder = t_path.with_suffix("")
        stale = ([t_path] if t_path.is_file() else []) + (sorted(folder.glob("part-*.parquet")) if folder.is_dir() else [])
        for old in stale:
            if old not in written:
                old.unlink()
    for path in written:
        _partial(path).replace(path)
    _remove_empty_folders(plan)
    order = sorted(written, key=lambda p: (written[p][0], str(p)))  # by split output, then part number
    skipped: dict[str, int] = {}
    for r in done:
        for k, v in r.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
    return FileResult(str(plan.path), {str(p): written[p][1] for p in order}, skipped, plan.labeled, 0.0,
                      len(plan.jobs))


def _remove_empty_folders(plan: _Plan) -> None:
    for t_path, _, _ in plan.targets:
        folder = t_path.with_suffix("")
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _run_all(fn: Callable, items: list, pool: ProcessPoolExecutor | None) -> list:
    """``fn`` over ``items`` in order: results, an exception for an item that failed, None for one never run because
    another failed first (a bad row in day 0 should not wait for the other 23 days)."""
    if pool is None:
        out: list = []
        for item in items:
            try:
                out.append(fn(item))
            except Exception as e:  # noqa: BLE001 - returned like the pool's, so partial outputs get removed
                return out + [e] + [None] * (len(items) - len(out) - 1)
        return out
    futures = [pool.submit(fn, item) for item in items]
    _, not_done = wait(futures, return_when=FIRST_EXCEPTION)
    for f in not_done:
        f.cancel()
    wait(futures)
    return [None if f.cancelled() else f.exception() or f.result() for f in futures]


def convert(inputs: Sequence[Path], out: Path, split: str, opts: ConvertOptions, workers: int = 1,
            progress: bool = False) -> tuple[list[FileResult], list[BadInputError]]:
    """Convert ``inputs`` into ``out``; results of the inputs that succeeded and the errors of those that did not
    (at most one per input, its earliest chunk's)."""
    ranges = sum(1 if p.suffix == ".gz" else max(1, -(-p.stat().st_size // opts.chunk_bytes)) for p in inputs)
    with ProcessPoolExecutor(workers) if workers > 1 and ranges > 1 else contextlib.nullcontext() as pool:
        def run(fn, items):
            results = _run_all(fn, items, pool)
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:
                raise BadInputError(str(failed[0])) if isinstance(failed[0], OSError) else failed[0]
            return results

        plans = _plan(inputs, out, split, opts, run)
        jobs = [job for plan in plans for job in plan.jobs]
        t0 = time.perf_counter()
        results = _run_all(_convert_with_bar if progress and pool is None else convert_chunk, jobs, pool)
    finished, errors, at = [], [], 0
    for plan in plans:
        r = _finish(plan, results[at:at + len(plan.jobs)])
        at += len(plan.jobs)
        if isinstance(r, FileResult):
            r.seconds = time.perf_counter() - t0
            finished.append(r)
        elif isinstance(r, BadInputError):
            errors.append(r)
        elif r is not None:
            raise r
    return finished, errors


def _convert_with_bar(job: ChunkJob) -> ChunkResult:
    from tqdm import tqdm

    name = job.path.name if job.byte_range is None else f"{job.path.name} part {job.index}"
    with tqdm(desc=name, unit=" rows", unit_scale=True, file=sys.stderr) as bar:
        return convert_chunk(job, progress=bar.update)


def _merge_manifest(path: Path, manifest: dict) -> dict:
    """Keep what earlier conversions into this folder recorded, minus entries for the same inputs or outputs."""
    if not path.is_file():
        return manifest
    old = json.loads(path.read_text())
    sources = {f["source"] for f in manifest["files"]}
    mine = {o for f in manifest["files"] for o in f["outputs"]}
    kept = [f for f in old.get("files", []) if f["source"] not in sources and not set(f["outputs"]) & mine]
    manifest["files"] = kept + manifest["files"]
    manifest["rows"] = sum(sum(f["outputs"].values()) for f in manifest["files"])
    if "vocab" in old and "vocab" not in manifest:
        manifest["vocab"] = old["vocab"]
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dqrm.datasets.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", type=Path, nargs="*",
                   help="raw Criteo files (.txt, day_N, .csv, optionally .gz); none with --vocab-min-count builds "
                        "the vocabulary over what --out already holds")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--split", choices=("files", "kaggle", "terabyte"), default="files",
                   help="how inputs map to outputs (see above; default: files)")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip malformed rows (counted and reported)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes converting files and byte ranges of files in parallel (default: the CPU count, "
                        "%(default)s here)")
    p.add_argument("--chunk-bytes", type=int, default=ConvertOptions.chunk_bytes,
                   help="a plain input larger than this is converted in ranges of about this size, one part file "
                        "each (gzip inputs are one stream; default: %(default)s)")
    p.add_argument("--row-group-size", type=int, default=ConvertOptions.row_group_size,
                   help="rows per Parquet row group (default: %(default)s)")
    p.add_argument("--block-bytes", type=int, default=ConvertOptions.block_size,
                   help="bytes of text parsed at a time (a block with an irregular line goes through the slower, "
                        "checking parser alone; default: %(default)s)")
    p.add_argument("--vocab-min-count", type=int, metavar="N",
                   help="also write vocab/C1.npy..C26.npy: the ids seen at least N times in --vocab-from")
    p.add_argument("--vocab-from", nargs="+", default=["train"], metavar="NAME",
                   help="outputs counted for the vocabulary, relative to --out: NAME.parquet or the folder NAME/ "
                        "(default: train)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not args.inputs and args.vocab_min_count is None:
        p.error("give input files, or --vocab-min-count to build a vocabulary over existing outputs")
    if args.vocab_min_count is not None and args.vocab_min_count < 1:
        p.error(f"--vocab-min-count must be at least 1, got {args.vocab_min_count}")
    if args.workers < 1:
        p.error(f"--workers must be at least 1, got {args.workers}")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} exists and is not a folder")
    folders = [str(f) for f in args.inputs if f.is_dir()]
    if folders:
        p.error(f"inputs must be files, not folders: {', '.join(folders)} (pass the files in them, e.g. DIR/day_*)")
    missing = [str(f) for f in args.inputs if not f.is_file()]
    if missing:
        print(f"error: no such input file: {', '.join(missing)}", file=sys.stderr)
        return 1
    if args.split == "kaggle" and len(args.inputs) > 1:
        p.error(f"--split kaggle takes one train.txt (its last seventh becomes val/test), got {len(args.inputs)} "
                f"inputs")
    by_output: dict[str, list[str]] = {}
    for f in args.inputs:
        by_output.setdefault(_stem(f), []).append(str(f))
    clashes = {stem: names for stem, names in by_output.items() if len(names) > 1}
    if clashes and args.split != "kaggle":
        stem, names = next(iter(clashes.items()))
        p.error(f"{' and '.join(names)} would all be written to {stem}.parquet (one output per input, named by "
                f"its stem); rename them or convert them into different --out folders")
    try:
        opts = ConvertOptions(skip_bad_rows=args.skip_bad_rows, row_group_size=args.row_group_size,
                              chunk_bytes=args.chunk_bytes, block_size=args.block_bytes)
    except ValueError as e:
        p.error(str(e))
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        results, errors = convert(args.inputs, args.out, args.split, opts, max(1, args.workers),
                                  progress=sys.stderr.isatty())
    except BadInputError as e:
        results, errors = [], [e]
    manifest_path = args.out / "_manifest.json"
    if results:
        write_manifest(manifest_path, args.split, results)
        print(summary(results, time.perf_counter() - t0, args.out))
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if errors:
        return 1
    if args.vocab_min_count is not None:
        try:
            files = [f for name in args.vocab_from for f in parquet_files(args.out, name)]
            vocab = write_vocabulary(files, args.out / "vocab", args.vocab_min_count, workers=max(1, args.workers))
        except (FileNotFoundError, ValueError) as e:
            print(f"error: vocabulary: {e}", file=sys.stderr)
            return 1
        vocab["from"] = [str(f.relative_to(args.out)) for f in files]
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        manifest["vocab"] = vocab
        manifest_path.write_text(json.dumps(manifest, indent=2))
        print(f"vocabulary (ids seen >= {args.vocab_min_count} times in {len(files)} file(s)) -> "
              f"{args.out / 'vocab'}; set model.num_embeddings to:\n{','.join(map(str, vocab['num_embeddings']))}")
    return 0


def write_manifest(path: Path, split: str, results: list[FileResult]) -> None:
    skipped: dict[str, int] = {}
    for r in results:
        for k, v in r.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
    manifest = {"format": "dqrm criteo parquet v1", "split": split, "rows": sum(sum(r.outputs.values()) for r in results),
                "skipped": skipped,
                "conventions": {"dense": "raw int32, transform at read time", "categorical": "uint32 hash",
                                "kaggle_split": "first 6/7 train, 7th day: first half val, second half test",
                                "terabyte_split": "day_0..22 train, day_23: first half val, second half test",
                                "parts": "an input converted in several byte ranges: NAME/part-NNNNN.parquet, "
                                         "in line order"},
                "files": [dataclasses.asdict(r) for r in results]}
    path.write_text(json.dumps(_merge_manifest(path, manifest), indent=2))


def summary(results: list[FileResult], seconds: float, out: Path) -> str:
    rows = sum(sum(r.outputs.values()) for r in results)
    skipped: dict[str, int] = {}
    for r in results:
        for k, v in r.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
    lines = [f"converted {rows:,} rows from {len(results)} file(s) in {seconds:.1f} s "
             f"({rows / max(seconds, 1e-9):,.0f} rows/s) -> {out}"]
    if skipped:
        lines.append("skipped rows: " + ", ".join(f"{k}: {v:,}" for k, v in sorted(skipped.items())))
    if any(not r.labeled for r in results):
        lines.append("note: unlabeled input (Kaggle test.txt): label written as 0; use it for prediction, not "
                     "evaluation")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""Where a one-process conversion's CPU time goes, stage by stage, and what cheaper Parquet encodings would save.

On generated Terabyte-format TSV with fresh hashes (``bench.ingest.write_terabyte_tsv``, ``--gb``), in one process,
CPU time per row (median of ``--reps``) of:

1. reading the file and cutting it into padded line blocks (``datasets.criteo_text._line_blocks``);
2. the compiled parse of every block into Arrow columns (``datasets.tsv_blocks.parse_tsv_block``);
3. writing those rows as Parquet the way the converter does (plain encoding, 262,144-row groups), with the codec it
   ships (snappy), with the others pyarrow has (lz4, zstd, none) and without column statistics, each with the file
   size it gives;
4. the whole conversion (``datasets.convert.convert``, ``--workers 1``): what it does beyond 1-3;
5. counting the file's newlines (``datasets.chunks.count_newlines``), which the converter did for every range of a
   file larger than ``--chunk-bytes`` before converting it, until it counted only where rows are split by position.

Each stage streams block by block as the converter does (holding everything in memory first made each stage
slower than the whole conversion); a stage's cost is the difference between running it with and without it
(1, 1+2, 1+2+3 per codec).

The ceiling of each codec, rows per CPU-second with nothing but stages 1-3, says what the converter could reach by
removing all its other work (issue 33's goal: 2M rows per CPU-second).

    python -m bench.convert_stages [--gb 0.5] [--reps 3] [--scratch DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import add_out_argument, cpu_seconds, provenance, save, table
from bench.ingest import write_terabyte_tsv
from dqrm.datasets.chunks import count_newlines
from dqrm.datasets.convert import ConvertOptions, convert
from dqrm.datasets.criteo_text import _line_blocks, _open_stream
from dqrm.datasets.schema import SCHEMA
from dqrm.datasets.tsv_blocks import parse_tsv_block

# (name, ParquetWriter options): the shipped one first, then the codecs pyarrow has, and the shipped codec without
# the column statistics (min/max per page and row group) the writer computes by default
CODECS = (("snappy", {"compression": "snappy"}), ("lz4", {"compression": "lz4"}), ("zstd", {"compression": "zstd"}),
          ("none", {"compression": "none"}),
          ("snappy, no statistics", {"compression": "snappy", "write_statistics": False}))
SHIPPED = "snappy"


def _stream(tsv: Path, parse: bool, codec: dict | None, out: Path) -> int:
    """Read ``tsv`` in the converter's blocks, streaming as it does; with ``parse``, parse each; with ``codec``, write
    the rows as the converter does (plain encoding, row groups of ``row_group_size``). The output's bytes (or 0)."""
    opts = ConvertOptions()
    writer = pq.ParquetWriter(out, SCHEMA, use_dictionary=False, **codec) if codec is not None else None
    pending, n = [], 0
    with _open_stream(tsv, None) as stream:
        for buf in _line_blocks(stream, opts.block_size):
            if not parse:
                continue
            tbl = parse_tsv_block(buf, True)
            assert tbl is not None, "a generated block was not clean"
            if writer is not None:
                pending.append(tbl)
                n += tbl.num_rows
                if n >= opts.row_group_size:
                    writer.write_table(pa.concat_tables(pending), row_group_size=opts.row_group_size)
                    pending, n = [], 0
    if writer is None:
        return 0
    if pending:
        writer.write_table(pa.concat_tables(pending), row_group_size=opts.row_group_size)
    writer.close()
    return out.stat().st_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=0.5, help="size of the generated TSV, GiB (default: %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="repetitions, the median reported (default: %(default)s)")
    p.add_argument("--scratch", type=Path, default=None,
                   help="folder for the generated files (default: a temporary one)")
    add_out_argument(p)
    args = p.parse_args(argv)
    prov = provenance()
    scratch = Path(tempfile.mkdtemp(prefix="dqrm-stages-", dir=args.scratch))
    try:
        tsv = scratch / "day_0.tsv"
        rows = write_terabyte_tsv(tsv, args.gb, fresh_hashes=True)
        read_s, _ = cpu_seconds(lambda: _stream(tsv, False, None, scratch / "x"), args.reps)
        parsed_s, _ = cpu_seconds(lambda: _stream(tsv, True, None, scratch / "x"), args.reps)
        stages = [{"stage": "read + cut into blocks", "us_per_row": 1e6 * read_s / rows},
                  {"stage": "compiled parse", "us_per_row": 1e6 * (parsed_s - read_s) / rows}]
        codecs = []
        for codec, options in CODECS:
            total_s, size = cpu_seconds(lambda: _stream(tsv, True, options, scratch / "out.parquet"), args.reps)
            write_s = total_s - parsed_s
            stages.append({"stage": f"Parquet write, {codec}" + (" (shipped)" if codec == SHIPPED else ""),
                           "us_per_row": 1e6 * write_s / rows})
            codecs.append({"codec": codec, "write_us_per_row": 1e6 * write_s / rows, "mb": size / 1e6,
                           "ceiling_rows_per_cpu_s": rows / total_s})

        def whole():
            out = scratch / "converted"
            shutil.rmtree(out, ignore_errors=True)
            convert([tsv], out, "files", ConvertOptions(), workers=1)

        whole_s, _ = cpu_seconds(whole, args.reps)
        stages.append({"stage": "whole conversion (convert, --workers 1)", "us_per_row": 1e6 * whole_s / rows})
        count_s, counted = cpu_seconds(lambda: count_newlines(tsv), args.reps)
        assert counted == rows, (counted, rows)
        stages.append({"stage": "newline count of the file (no longer done here)", "us_per_row": 1e6 * count_s / rows})
        shipped = next(c for c in codecs if c["codec"] == SHIPPED)
        text = (f"{rows:,} rows ({args.gb:g} GiB of Terabyte-format TSV, fresh hashes), one process, CPU time per row "
                f"(median of {args.reps})\n\n"
                + table(stages, [("stage", "stage", "s"), ("us_per_row", "us/row", ".3f")])
                + "\n\nceiling of each codec: rows per CPU-second with only reading, parsing and writing\n\n"
                + table(codecs, [("codec", "codec", "s"), ("write_us_per_row", "write us/row", ".3f"),
                                 ("mb", "file MB", ".0f"), ("ceiling_rows_per_cpu_s", "ceiling rows/CPU-s", ",.0f")])
                + f"\n\nthe whole conversion: {rows / whole_s:,.0f} rows per CPU-second; its work beyond the three "
                  f"stages (routing, row numbers, bookkeeping): "
                  f"{1e6 * (whole_s - parsed_s) / rows - shipped['write_us_per_row']:.3f} us/row")
        text += (f"\nwith the newline count first, as before: {rows / (whole_s + count_s):,.0f} rows per CPU-second "
                 f"(the count is {count_s / (whole_s + count_s):.0%} of that)")
        payload = {**prov, "rows": rows, "gb": args.gb, "reps": args.reps, "stages": stages, "codecs": codecs,
                   "whole_rows_per_cpu_s": rows / whole_s, "with_count_rows_per_cpu_s": rows / (whole_s + count_s)}
        print(text)
        print(f"json: {save('convert_stages', payload, text, out=args.out)}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

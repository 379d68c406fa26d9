"""The converter's parse paths for one format, side by side: what each costs per row on the same clean Criteo lines.

1. ``datasets.tsv_blocks`` (one compiled pass over a clean TSV block's bytes), the path every clean block takes;
2. Arrow's CSV reader + ``datasets.criteo_text.parse_batch`` with its column decoders' fast paths (whole-buffer hex
   decoding, Arrow's int32 cast), the path of the Kaggle CSV and of any TSV block with an irregular line;
3. the same with only the general decoders, which every irregular column falls back to (they name bad fields).

Each path parses the Terabyte sample lines (``bench.ingest.SAMPLE``, or ``--sample``) tiled to ``--lines`` rows, in
one process; CPU time per row, median of ``--reps``; all three must give the same table. A path is kept where it pays: (1) over
(2), and (2)'s fast decoders over (3).

    python -m bench.parse_paths [--lines 40000] [--reps 5] [--sample TSV] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyarrow as pa

from bench.common import add_out_argument, cpu_seconds, provenance, save, table
from bench.ingest import SAMPLE
from dqrm.datasets import criteo_text
from dqrm.datasets.tsv_blocks import parse_tsv_block


def _arrow(text: bytes, general: bool) -> pa.Table:
    fast = criteo_text._string_parts  # noqa: SLF001 - the switch between the decoders' fast and general paths
    if general:
        criteo_text._string_parts = lambda col: None
    try:
        batches = criteo_text._csv_rows(pa.BufferReader(pa.py_buffer(text)), "tsv", True, False, 1 << 20, [], 1)
        return pa.concat_tables([criteo_text.parse_batch(b, True)[0] for b in batches])
    finally:
        criteo_text._string_parts = fast


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lines", type=int, default=40000, help="rows parsed per repetition (default: %(default)s)")
    p.add_argument("--reps", type=int, default=5, help="repetitions, the median reported (default: %(default)s)")
    p.add_argument("--sample", type=Path, default=SAMPLE, help="Criteo TSV lines to tile (default: %(default)s)")
    add_out_argument(p)
    args = p.parse_args(argv)
    prov = provenance()
    lines = args.sample.read_bytes().splitlines(keepends=True)
    text = b"".join(lines * -(-args.lines // len(lines)))
    rows = text.count(b"\n")
    block = criteo_text._padded(text, b"")  # noqa: SLF001 - the block buffer the converter hands the compiled parser
    paths = {"tsv_blocks (compiled)": lambda: parse_tsv_block(block, True),
             "Arrow CSV + fast decoders": lambda: _arrow(text, general=False),
             "Arrow CSV + general decoders": lambda: _arrow(text, general=True)}
    tables = [fn() for fn in paths.values()]
    if not all(t.equals(tables[0]) for t in tables[1:]):
        raise AssertionError("the parse paths disagree")
    results = [{"path": name, "us_per_row": 1e6 * cpu_seconds(fn, args.reps)[0] / rows} for name, fn in paths.items()]
    for r in results:
        r["x_compiled"] = r["us_per_row"] / results[0]["us_per_row"]
    text_out = (f"{rows:,} Terabyte sample rows, CPU time per row (median of {args.reps})\n\n" +
                table(results, [("path", "path", "s"), ("us_per_row", "us/row", ".2f"), ("x_compiled", "x compiled",
                                                                                           ".1f")]))
    print(text_out)
    print(f"json: {save('parse_paths', {**prov, 'rows': rows, 'results': results}, text_out, out=args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Ingest: converter rows/s per core and peak memory against TorchRec's ``BinaryCriteoUtils.tsv_to_npys``, the
reader's rows/s into ``Batch``es, and (``--scale``) both again at several input sizes, to show that peak memory does
not grow with the input.

The input is generated Terabyte-format TSV (``write_terabyte_tsv``): the real ``day_0`` sample lines in
../shared/data repeated ("tiled"), or repeated with a share of each categorical column's hashes replaced by fresh
random ones ("fresh hashes": the share of distinct values that column has in the sample). Tiled, the Parquet is 30x
smaller than the TSV, which makes writing it cheap; with fresh hashes it is 4x smaller, closer to real data (if
anything less compressible: over millions of rows real columns repeat more than 1,000 sample rows suggest).
Comparison (as before, tiled): TorchRec's converter is timed on the first --ref-rows rows of a --gb file (at ~30k
rows/s the whole file would take minutes); ours on the same prefix and on the whole file, and on a file of the same
size with fresh hashes. Scale (``--scale 1,10``, fresh hashes): for each size in GiB, generate, convert with
``--workers 1``, delete the TSV, read all the Parquet into ``Batch``es, delete it.

Every converter and reader run is its own process, so peak RSS (VmHWM) is its own; "after imports" is the peak
before any data (the libraries alone), so peak minus it is what the data costs. The clock starts after the
imports (TorchRec's take ~3 s, which would flatter us) and "per core" divides by the process's CPU time (user +
system), so no thread anywhere helps. Files go under --scratch and are removed when done, also on errors. The
report is printed and saved to bench/results/ingest.txt and ingest.json (or --out) with the git commit, the command and
the machine. The reader at the training job's batch size, against the job's own pace, is ``bench.reader_headroom``.

    python -m bench.ingest [--gb 2] [--ref-rows 1000000] [--scale 1,10] [--scratch DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT, add_out_argument, provenance, save, table

SAMPLE = ROOT.parent / "shared" / "data" / "criteo-samples" / "terabyte_day0_0.001sample_head1000.tsv"

# Peak RSS is the kernel's high-water mark of this process's memory (VmHWM), not ru_maxrss: Linux carries the
# parent's peak into ru_maxrss across the exec, so every child would report at least this bench's own RSS.
_PEAK = r'''
import json, resource, sys, time
from dqrm.pipeline.phases import status_bytes
def peak_mb():
    return status_bytes("VmHWM") / 2**20
'''

_CONVERT = _PEAK + r'''
kind, src, out = sys.argv[1:4]
if kind == "torchrec":
    from torchrec.datasets.criteo import BinaryCriteoUtils
else:
    from dqrm.datasets.convert import main
imports = peak_mb()
cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
if kind == "torchrec":
    BinaryCriteoUtils.tsv_to_npys(src, out + "/d.npy", out + "/s.npy", out + "/l.npy", dataset_name="criteo_1tb")
else:
    assert main([src, "--out", out, "--workers", "1"]) == 0
wall, cpu1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": wall, "cpu_seconds": cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime,
                  "peak_rss_mb": peak_mb(), "imports_rss_mb": imports}))
'''

# One torch thread: the reader's own torch work is a few tiny ops per batch (the KJT's lengths), and on a shared,
# loaded machine two OpenMP threads spin-wait on each of them (seen: 10x fewer rows/s); numpy is unaffected.
_READ = _PEAK + r'''
from pathlib import Path
import torch
torch.set_num_threads(1)
from dqrm.datasets.reader import ParquetBatches, ReaderConfig
from dqrm.datasets.schema import parquet_files
from dqrm.pipeline.configs import TERABYTE_CARDINALITIES
folder, name, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
imports = peak_mb()
data = ParquetBatches(parquet_files(Path(folder), name), TERABYTE_CARDINALITIES,
                      ReaderConfig(batch_size=batch, shuffle=True))
cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
rows = sum(b.labels.numel() for b in data)
wall, cpu1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"rows": rows, "seconds": wall,
                  "cpu_seconds": cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime,
                  "peak_rss_mb": peak_mb(), "imports_rss_mb": imports}))
'''

_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def write_terabyte_tsv(path: Path, gb: float, fresh_hashes: bool = True, seed: int = 0,
                       tiles_per_write: int = 64) -> int:
    """Write at least ``gb`` GiB of Terabyte-format lines to ``path``; returns the rows. Labels, counts and
    missing fields are the sample's; with ``fresh_hashes`` each present hash is replaced, with probability (distinct
    values / values of its column in the sample), by a random one. Memory: ``tiles_per_write`` copies of the sample
    (~15 MB)."""
    text = SAMPLE.read_bytes()
    lines = text.splitlines(keepends=True)
    starts, columns, seen = [], [], [set() for _ in range(26)]  # byte offset and column of each present hash
    at = 0
    for line in lines:
        fields = line.rstrip(b"\n").split(b"\t")
        pos = at + sum(len(f) + 1 for f in fields[:14])
        for j, f in enumerate(fields[14:]):
            if f:
                starts.append(pos)
                columns.append(j)
                seen[j].add(f)
            pos += len(f) + 1
        at += len(line)
    fresh = np.array([len(s) for s in seen]) / np.bincount(columns, minlength=26) * fresh_hashes
    base = np.frombuffer(text, dtype=np.uint8)
    offsets = (np.arange(tiles_per_write)[:, None] * len(text) + np.array(starts)).reshape(-1)
    p_fresh = np.tile(fresh[columns], tiles_per_write)
    pristine = np.tile(base, tiles_per_write)
    block = pristine.copy()
    shifts = np.arange(28, -1, -4, dtype=np.uint32)
    rng = np.random.default_rng(seed)
    tiles = -(-int(gb * 2**30) // len(text))
    with open(path, "wb") as f:
        for done in range(0, tiles, tiles_per_write):
            np.copyto(block, pristine)
            pick = offsets[rng.random(len(offsets)) < p_fresh]
            values = rng.integers(0, 2**32, size=len(pick), dtype=np.uint32)
            block[pick[:, None] + np.arange(8)] = _HEX_DIGITS[(values[:, None] >> shifts) & 15]
            f.write(block[:min(tiles_per_write, tiles - done) * len(text)].data)
    return tiles * len(lines)


def run_child(script: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def convert(kind: str, src: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    return run_child(_CONVERT, kind, str(src), str(out))


def read(folder: Path, name: str, batch: int) -> dict:
    return run_child(_READ, str(folder), name, str(batch))


def compare(args: argparse.Namespace, scratch: Path) -> tuple[dict, str]:
    """Converters side by side and the reader on the whole converted file: (JSON payload, report)."""
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        tmp = Path(tmp)
        big = tmp / "day_0.tsv"
        total = write_terabyte_tsv(big, args.gb, fresh_hashes=False)
        prefix = tmp / "prefix.tsv"
        with open(big, "rb") as f, open(prefix, "wb") as g:
            for _ in range(args.ref_rows):
                g.write(f.readline())
        ref = convert("torchrec", prefix, tmp / "ref")
        ours_prefix = convert("ours", prefix, tmp / "ours_prefix")
        ours_full = convert("ours", big, tmp / "ours_full")
        reader = read(tmp / "ours_full", "day_0", 4096)  # part files above --chunk-bytes
        size_gb = big.stat().st_size / 2**30
        for done in (big, prefix):
            done.unlink()
        assert write_terabyte_tsv(big, args.gb) == total
        ours_fresh = convert("ours", big, tmp / "ours_fresh")

    def row(what: str, n: int, r: dict) -> dict:
        return {"what": what, "rows_per_s_per_core": n / r["cpu_seconds"], "rows_per_s_wall": n / r["seconds"],
                "peak_rss_mb": r["peak_rss_mb"], "imports_rss_mb": r["imports_rss_mb"]}

    rows = [row(f"TorchRec tsv_to_npys ({args.ref_rows:,} rows)", args.ref_rows, ref),
            row(f"dqrm convert ({args.ref_rows:,} rows)", args.ref_rows, ours_prefix),
            row(f"dqrm convert ({total:,} rows, {size_gb:.2f} GiB)", total, ours_full),
            row(f"dqrm reader -> Batch (batch 4096, {reader['rows']:,} rows)", reader["rows"], reader),
            row(f"dqrm convert ({total:,} rows, {size_gb:.2f} GiB, fresh hashes)", total, ours_fresh)]
    same, whole, fresh = (rows[i]["rows_per_s_per_core"] / rows[0]["rows_per_s_per_core"] for i in (1, 2, 4))
    report = "\n".join([
        table(rows, [("what", "what", "s"), ("rows_per_s_per_core", "rows/CPU-s", ",.0f"),
                     ("rows_per_s_wall", "rows/s wall", ",.0f"), ("peak_rss_mb", "peak MB", ".0f"),
                     ("imports_rss_mb", "after imports MB", ".0f")]),
        f"converter speedup per core vs TorchRec: {same:.1f}x on the same {args.ref_rows:,} rows, {whole:.1f}x on "
        f"the whole {size_gb:.2f} GiB file, {fresh:.1f}x on the file with fresh hashes (goal 20x); peak memory "
        f"{max(ours_full['peak_rss_mb'], ours_fresh['peak_rss_mb']):.0f} MB (goal 1 GB)"])
    return {"gb": size_gb, "rows": rows, "speedup_same_rows": same, "speedup_whole_file": whole,
            "speedup_whole_file_fresh_hashes": fresh}, report


def scale(sizes: list[float], batch: int, scratch: Path) -> tuple[dict, str]:
    """Converter and reader at each input size (fresh hashes), one size on disk at a time: (JSON payload,
    report)."""
    runs = []
    for gb in sizes:
        need = gb * 2**30 * 1.6 + 2**30  # the TSV, its Parquet (~0.3-0.5x), a margin
        free = shutil.disk_usage(scratch).free
        if free < need:
            raise SystemExit(f"--scale {gb:g}: {free / 2**30:.1f} GiB free under {scratch}, about "
                             f"{need / 2**30:.1f} GiB needed; pass a larger --scratch or smaller sizes")
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            tmp = Path(tmp)
            tsv = tmp / "day_0.tsv"
            t0 = time.perf_counter()
            rows = write_terabyte_tsv(tsv, gb)
            generate_s, tsv_gb = time.perf_counter() - t0, tsv.stat().st_size / 2**30
            conv = convert("ours", tsv, tmp / "pq")
            tsv.unlink()
            manifest = json.loads((tmp / "pq" / "_manifest.json").read_text())
            assert manifest["rows"] == rows, (manifest["rows"], rows)
            parquet_gb = sum(f.stat().st_size for f in (tmp / "pq").rglob("*.parquet")) / 2**30
            rd = read(tmp / "pq", "day_0", batch)
            assert rd["rows"] == rows, (rd["rows"], rows)
        runs.append({"tsv_gb": tsv_gb, "parquet_gb": parquet_gb, "rows": rows, "generate_seconds": generate_s,
                     "convert": {**conv, "rows_per_s_wall": rows / conv["seconds"],
                                 "rows_per_s_per_core": rows / conv["cpu_seconds"]},
                     "read": {**rd, "batch_size": batch, "rows_per_s_wall": rows / rd["seconds"],
                              "rows_per_s_per_core": rows / rd["cpu_seconds"]}})
    lines = []
    for what in ("convert", "read"):
        shown = [{"input": f"{r['tsv_gb']:.2f} GiB TSV" if what == "convert" else f"{r['parquet_gb']:.2f} GiB Parquet",
                 "rows": r["rows"], **r[what]} for r in runs]
        title = ("dqrm convert --workers 1 (one process)" if what == "convert" else
                 f"dqrm reader -> Batch (ParquetBatches, batch {batch}, shuffle, one process)")
        lines += [title, table(shown, [("input", "input", "s"), ("rows", "rows", ",d"), ("seconds", "seconds", ".1f"),
                                      ("rows_per_s_wall", "rows/s wall", ",.0f"),
                                      ("rows_per_s_per_core", "rows/CPU-s", ",.0f"),
                                      ("peak_rss_mb", "peak MB", ".0f"),
                                      ("imports_rss_mb", "after imports MB", ".0f")]), ""]
    small, large = runs[0], runs[-1]
    ratios = {what: large[what]["peak_rss_mb"] / small[what]["peak_rss_mb"] for what in ("convert", "read")}
    lines.append(f"peak RSS at {large['rows'] / small['rows']:.1f}x the rows ({large['rows']:,} vs {small['rows']:,}): "
                 f"converter {ratios['convert']:.2f}x, reader {ratios['read']:.2f}x (flat = 1.00x)")
    return {"sizes_gb": sizes, "runs": runs, "peak_rss_ratio_largest_to_smallest": ratios}, "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=2.0, help="size of the generated TSV of the comparison, GiB")
    p.add_argument("--ref-rows", type=int, default=1_000_000, help="rows TorchRec's converter is timed on")
    p.add_argument("--scale", type=lambda s: sorted(float(x) for x in s.split(",")), default=[],
                   metavar="GB,GB,...", help="also convert and read inputs of these sizes in GiB (e.g. 1,10)")
    p.add_argument("--batch", type=int, default=2048, help="reader batch size of --scale (Terabyte's per rank)")
    p.add_argument("--scratch", type=Path, default=ROOT / ".cache",
                   help="folder for the generated files (default: the repository's ignored .cache, on the project's "
                        "disk rather than a small /tmp); --scale 10 needs ~17 GB free there")
    add_out_argument(p)
    args = p.parse_args()
    args.scratch.mkdir(parents=True, exist_ok=True)
    where = provenance(("datasets", "pipeline"))  # the converter and reader run in child processes
    payload, report = compare(args, args.scratch)
    if args.scale:
        payload["scale"], scaled = scale(args.scale, args.batch, args.scratch)
        report += "\n\n" + scaled
    print(report)
    print(f"json: {save('ingest', {**where, **payload}, report, out=args.out)}")


if __name__ == "__main__":
    main()

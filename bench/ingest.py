"""Ingest: converter rows/s per core and peak memory against TorchRec's ``BinaryCriteoUtils.tsv_to_npys``, and the
reader's rows/s into ``Batch``es, side by side in one run.

The input is real Criteo lines (the Terabyte sample in ../shared/data) tiled to --gb gigabytes of TSV in real
Criteo format. TorchRec's converter is timed on the first --ref-rows rows of that file (at ~40k rows/s the whole
file would take minutes); ours is timed on the same prefix and on the whole file. Each converter runs in its own
process, so peak RSS is its own; the clock starts after the imports (TorchRec's take ~3 s, which would flatter
us) and "per core" divides by the process's CPU time (user + system), so no thread anywhere helps.

    python -m bench.ingest [--gb 2] [--ref-rows 1000000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import save, table
from datasets.schema import parquet_files

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "criteo-samples" / \
    "terabyte_day0_0.001sample_head1000.tsv"

_CHILD = r'''
import json, resource, sys, time
kind, src, out = sys.argv[1:4]
if kind == "torchrec":
    from torchrec.datasets.criteo import BinaryCriteoUtils
else:
    from datasets.convert import main
cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
if kind == "torchrec":
    BinaryCriteoUtils.tsv_to_npys(src, out + "/d.npy", out + "/s.npy", out + "/l.npy", dataset_name="criteo_1tb")
else:
    assert main([src, "--out", out, "--workers", "1"]) == 0
wall, cpu1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": wall, "cpu_seconds": cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime,
                  "peak_rss_mb": cpu1.ru_maxrss / 1024}))
'''


def make_tsv(path: Path, gb: float) -> int:
    lines = SAMPLE.read_bytes()
    n_lines = lines.count(b"\n")
    reps = int(gb * 2**30 / len(lines)) + 1
    with open(path, "wb") as f:
        for _ in range(reps):
            f.write(lines)
    return reps * n_lines


def run_child(kind: str, src: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", _CHILD, kind, str(src), str(out)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def reader_rate(parquet: list[Path], batch_size: int = 4096) -> float:
    from datasets.reader import ParquetBatches, ReaderConfig
    from pipeline.configs import TERABYTE_CARDINALITIES

    data = ParquetBatches(parquet, TERABYTE_CARDINALITIES, ReaderConfig(batch_size=batch_size, shuffle=True))
    t0 = time.perf_counter()
    rows = sum(b.labels.numel() for b in data)
    return rows / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=2.0, help="size of the generated TSV")
    p.add_argument("--ref-rows", type=int, default=1_000_000, help="rows TorchRec's converter is timed on")
    args = p.parse_args()
    scratch = Path(__file__).resolve().parents[1] / ".cache"  # on the project's disk, not a small /tmp
    scratch.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        tmp = Path(tmp)
        big = tmp / "day_0.tsv"
        total = make_tsv(big, args.gb)
        prefix = tmp / "prefix.tsv"
        with open(big, "rb") as f, open(prefix, "wb") as g:
            for _ in range(args.ref_rows):
                g.write(f.readline())
        ref = run_child("torchrec", prefix, tmp / "ref")
        ours_prefix = run_child("ours", prefix, tmp / "ours_prefix")
        ours_full = run_child("ours", big, tmp / "ours_full")
        rate = reader_rate(parquet_files(tmp / "ours_full", "day_0"))  # part files above --chunk-bytes
        size_gb = big.stat().st_size / 2**30
    def row(what: str, n: int, r: dict) -> dict:
        return {"what": what, "rows_per_s_per_core": n / r["cpu_seconds"], "rows_per_s_wall": n / r["seconds"],
                "peak_rss_mb": r["peak_rss_mb"]}

    rows = [row(f"TorchRec tsv_to_npys ({args.ref_rows:,} rows)", args.ref_rows, ref),
            row(f"dqrm convert ({args.ref_rows:,} rows)", args.ref_rows, ours_prefix),
            row(f"dqrm convert ({total:,} rows, {size_gb:.2f} GB)", total, ours_full),
            {"what": "dqrm reader -> Batch (batch 4096)", "rows_per_s_per_core": float("nan"), "rows_per_s_wall": rate,
             "peak_rss_mb": float("nan")}]
    print(table(rows, [("what", "what", "s"), ("rows_per_s_per_core", "rows/CPU-s", ",.0f"),
                       ("rows_per_s_wall", "rows/s wall", ",.0f"), ("peak_rss_mb", "peak MB", ".0f")]))
    same = rows[1]["rows_per_s_per_core"] / rows[0]["rows_per_s_per_core"]
    whole = rows[2]["rows_per_s_per_core"] / rows[0]["rows_per_s_per_core"]
    print(f"converter speedup per core vs TorchRec: {same:.1f}x on the same {args.ref_rows:,} rows, {whole:.1f}x "
          f"on the whole {size_gb:.2f} GB file (goal 20x); peak memory {ours_full['peak_rss_mb']:.0f} MB (goal 1 GB)")
    print(f"json: {save('ingest', {'gb': size_gb, 'rows': rows, 'speedup_same_rows': same, 'speedup_whole_file': whole})}")


if __name__ == "__main__":
    main()

"""What the row alignment of FBGEMM's integer tables costs in bytes and buys in CPU lookup speed, so that the exported
artifacts' alignment is chosen from a measurement.

Each quantized row is ``[fp16 scale][fp16 bias][packed codes]``, padded to a multiple of the row alignment. TorchRec's
quantized ``EmbeddingBagCollection`` pads to ``DEFAULT_ROW_ALIGNMENT = 16`` bytes unless its constructor is given
``row_alignment`` (FBGEMM's own default on CPU is 1). At dimension 16 an INT4 row needs 8 B of codes + 4 B = 12 B and
an INT2 row 8 B: at 16 both take 16 B, so INT2 is no smaller than INT4 and INT4 only 4x smaller than FP32.

For dimension 16 and 64, INT8/INT4/INT2 and alignments 1, 4, 8 and 16, this builds FBGEMM's CPU inference TBE
(``IntNBitTableBatchedEmbeddingBagsCodegen``, the kernel the artifacts run) on the Kaggle table sizes, the same valid
rows (random codes, fp16 scale and bias) in every alignment, and

1. checks that every alignment's pooled outputs equal alignment 16's bit for bit, on every timed batch;
2. times pooled lookups at batch 2048, one id per bag, ids uniform (mostly cache misses) or Zipf (a hot head), the
   four alignments side by side in turns (one pass over 10 batches each per turn, the order rotated every turn);
   reported: bytes per row, table bytes, median ms per batch, and the median of the turns' ratios to alignment 16
   with a 95% bootstrap interval. Times are the process's CPU time (cache-miss stalls count, time spent descheduled
   by other work on a shared machine does not); wall-clock times and their ratios are in the JSON;
3. builds TorchRec's quantized ``EmbeddingBagCollection`` from ``table_name_to_quantized_weights`` (as
   ``quant.convert`` does; codes on FBGEMM's row-wise grid) at every alignment and checks its outputs, and those of
   the FX-traced, TorchScripted, saved and reloaded module (the export path), against alignment 16.

    python -m bench.row_alignment [--reps 41] [--bits 8,4,2] [--dims 16,64] [--max-rows-64 2000000] [--threads 1]
                                  [--out DIR]

At dimension 64 the tables are capped at ``--max-rows-64`` rows (the four INT8 alignments of the full tables would
take 9.7 GB); dimension 16 runs on the full tables (33.8M rows). Results go to bench/results/row_alignment.{json,txt}
(or --out) with the commit, whether the files it ran from differed from that commit, the command and the machine.
"""

from __future__ import annotations

import argparse
import gc
import io
import time

import numpy as np
import torch

from bench.common import add_out_argument, median, paired_ratio, provenance, save, table
from bench.serving_limits import _ids  # the same uniform and Zipf ids as the lookups there
from dqrm.pipeline.configs import KAGGLE_CARDINALITIES
from dqrm.pipeline.quiet import quiet_library_noise

ALIGNMENTS = (1, 4, 8, 16)
BASE = 16
BATCHES = 10
CHECK_ROWS = 50_000  # TorchRec check: tables capped here (the layout, not the size, is what it checks)


def _sparse_type(bits: int):
    from fbgemm_gpu.split_embedding_configs import SparseType
    return {8: SparseType.INT8, 4: SparseType.INT4, 2: SparseType.INT2}[bits]


def _tbe(rows: list[int], dim: int, bits: int, alignment: int):
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen

    tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[(f"t{i}", r, dim, _sparse_type(bits), EmbeddingLocation.HOST) for i, r in enumerate(rows)],
        pooling_mode=PoolingMode.SUM, device="cpu", output_dtype=SparseType.FP32,
        row_alignment=alignment)
    tbe.initialize_weights()
    return tbe


def _fill(tbe, generator: torch.Generator, chunk: int = 1 << 20) -> None:
    """Random codes and a valid fp16 scale and bias in every row (``fill_random_weights`` leaves scale and bias 0,
    which would make every pooled value 0), written through the TBE's unpadded per-table views, in chunks."""
    for codes, scale_bias in tbe.split_embedding_weights():
        for start in range(0, codes.shape[0], chunk):
            c, sb = codes[start:start + chunk], scale_bias[start:start + chunk]
            c.copy_(torch.randint(0, 256, c.shape, dtype=torch.uint8, generator=generator))
            qparams = torch.empty(c.shape[0], 2, dtype=torch.float32)
            qparams[:, 0].uniform_(1e-3, 1e-2, generator=generator)
            qparams[:, 1].uniform_(-0.05, 0.0, generator=generator)
            sb.copy_(qparams.to(torch.float16).view(torch.uint8))


def _copy_rows(dst, src) -> None:
    for (c, sb), (c0, sb0) in zip(dst.split_embedding_weights(), src.split_embedding_weights()):
        c.copy_(c0)
        sb.copy_(sb0)


@torch.no_grad()
def lookups(dim: int, bits: int, rows: list[int], reps: int, seed: int) -> list[dict]:
    """One row per alignment: sizes, bit-exactness against alignment 16, and per id distribution the median ms and
    the paired ratio to alignment 16."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import rounded_row_size_in_bytes

    rng = np.random.default_rng(seed)
    batches = {kind: [_ids(rows, kind, rng) for _ in range(BATCHES)] for kind in ("uniform", "zipf")}
    tbes = {BASE: _tbe(rows, dim, bits, BASE)}
    _fill(tbes[BASE], torch.Generator().manual_seed(seed))
    for a in ALIGNMENTS:
        if a != BASE:
            tbes[a] = _tbe(rows, dim, bits, a)
            _copy_rows(tbes[a], tbes[BASE])
    identical = {a: all(torch.equal(tbes[a](*x), tbes[BASE](*x)) for xs in batches.values() for x in xs)
                 for a in ALIGNMENTS}
    times = {(a, kind): [] for a in ALIGNMENTS for kind in batches}  # CPU ms per batch
    wall = {(a, kind): [] for a in ALIGNMENTS for kind in batches}
    for tbe in tbes.values():  # warm-up: every alignment starts the turns having served the same batches
        for xs in batches.values():
            for x in xs:
                tbe(*x)
    for rep in range(reps):
        order = ALIGNMENTS[rep % len(ALIGNMENTS):] + ALIGNMENTS[:rep % len(ALIGNMENTS)]
        for kind, xs in batches.items():
            for a in order:
                t0, c0 = time.perf_counter(), time.process_time()
                for x in xs:
                    tbes[a](*x)
                times[a, kind].append((time.process_time() - c0) / len(xs) * 1e3)
                wall[a, kind].append((time.perf_counter() - t0) / len(xs) * 1e3)
    out = []
    fp32_bytes = sum(rows) * dim * 4
    for a in ALIGNMENTS:
        row_bytes = rounded_row_size_in_bytes(dim, _sparse_type(bits), a)
        table_bytes = tbes[a].weights_host.numel()
        r = {"dim": dim, "bits": bits, "alignment": a, "row_bytes": row_bytes, "fp32_row_bytes": dim * 4,
             "table_bytes": table_bytes, "table_gb": table_bytes / 1e9, "fp32_over_table": fp32_bytes / table_bytes,
             "identical_to_16": identical[a], "raw_cpu_ms": {}, "raw_wall_ms": {}}
        for kind in batches:
            ratio = paired_ratio(times[a, kind], times[BASE, kind])
            r[f"{kind}_ms"] = median(times[a, kind])
            r[f"{kind}_ratio"] = ratio
            r[f"{kind}_vs16"] = f"{ratio['median']:.3f} [{ratio['ci95'][0]:.3f}, {ratio['ci95'][1]:.3f}]"
            r[f"{kind}_wall_ms"] = median(wall[a, kind])
            r[f"{kind}_wall_ratio"] = paired_ratio(wall[a, kind], wall[BASE, kind])
            r["raw_cpu_ms"][kind], r["raw_wall_ms"][kind] = times[a, kind], wall[a, kind]
        out.append(r)
    del tbes
    gc.collect()
    return out


class _Lookup(torch.nn.Module):
    """The quantized EBC behind plain tensors, as the artifacts call it (values, key-major lengths)."""

    def __init__(self, ebc, feature_names) -> None:
        super().__init__()
        self.ebc, self.feature_names = ebc, list(feature_names)

    def forward(self, values, lengths):  # no annotations: this module's are strings, which FX would copy
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        return self.ebc(KeyedJaggedTensor(keys=self.feature_names, values=values, lengths=lengths)).values()


@torch.no_grad()
def torchrec_check(bits_list: list[int], seed: int) -> list[dict]:
    """TorchRec's quantized EBC built from the same ``table_name_to_quantized_weights`` at each alignment: padded
    row width of its state-dict ``weight``, and whether its outputs, eager and exported, equal alignment 16's."""
    from torchrec.fx import symbolic_trace
    from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig
    from torchrec.quant.embedding_modules import DEFAULT_ROW_ALIGNMENT
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection

    from bench.common import random_batches
    from dqrm.datasets.schema import FEATURE_NAMES
    from dqrm.quant.fake_quant import pack_rows, quantize_codes, rowwise_qparams

    def quantized(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        scale, bias = rowwise_qparams(w, bits)  # FBGEMM's row-wise grid, as the exported tables hold it
        return pack_rows(quantize_codes(w, scale, bias, bits), scale, bias, bits)

    assert DEFAULT_ROW_ALIGNMENT == BASE, DEFAULT_ROW_ALIGNMENT
    rows = [min(r, CHECK_ROWS) for r in KAGGLE_CARDINALITIES]
    g = torch.Generator().manual_seed(seed)
    inputs = [(b.sparse_features.values(), b.sparse_features.lengths()) for b in random_batches(rows, 2048, 2, seed)]
    out = []
    for bits in bits_list:
        tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=16, num_embeddings=r, feature_names=[f],
                                     data_type=getattr(DataType, f"INT{bits}")) for f, r in zip(FEATURE_NAMES, rows)]
        weights = {t.name: quantized(torch.randn(t.num_embeddings, 16, generator=g) * 0.05, bits) for t in tables}
        results = {}
        for a in ALIGNMENTS:
            ebc = QuantEmbeddingBagCollection(tables=tables, is_weighted=False, device=torch.device("cpu"),
                                              table_name_to_quantized_weights=weights, row_alignment=a)
            eager = _Lookup(ebc, FEATURE_NAMES)
            buf = io.BytesIO()
            torch.jit.save(torch.jit.script(symbolic_trace(eager)), buf)
            buf.seek(0)
            loaded = torch.jit.load(buf)
            results[a] = ([eager(*x) for x in inputs], [loaded(*x) for x in inputs],
                          ebc.embedding_bags[tables[0].name].weight.view(dtype=torch.uint8).shape[1])
        for a in ALIGNMENTS:
            eager, exported, width = results[a]
            out.append({"bits": bits, "alignment": a, "state_dict_row_bytes": width,
                        "eager_identical_to_16": all(map(torch.equal, eager, results[BASE][0])),
                        "exported_identical_to_16": all(map(torch.equal, exported, results[BASE][0]))})
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=41, help="timed turns (each: one pass over 10 batches per alignment)")
    p.add_argument("--bits", default="8,4,2", help="comma-separated bit widths, of 8, 4, 2")
    p.add_argument("--dims", default="16,64", help="comma-separated embedding dimensions")
    p.add_argument("--max-rows-64", type=int, default=2_000_000,
                   help="cap every table at this many rows at dimensions above 16 (memory); 0: no cap")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads (1: the per-core cost, which is what the layout changes; with 2 threads on "
                        "a shared 2-core machine, waits at the kernel's thread barrier dominated)")
    p.add_argument("--seed", type=int, default=0)
    add_out_argument(p)
    args = p.parse_args()
    prov = provenance()
    quiet_library_noise()
    torch.set_num_threads(args.threads)
    bits_list = [int(b) for b in args.bits.split(",")]
    dims = [int(d) for d in args.dims.split(",")]
    lines = [f"FBGEMM CPU inference TBE, 26 Kaggle-sized tables (dimension 16: all {sum(KAGGLE_CARDINALITIES):,} "
             f"rows; above 16: capped at {args.max_rows_64:,} rows), batch 2048, one id per bag, {args.threads} "
             f"thread(s); CPU ms per batch, medians of {args.reps} turns; /16: median of the turns' ratios to "
             f"alignment 16 [95% bootstrap interval]; xFP32: FP32 table bytes / these table bytes"]
    print(lines[0], flush=True)
    rows_out = []
    for dim in dims:
        rows = [min(r, args.max_rows_64) if dim > 16 and args.max_rows_64 else r for r in KAGGLE_CARDINALITIES]
        for bits in bits_list:
            rows_out += lookups(dim, bits, rows, args.reps, args.seed)
            print(f"  dim {dim} INT{bits} done", flush=True)
    lines.append(table(rows_out, [
        ("dim", "dim", "d"), ("bits", "bits", "d"), ("alignment", "align", "d"), ("row_bytes", "B/row", "d"),
        ("table_gb", "table GB", ".3f"), ("fp32_over_table", "xFP32", ".2f"), ("uniform_ms", "uniform ms", ".3f"),
        ("uniform_vs16", "uniform /16 [95%]", "s"), ("zipf_ms", "zipf ms", ".3f"),
        ("zipf_vs16", "zipf /16 [95%]", "s")]))
    differ = [(r["dim"], r["bits"], r["alignment"]) for r in rows_out if not r["identical_to_16"]]
    lines.append("pooled outputs bit-for-bit equal to alignment 16's on every timed batch, every configuration: "
                 + (f"NO, differ: {differ}" if differ else "yes"))
    print("\n".join(lines[1:]), flush=True)
    check = torchrec_check(bits_list, args.seed)
    lines.append(f"\nTorchRec quantized EmbeddingBagCollection(..., table_name_to_quantized_weights=..., "
                 f"row_alignment=A), 26 tables capped at {CHECK_ROWS:,} rows, dimension 16, 2 batches of 2048; "
                 f"exported = FX-traced, TorchScripted, saved and reloaded")
    lines.append(table(check, [("bits", "bits", "d"), ("alignment", "align", "d"),
                               ("state_dict_row_bytes", "state-dict row B", "d"),
                               ("eager_identical_to_16", "eager == A16", ""),
                               ("exported_identical_to_16", "exported == A16", "")]))
    print("\n".join(lines[-2:]), flush=True)
    payload = {"batch": 2048, "threads": args.threads, "reps": args.reps, "max_rows_64": args.max_rows_64,
               **prov, "outputs_identical_to_16": not differ, "lookups": rows_out, "torchrec_check": check}
    path = save("row_alignment", payload, "\n".join(lines), out=args.out)
    print(f"json: {path}")

if __name__ == "__main__":
    main()

"""What lower precision can buy a CPU serving batch (2048 samples), piece by piece: the table lookups and the MLPs.

``bench/inference.py`` finds the INT4 artifact about as fast as the FP32 one. This script measures why, on the two
parts whose kernels a precision change could replace:

1. **Lookups**: FBGEMM's inference TBE (``IntNBitTableBatchedEmbeddingBagsCodegen``, the kernel the artifacts run)
   with FP32, INT8 and INT4 rows, on the Kaggle table sizes at dimension 16 (the Kaggle model) and 64 (the Terabyte
   model's width, where an FP32 row is four cache lines and an INT4 row one), ids uniform (mostly misses) or Zipf
   (a hot head, as in Criteo).
2. **MLPs**: the over-arch as float GEMMs (what the artifact runs: weight-only quantization keeps activations
   float, as the paper specifies), with INT8 activations on oneDNN's integer kernels (INT4 weight codes, static
   activation scales, each layer's output requantized in the kernel), and under bfloat16 autocast. The last two
   change the logits (printed: largest difference from float); neither is what QAT evaluated.

    python -m bench.serving_limits [--reps 7] [--max-rows N] [--threads N] [--out DIR]

The largest tables at dimension 64 take 8.6 GB as FP32 rows; ``--max-rows`` caps every table (the cap is recorded).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench.common import Report, add_out_argument, median, save, table
from dqrm.pipeline.configs import KAGGLE_CARDINALITIES

BATCH = 2048
OVER_ARCHES = {"default (367-256-128-1)": (367, 256, 128, 1), "kaggle (367-512-256-1)": (367, 512, 256, 1)}


def _ids(rows: list[int], kind: str, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One id per bag for every table, table-major (the TBE's layout), and the offsets."""
    parts = []
    for r in rows:
        if kind == "uniform":
            x = rng.integers(0, r, BATCH)
        else:  # a Zipf head scattered over the table, so hot rows are not neighbours
            x = (np.minimum(rng.zipf(1.2, BATCH) - 1, r - 1) * 2654435761) % r
        parts.append(torch.from_numpy(x.astype(np.int32)))
    ids = torch.cat(parts)
    return ids, torch.arange(ids.numel() + 1, dtype=torch.int32)


def _timed(fn, inputs: list, reps: int) -> float:
    """Median seconds per call over ``reps`` passes through ``inputs`` (after two warm-up calls)."""
    for x in inputs[:2]:
        fn(*x)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for x in inputs:
            fn(*x)
        times.append((time.perf_counter() - t0) / len(inputs))
    return median(times)


@torch.no_grad()
def lookups(reps: int, max_rows: int | None) -> list[dict]:
    """Per dimension, the three TBEs are built side by side and timed in turns (one pass over 10 batches each, per
    repetition), so that a slow spell of a shared machine hits every precision alike."""
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen

    rows = [min(r, max_rows) if max_rows else r for r in KAGGLE_CARDINALITIES]
    rng = np.random.default_rng(0)
    out = []
    for dim in (16, 64):
        batches = {kind: [_ids(rows, kind, rng) for _ in range(10)] for kind in ("uniform", "zipf")}
        tbes = {}
        for precision in ("FP32", "INT8", "INT4"):
            tbes[precision] = IntNBitTableBatchedEmbeddingBagsCodegen(
                embedding_specs=[(f"t{i}", r, dim, getattr(SparseType, precision), EmbeddingLocation.HOST)
                                 for i, r in enumerate(rows)],
                pooling_mode=PoolingMode.SUM, device="cpu", output_dtype=SparseType.FP32)
            tbes[precision].fill_random_weights()
        times = {(p, kind): [] for p in tbes for kind in batches}
        for _ in range(reps):
            for kind, inputs in batches.items():
                for precision, tbe in tbes.items():
                    times[precision, kind].append(_timed(tbe, inputs, 1) * 1e3)
        del tbes
        for kind in batches:
            ms = {p: median(times[p, kind]) for p in ("FP32", "INT8", "INT4")}
            ratio = median([a / b for a, b in zip(times["FP32", kind], times["INT4", kind])])
            out.append({"dim": dim, "ids": kind, "fp32_ms": ms["FP32"], "int8_ms": ms["INT8"], "int4_ms": ms["INT4"],
                        "fp32_over_int4": ratio, "fp32_gb": sum(rows) * dim * 4 / 1e9,
                        "raw_ms": {p: times[p, kind] for p in ms}})
    return out


def _float_mlp(x, weights, biases):
    for i, (w, b) in enumerate(zip(weights, biases)):
        x = torch.addmm(b, x, w.t())
        x = torch.relu(x) if i < len(weights) - 1 else x
    return x


def _int4_rows(w: torch.Tensor) -> torch.Tensor:
    """``w`` on a symmetric INT4 grid with one scale per output row (the artifact's dequantized MLP weight)."""
    s = w.abs().amax(1, keepdim=True).clamp_min(1e-8) / 7
    return torch.clamp(torch.round(w / s), -8, 7) * s


def _int8_activation_mlp(weights, biases, x_calibration):
    """The same MLP on oneDNN's INT8 kernels: INT4 weight codes per output row, activations as uint8 with one scale
    per layer taken from a calibration batch, every layer but the last requantizing its output in the kernel."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers quantized_decomposed ops

    packed, scales, zeros, act_scales = [], [], [], []
    lo, hi = float(x_calibration.amin()), float(x_calibration.amax())
    first_zero = round(-lo / ((hi - lo) / 255))  # the input has negative dot products; later ones follow a ReLU
    h = x_calibration
    for i, (w, b) in enumerate(zip(weights, biases)):
        s = w.abs().amax(1).clamp_min(1e-8) / 7
        codes = torch.clamp(torch.round(w / s[:, None]), -8, 7).to(torch.int8)
        packed.append(torch.ops.onednn.qlinear_prepack(codes, [BATCH, w.shape[1]]))
        scales.append(s)
        zeros.append(torch.zeros(len(s), dtype=torch.int64))
        act_scales.append((hi - lo) / 255 if i == 0 else float(h.amax()) / 255)
        h = torch.addmm(b, h, w.t())
        h = torch.relu(h) if i < len(weights) - 1 else h

    def run(x):
        q = torch.ops.quantized_decomposed.quantize_per_tensor(x, act_scales[0], first_zero, 0, 255, torch.uint8)
        for i in range(len(packed)):
            last = i == len(packed) - 1
            q = torch.ops.onednn.qlinear_pointwise(
                q, act_scales[i], first_zero if i == 0 else 0, packed[i], scales[i], zeros[i], biases[i],
                1.0 if last else act_scales[i + 1], 0, torch.float32 if last else None,
                "none" if last else "relu", [], "")
        return q
    return run


@torch.no_grad()
def mlps(reps: int) -> list[dict]:
    torch.manual_seed(0)
    out = []
    for name, sizes in OVER_ARCHES.items():
        weights = [_int4_rows(torch.randn(b, a) / a ** 0.5) for a, b in zip(sizes[:-1], sizes[1:])]
        biases = [torch.randn(b) * 0.1 for b in sizes[1:]]
        inputs = [(torch.randn(BATCH, sizes[0]),) for _ in range(5)]
        variants = {"float": lambda x: _float_mlp(x, weights, biases),
                    "int8 activations": _int8_activation_mlp(weights, biases, inputs[0][0])}

        def bf16(x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return _float_mlp(x, weights, biases).float()
        variants["bf16 autocast"] = bf16
        reference = _float_mlp(inputs[1][0], weights, biases)
        for variant, fn in variants.items():
            diff = (fn(inputs[1][0]).reshape(reference.shape) - reference).abs().max().item()
            out.append({"over_arch": name, "variant": variant, "ms": _timed(fn, inputs, reps) * 1e3,
                        "max_logit_diff": diff})
        base = next(r["ms"] for r in out if r["over_arch"] == name and r["variant"] == "float")
        for r in out:
            if r["over_arch"] == name:
                r["speedup"] = base / r["ms"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=7, help="timed passes over 10 batches (medians reported)")
    p.add_argument("--max-rows", type=int, default=None, help="cap every table at this many rows (memory)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads")
    add_out_argument(p)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    report = Report()
    report(f"lookups: 26 Kaggle-sized tables{f' capped at {args.max_rows:,} rows' if args.max_rows else ''}, "
           f"batch {BATCH}, one id per bag, {args.threads} torch threads; ms per batch, medians of {args.reps} turns "
           f"(FP32/INT4: median of the turns' ratios)")
    lk = lookups(args.reps, args.max_rows)
    report(table(lk, [("dim", "dim", "d"), ("ids", "ids", "s"), ("fp32_gb", "FP32 GB", ".1f"),
                      ("fp32_ms", "FP32", ".2f"), ("int8_ms", "INT8", ".2f"), ("int4_ms", "INT4", ".2f"),
                      ("fp32_over_int4", "FP32/INT4 (paired)", ".2f")]))
    report(f"\nover-arch MLP at batch {BATCH}: ms per batch and largest logit difference from float")
    ml = mlps(args.reps)
    report(table(ml, [("over_arch", "over arch", "s"), ("variant", "variant", "s"), ("ms", "ms", ".3f"),
                      ("speedup", "x float", ".2f"), ("max_logit_diff", "max |diff|", ".2e")]))
    payload = {"batch": BATCH, "threads": args.threads, "max_rows": args.max_rows, "lookups": lk, "mlps": ml}
    print(f"json: {save('serving_limits', payload, report.text, out=args.out)}")

if __name__ == "__main__":
    main()

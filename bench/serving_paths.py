"""Paths to faster serving, measured side by side (issue 33, point 1): Inductor compilation of the artifacts'
torch.export programs, and what integer activations could gain in the MLPs' GEMMs.

1. The FP32 and the INT4-with-bfloat16-MLPs artifacts of one model (``bench.inference``'s, random weights), each
   served four ways: the TorchScript artifact (``.pt``), its torch.export program (``.pt2``), that program through
   ``torch.compile`` (Inductor, default options: needs a C++ compiler on the serving host), and the same with
   Inductor's ``freezing`` (weights as constants, prepacked for oneDNN). For each: samples/s at batch 2048 and the
   ratio to the FP32 artifact (median of the repetitions' ratios, variants alternated, bootstrap 95% interval),
   p50/p99 latency of one call at batch 1 and 64, and the largest logit difference from the program it compiles.
2. The default model's MLP layers as single GEMMs at batch 1, 64 and 2048: float32 and bfloat16 ``F.linear``, and
   ``torch._int_mm`` (int8 x int8 -> int32, without the scaling an int8 layer also needs), median of ``--gemm-calls``
   calls each: the ceiling integer activations could reach before their epilogues.

    python -m bench.serving_paths [--batches 10] [--reps 9] [--latency-calls 300] [--gemm-calls 50] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bench.common import Report, add_out_argument, median, paired_ratio, provenance, save, table
from bench.inference import (BATCH, BF16, LATENCY_BATCHES, _artifacts, _fp32_artifact, _inputs, _latency, _slice,
                             alternated_times)
from dqrm.datasets.schema import FEATURE_NAMES
from dqrm.pipeline.configs import get_config
from dqrm.pipeline.quiet import quiet_library_noise
from dqrm.quant.export import load_with_manifest
from dqrm.quant.program import program_path

WAYS = ("artifact", "program", "compiled", "compiled+freezing")


def _served(paths: dict) -> dict:
    """{"<model> <way>": module}; the compiled ones compile at their first call."""
    modules = {}
    for name in ("fp32", BF16):
        modules[f"{name} artifact"] = load_with_manifest(paths[name])[0]
        program = load_with_manifest(program_path(paths[name]))[0]
        modules[f"{name} program"] = program
        modules[f"{name} compiled"] = torch.compile(program)
        modules[f"{name} compiled+freezing"] = torch.compile(program, options={"freezing": True})
    return modules


@torch.no_grad()
def _compile_and_check(modules: dict, inputs: list) -> tuple[dict, dict]:
    """Compile every compiled variant at each batch size (first calls), and its largest logit difference from the
    program it compiles: {name: seconds}, {name: max |diff|}."""
    seconds, diffs = {}, {}
    for name, m in modules.items():
        if "compiled" not in name:
            continue
        program = modules[name.rsplit(" ", 1)[0] + " program"]
        t0 = time.perf_counter()
        worst = 0.0
        for rows in (BATCH, *LATENCY_BATCHES):
            for x in inputs[:2]:
                x = x if rows == BATCH else _slice(x, rows, len(FEATURE_NAMES))
                worst = max(worst, float((m(*x) - program(*x)).abs().max()))
        seconds[name], diffs[name] = time.perf_counter() - t0, worst
    return seconds, diffs


def _gemm_ms(calls: int, fn) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * median(times)


def _gemms(cfg, calls: int) -> list[dict]:
    """Each MLP layer of the default model as one GEMM, float32 / bfloat16 / int8, at the serving batch sizes."""
    features = len(FEATURE_NAMES)
    dims = [13, *cfg.model.dense_arch]
    top_in = cfg.model.embedding_dim + (features + 1) * features // 2
    layers = list(zip(dims[:-1], dims[1:])) + list(zip([top_in, *cfg.model.over_arch[:-1]], cfg.model.over_arch))
    torch.manual_seed(0)
    out = []
    for batch in (*LATENCY_BATCHES, BATCH):
        for k, n in layers:
            x, w, b = torch.randn(batch, k), torch.randn(n, k), torch.randn(n)
            xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
            kp, np_ = -(-k // 8) * 8, -(-n // 8) * 8  # _int_mm wants K and N in multiples of 8, M above 16
            xi = torch.randint(-127, 128, (max(batch, 17), kp), dtype=torch.int8)
            wi = torch.randint(-7, 8, (kp, np_), dtype=torch.int8)
            row = {"batch": batch, "layer": f"{k}x{n}",
                   "fp32_ms": _gemm_ms(calls, lambda: F.linear(x, w, b)),
                   "bf16_ms": _gemm_ms(calls, lambda: F.linear(xb, wb, bb)),
                   "int8_ms": _gemm_ms(calls, lambda: torch._int_mm(xi, wi))}
            row["bf16_x"], row["int8_x"] = row["fp32_ms"] / row["bf16_ms"], row["fp32_ms"] / row["int8_ms"]
            out.append(row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=10, help="batches of 2048 per repetition")
    p.add_argument("--reps", type=int, default=9, help="repetitions (medians reported)")
    p.add_argument("--latency-calls", type=int, default=300, help="timed calls per variant and latency batch size")
    p.add_argument("--gemm-calls", type=int, default=50, help="timed calls per GEMM")
    add_out_argument(p)
    args = p.parse_args()
    prov = provenance()
    quiet_library_noise()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    cfg = get_config("default")
    report = Report()
    with tempfile.TemporaryDirectory() as tmp:
        paths, model = _artifacts(cfg, Path(tmp))
        _, paths["fp32"] = _fp32_artifact(cfg, model, Path(tmp))
        del model
        modules = _served(paths)
        inputs = _inputs(cfg, args.batches)
        compile_s, diffs = _compile_and_check(modules, inputs)
        with torch.no_grad():  # as the compiled modules were compiled: no recompilation in the timed calls
            times = alternated_times(modules, inputs, args.reps)
        latency = {rows: _latency(modules, inputs, rows, args.latency_calls) for rows in LATENCY_BATCHES}
        del modules
    rows = []
    for name, t in times.items():
        paired = paired_ratio(times["fp32 artifact"], t)
        rows.append({"served": name, "samples_per_s": 1 / median(t), "x_fp32": paired["median"],
                     "lo": paired["ci95"][0], "hi": paired["ci95"][1],
                     **{f"p{q}_b{r}_ms": latency[r][name][f"p{q}_ms"] for r in LATENCY_BATCHES for q in (50, 99)},
                     "max_diff": diffs.get(name, 0.0), "compile_s": compile_s.get(name, 0.0)})
    report(f"default model, random weights, {torch.get_num_threads()} torch threads; samples/s at batch {BATCH}: "
           f"median of {args.reps} repetitions of {args.batches} batches, variants alternated; x FP32: median of "
           f"the repetitions' FP32-artifact time / the variant's [95% bootstrap interval]; latency: p50/p99 of "
           f"{args.latency_calls} calls per variant and batch size, alternated in chunks of 20; max diff: largest "
           f"|logit| difference of a compiled program from the program it compiles (batches {BATCH}, 1, 64); "
           f"compile s: first calls at those batch sizes")
    columns = [("served", "served", "s"), ("samples_per_s", "samples/s", ".0f"), ("x_fp32", "x FP32", ".2f"),
               ("lo", "95% lo", ".2f"), ("hi", "95% hi", ".2f")]
    columns += [(f"p{q}_b{r}_ms", f"p{q} ms b{r}", ".3f") for r in LATENCY_BATCHES for q in (50, 99)]
    columns += [("max_diff", "max diff", ".1e"), ("compile_s", "compile s", ".1f")]
    report(table(rows, columns))
    by = {r["served"]: r for r in rows}
    for way in WAYS[1:]:
        report(f"{way}: INT4 bf16-MLP / FP32 (both served this way), samples/s at batch {BATCH}: "
               f"{by[f'{BF16} {way}']['samples_per_s'] / by[f'fp32 {way}']['samples_per_s']:.2f}x")
    gemms = _gemms(cfg, args.gemm_calls)
    report(f"\nthe MLP layers as single GEMMs (median of {args.gemm_calls} calls, ms): float32 and bfloat16 F.linear "
           f"with bias, int8 torch._int_mm without bias or scaling; x: float32 time / that one's")
    report(table(gemms, [("batch", "batch", "d"), ("layer", "in x out", "s"), ("fp32_ms", "fp32 ms", ".4f"),
                         ("bf16_ms", "bf16 ms", ".4f"), ("int8_ms", "int8 ms", ".4f"), ("bf16_x", "bf16 x", ".2f"),
                         ("int8_x", "int8 x", ".2f")]))
    payload = {**prov, "batch": BATCH, "batches": args.batches, "reps": args.reps,
               "latency_calls": args.latency_calls, "rows": rows, "raw_s": times, "latency": latency,
               "gemms": gemms}
    print(f"json: {save('serving_paths', payload, report.text, out=args.out)}")


if __name__ == "__main__":
    main()

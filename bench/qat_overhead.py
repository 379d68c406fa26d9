"""QAT / FP32 training step-time ratio as tables grow (10^5, 10^6, 10^7 rows), beside a naive full-table fake-quant.

One process, DMP at world size 1 on CPU, a DLRM whose 4 largest tables have N rows (22 small ones), the same
random batches for every variant, variants alternated every 10 steps; medians over those chunks reported, and
QAT/FP32 as the median of the chunk-by-chunk ratios with a bootstrap 95% interval of it. At batch 128 (the
default and Kaggle jobs') and 2048 (the Terabyte job's): the QAT cost per step is mostly fixed (the MLP weights'
fake-quant does not depend on the batch), so the ratio depends on it.

- fp32:  plain training step;
- qat:   dqrm's embedding + MLP QAT (only touched rows fake-quantized). The per-table scale refresh
         (``alpha = max|W|`` over whole tables, every 200 steps by default; it rescans only the rows looked up
         since the previous one) is timed on its own after 200 training steps and reported amortized over them,
         so that a repetition does not happen to include or miss one;
- naive: QAT that recomputes the scale and fake-quantizes every row of every table on every step (what a
         weight parametrization of the whole table would cost), for contrast.

    python -m bench.qat_overhead [--rows 100000,1000000,10000000] [--batch 128,2048] [--steps 100] [--reps 3]
                                 [--out DIR]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from bench.common import (Report, add_out_argument, median, optimizer_name, paired_ratio, random_batches, save,
                          sharded_model, table, train_step_seconds)
from dqrm.pipeline.config import ModelConfig, OptimConfig
from dqrm.pipeline.optimizer import build_optimizer
from dqrm.pipeline.quiet import quiet_library_noise
from dqrm.quant.api import QATConfig, QuantSpec, embedding_quantizer, quantize_
from dqrm.quant.fake_quant import fake_quantize, symmetric_qparams

REFRESH_EVERY = QuantSpec().scale_update_every
CHUNK = 10


def _build(cards, variant):
    model = sharded_model(ModelConfig(num_embeddings=cards), OptimConfig())
    if variant != "fp32":
        quantize_(model, QATConfig(spec=QuantSpec(scale_update_every=10**9 if variant == "qat" else 1)),
                  pg=dist.group.WORLD)
    if variant == "naive":
        quantizer = embedding_quantizer(model)

        def full_table_fake_quant(module, args):
            for lay in quantizer._layouts:  # noqa: SLF001 - the contrast needs every row of every table
                flat = lay.flat_weights().detach()
                for t, rows in enumerate(lay.local_rows):
                    w = flat[int(lay.weights_offsets()[t]):][: rows * lay.local_dims[t]].view(rows, -1)
                    s, b = symmetric_qparams(w.abs().max().reshape(1), 4)
                    fake_quantize(w, s, b, 4)
        model.module.register_forward_pre_hook(full_table_fake_quant)
    return model, build_optimizer(model, OptimConfig())


def _measure(models, cards, batch, args, naive: bool, report: Report) -> dict:
    """Step times of the variants at one batch size (variants alternated), and the amortized scale refresh."""
    batches = random_batches(cards, batch, args.steps)
    variants = {v: mo for v, mo in models.items() if naive or v != "naive"}
    for m, o in variants.values():
        train_step_seconds(m, o, batches[:10])
    # Variants alternate every CHUNK steps (the machine's load drifts over all of them alike); the median over
    # chunks is reported. The naive variant is slow enough that a few steps per repetition tell.
    times = {v: [] for v in variants}
    for _ in range(args.reps):
        for start in range(0, len(batches), CHUNK):
            for v, (m, o) in variants.items():
                if v != "naive":
                    times[v].append(train_step_seconds(m, o, batches[start:start + CHUNK]))
        if "naive" in variants:
            times["naive"].append(train_step_seconds(*variants["naive"], batches[:args.naive_steps]))
    med = {v: median(t) for v, t in times.items()}
    paired = paired_ratio(times["qat"], times["fp32"])  # chunk by chunk: the two ran seconds apart
    # The refresh as training runs it: after REFRESH_EVERY steps, rescan the rows looked up since the last one.
    qat_model, qat_opt = models["qat"]
    quantizer = embedding_quantizer(qat_model)
    quantizer.enabled = False  # forgets the per-row maxima, as at the start of a job
    quantizer.enabled = True
    t0 = time.perf_counter()
    quantizer.update_scales(incremental=True)  # the first one in a job reads every row
    first_refresh = time.perf_counter() - t0
    refresh = []
    for _ in range(2):
        for _ in range(0, REFRESH_EVERY, len(batches)):
            train_step_seconds(qat_model, qat_opt, batches)
        t0 = time.perf_counter()
        quantizer.update_scales(incremental=True)
        refresh.append(time.perf_counter() - t0)
    per_step = median(refresh) / REFRESH_EVERY
    row = {"batch": batch, "fp32_ms": 1e3 * med["fp32"], "qat_ms": 1e3 * med["qat"],
           "refresh_ms": 1e3 * median(refresh), "first_refresh_ms": 1e3 * first_refresh,
           "naive_ms": 1e3 * med["naive"] if naive else float("nan"),
           "qat_ratio": paired["median"], "ci_lo": paired["ci95"][0], "ci_hi": paired["ci95"][1],
           "qat_ratio_amortized": paired["median"] + per_step / med["fp32"],
           "naive_ratio": med["naive"] / med["fp32"] if naive else float("nan"), "raw_s": times}
    report(f"batch {batch}: fp32 {row['fp32_ms']:.2f} ms, qat {row['qat_ms']:.2f} ms (+ scale refresh "
           f"{row['refresh_ms']:.1f} ms every {REFRESH_EVERY} steps; the job's first one "
           f"{row['first_refresh_ms']:.0f} ms)" + (f", naive {row['naive_ms']:.2f} ms" if naive else ""))
    return row


def main() -> None:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="100000,1000000,10000000", help="rows of each of the 4 large tables")
    p.add_argument("--batch", default="128,2048",
                   help="batch sizes (the default and kaggle jobs' 128 first; the naive contrast runs at the first)")
    p.add_argument("--steps", type=int, default=100, help="timed steps per repetition")
    p.add_argument("--reps", type=int, default=3, help="repetitions (medians reported)")
    p.add_argument("--naive-steps", type=int, default=3, help="timed steps of the naive variant per repetition")
    add_out_argument(p)
    args = p.parse_args()
    quiet_library_noise()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    report = Report()
    report(f"world size 1, {torch.get_num_threads()} torch threads, optimizer: {optimizer_name(OptimConfig())}; "
           f"{args.steps} timed steps per repetition, {args.reps} repetitions, variants alternated every {CHUNK} "
           f"steps; qat/fp32: median of the {args.reps * (args.steps // CHUNK)} chunks' ratios [95% bootstrap "
           f"interval]")
    rows = []
    sizes = [int(b) for b in args.batch.split(",")]
    for n in map(int, args.rows.split(",")):
        cards = tuple([1000] * 22 + [n] * 4)
        models = {v: _build(cards, v) for v in ("fp32", "qat", "naive")}
        report(f"rows/table {n:,}:")
        for i, batch in enumerate(sizes):
            rows.append({"rows_per_table": n, **_measure(models, cards, batch, args, naive=i == 0, report=report)})
        del models
    report(table(rows, [("rows_per_table", "rows/table", ",d"), ("batch", "batch", "d"),
                        ("fp32_ms", "fp32 ms/step", ".2f"), ("qat_ms", "qat ms/step", ".2f"),
                        ("refresh_ms", "refresh ms", ".1f"), ("naive_ms", "naive ms/step", ".2f"),
                        ("qat_ratio", "qat/fp32", ".3f"), ("ci_lo", "95% lo", ".3f"), ("ci_hi", "95% hi", ".3f"),
                        ("qat_ratio_amortized", "+refresh/200", ".3f"),
                        ("naive_ratio", "naive/fp32", ".2f")]))
    payload = {"batch": sizes, "steps": args.steps, "reps": args.reps, "rows": rows}
    print(f"json: {save('qat_overhead', payload, report.text, out=args.out)}")


if __name__ == "__main__":
    main()

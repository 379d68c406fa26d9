"""Where the QAT step's extra time goes: the FP32 and the QAT training step profiled op by op, side by side.

The models and batches of ``bench.qat_overhead`` (DMP at world size 1, 4 tables of ``--rows`` rows and 22 small
ones, SGD), each variant warmed up, then ``--steps`` steps of each under ``torch.profiler`` (CPU, alternated in
chunks of 10 as the timing bench does). Per batch size: the self CPU time per step of every op in each variant, and
the ops sorted by how much more the QAT step spends in them; the scale refresh is not in these steps (see
``qat_overhead`` for it, amortized).

    python -m bench.qat_profile [--rows 1000000] [--batch 128,2048] [--steps 40] [--top 12] [--out DIR]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from bench.common import Report, add_out_argument, optimizer_name, random_batches, save, table, train_step_seconds
from bench.qat_overhead import _build
from dqrm.pipeline.config import OptimConfig
from dqrm.pipeline.quiet import quiet_library_noise

CHUNK = 10


def _self_us_per_step(models: dict, batches: list) -> dict[str, dict[str, float]]:
    """{variant: {op name: self CPU microseconds per step}} over ``batches``, variants alternated every CHUNK."""
    totals: dict[str, dict[str, float]] = {v: defaultdict(float) for v in models}
    for start in range(0, len(batches), CHUNK):
        for v, (m, o) in models.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                train_step_seconds(m, o, batches[start:start + CHUNK])
            for e in prof.key_averages():
                totals[v][e.key] += e.self_cpu_time_total
    return {v: {k: t / len(batches) for k, t in ops.items()} for v, ops in totals.items()}


def main() -> None:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="rows of each of the 4 large tables")
    p.add_argument("--batch", default="128,2048", help="batch sizes")
    p.add_argument("--steps", type=int, default=40, help="profiled steps per variant and batch size")
    p.add_argument("--top", type=int, default=12, help="ops listed per batch size")
    add_out_argument(p)
    args = p.parse_args()
    quiet_library_noise()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    report = Report()
    cards = tuple([1000] * 22 + [args.rows] * 4)
    models = {v: _build(cards, v) for v in ("fp32", "qat")}
    report(f"world size 1, {torch.get_num_threads()} torch threads, optimizer: {optimizer_name(OptimConfig())}; 4 "
           f"tables of {args.rows:,} rows + 22 of 1,000; "
           f"{args.steps} profiled steps per variant, alternated every {CHUNK}; self CPU time per step (profiler "
           f"overhead included alike in both)")
    results = []
    for batch in (int(b) for b in args.batch.split(",")):
        batches = random_batches(cards, batch, args.steps)
        for m, o in models.values():
            train_step_seconds(m, o, batches[:10])
        per = _self_us_per_step(models, batches)
        names = set(per["fp32"]) | set(per["qat"])
        ops = [{"op": k, "fp32_us": per["fp32"].get(k, 0.0), "qat_us": per["qat"].get(k, 0.0)} for k in names]
        for o in ops:
            o["extra_us"] = o["qat_us"] - o["fp32_us"]
        ops.sort(key=lambda o: -o["extra_us"])
        total = {v: sum(per[v].values()) for v in per}
        extra = total["qat"] - total["fp32"]
        for o in ops:
            o["share_of_extra"] = o["extra_us"] / extra if extra > 0 else float("nan")
        report(f"\nbatch {batch}: fp32 {total['fp32'] / 1e3:.2f} ms of op time per step, qat {total['qat'] / 1e3:.2f} "
               f"ms, extra {extra / 1e3:.2f} ms; the ops the QAT step spends more in:")
        report(table(ops[:args.top], [("op", "op", "s"), ("fp32_us", "fp32 us", ".0f"), ("qat_us", "qat us", ".0f"),
                                      ("extra_us", "extra us", "+.0f"), ("share_of_extra", "of extra", ".0%")]))
        results.append({"batch": batch, "fp32_op_us": total["fp32"], "qat_op_us": total["qat"], "ops": ops})
    payload = {"rows_per_table": args.rows, "steps": args.steps, "results": results}
    print(f"json: {save('qat_profile', payload, report.text, out=args.out)}")


if __name__ == "__main__":
    main()

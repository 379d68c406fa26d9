"""What the job's TensorBoard logging costs, as a share of training time: the cost of one call times how often it is
called, over the step time (paired step timings are too noisy here to resolve 1 %).

The ``default`` job's model and step at world size 2 (gloo, one thread per rank, as ``make train`` runs it): the
sharded INT4 QAT model, its optimizer and byte counter from ``pipeline.parallelize``, stepped through TorchRec's
``TrainPipelineSparseDist``, on random single-hot batches of 64 rows per rank (ids uniform over each table: more
distinct rows per log than the Zipf data, so the QAT statistics cost at least as much as in the job). Per rank and
repetition:

- step: the median of ``--every`` training steps (the QAT lookup hook keeping ids included);
- per step: ``Observer.step_done`` without a log and the hook's ``GridStats.keep`` for every TBE with one step's
  arguments, timed over ``--every`` calls (what every step pays for logging, less the call of the hook itself);
- per log: one ``Observer.log_interval`` after those steps: the QAT grid statistics over the rows the last
  ``pipeline.qat_stats.KEEP_STEPS`` of them looked up, the all-gather, and on rank 0 the 86 scalars written and
  flushed to the file (the writer thread's work, done in the background in a job, counted here);
- overhead = (per step + per log / every) / step, per repetition; the median over repetitions with its quartiles
  and a bootstrap 95 % interval (``bench.common.paired_ratio``).

An evaluation's scalars (6 per evaluation) are timed too; evaluations are minutes apart, their share is nil.

    python -m bench.logging_overhead [--every 200] [--reps 7] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from bench.common import Report, add_out_argument, paired_ratio, random_batches, save, table
from dqrm.pipeline.configs import get_config
from dqrm.pipeline.observe import Observer
from dqrm.pipeline.parallelize import build_sharded_model
from dqrm.pipeline.qat_stats import GridStats
from dqrm.pipeline.quiet import quiet_library_noise
from dqrm.quant.api import embedding_quantizer
from tests.dist_utils import run_distributed

USED = ("pipeline", "quant", "sharding")
WORLD_SIZE = 2
WARMUP = 20


def _worker(rank: int, world_size: int, every: int, reps: int, out: str) -> dict:
    quiet_library_noise()
    cfg = get_config("default")
    cfg.run_dir = str(Path(out) / "run")
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)  # where rank 0 writes the plan, as a job would
    model, optimizer, counter, _ = build_sharded_model(cfg, rank, world_size, torch.device("cpu"))
    grid = GridStats(embedding_quantizer(model))
    observer = Observer(Path(out) / "tensorboard", every=10 ** 12, rows_per_step=cfg.data.batch_size * world_size,
                        rank=rank, world_size=world_size, device=torch.device("cpu"), optimizer=optimizer, grid=grid,
                        counter=counter)
    pipeline = TrainPipelineSparseDist(model, optimizer, torch.device("cpu"))
    batches = random_batches(cfg.model.num_embeddings, cfg.data.batch_size, WARMUP + reps * every, seed=rank)
    it = iter(batches)
    seen = {}  # one step's arguments of each TBE, for timing the hook's work alone

    def remember(i):
        def hook(module, args, kwargs, output):
            seen.setdefault(i, (kwargs["indices"], kwargs["offsets"]))
        return hook

    handles = [lay.tbe.register_forward_hook(remember(i), with_kwargs=True) for i, lay in enumerate(grid.layouts)]
    for _ in range(WARMUP):
        pipeline.progress(it)
    for h in handles:
        h.remove()
    step = WARMUP
    grid.collect()  # drop the warm-up's ids: the first interval starts clean
    observer.start_epoch()
    rows = []
    for _ in range(reps):
        times = []
        for _ in range(every):
            t0 = time.perf_counter()
            loss, _, _ = pipeline.progress(it)
            times.append(time.perf_counter() - t0)
            observer.step_done(step := step + 1, loss.detach().double())
        t0 = time.perf_counter()
        observer.log_interval(step)
        if observer.writer is not None:  # and the writer thread's work, done here instead of in the background
            observer.writer.flush()
        per_log = time.perf_counter() - t0
        # the per-step part alone: step_done without a log and the hook's copy of one step's ids, every times
        loss = loss.detach().double()
        t0 = time.perf_counter()
        for _ in range(every):
            observer.step_done(step, loss)  # not a multiple of observer.every: no log
            for i, (indices, offsets) in seen.items():
                grid.keep(i, indices, offsets)
        per_step = (time.perf_counter() - t0) / every
        grid.collect()  # drop what the timing kept
        observer.start_epoch()
        rows.append({"step_s": statistics.median(times), "per_step_s": per_step, "per_log_s": per_log})
    t0 = time.perf_counter()
    for _ in range(10):
        observer.log_eval("val", {"auc": 0.8, "accuracy": 0.78, "logloss": 0.45}, step)
        if observer.writer is not None:
            observer.writer.flush()
    eval_log = (time.perf_counter() - t0) / 10
    observer.close()
    return {"rank": rank, "reps": rows, "eval_log_s": eval_log, "layouts": len(grid.layouts),
            "scalars_per_log": _count_scalars(Path(out) / "tensorboard", WARMUP + every) if rank == 0 else None}


def _count_scalars(log_dir: Path, step: int) -> int:
    """Scalars the log at ``step`` wrote (read back with tensorboard's event reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return sum(1 for tag in acc.Tags()["scalars"] if any(e.step == step for e in acc.Scalars(tag)))


def main() -> None:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--every", type=int, default=get_config("default").observe.log_every_steps,
                   help="steps between two logs (default: the job's observe.log_every_steps)")
    p.add_argument("--reps", type=int, default=7, help="repetitions (each: --every steps and one log)")
    add_out_argument(p)
    args = p.parse_args()
    quiet_library_noise()
    report = Report()
    with tempfile.TemporaryDirectory() as out:
        results = run_distributed(_worker, args.every, args.reps, out, world_size=WORLD_SIZE)
    report(f"default job's model, world size {WORLD_SIZE} (gloo), batch 64 per rank, a log every {args.every} steps, "
           f"{args.reps} repetitions; {results[0]['scalars_per_log']} scalars per log, "
           f"{results[0]['layouts']} TBEs hooked per rank")
    rows = []
    for r in results:
        reps = r["reps"]
        cost = [x["per_step_s"] + x["per_log_s"] / args.every for x in reps]
        share = paired_ratio(cost, [x["step_s"] for x in reps])
        step, per_step, per_log = (statistics.median(x[k] for x in reps) for k in ("step_s", "per_step_s", "per_log_s"))
        rows.append({"rank": r["rank"], "step_ms": 1e3 * step, "per_step_us": 1e6 * per_step,
                     "per_log_ms": 1e3 * per_log,
                     "eval_log_ms": 1e3 * r["eval_log_s"], "overhead_pct": 100 * share["median"],
                     "q1_pct": 100 * share["q1"], "q3_pct": 100 * share["q3"], "ci_lo_pct": 100 * share["ci95"][0],
                     "ci_hi_pct": 100 * share["ci95"][1],
                     "every_for_1pct": per_log / max(0.01 * step - per_step, 1e-12), "raw": reps})
    report(table(rows, [("rank", "rank", "d"), ("step_ms", "step ms", ".2f"), ("per_step_us", "per step us", ".1f"),
                        ("per_log_ms", "per log ms", ".2f"), ("eval_log_ms", "eval log ms", ".3f"),
                        ("overhead_pct", "overhead %", ".3f"), ("ci_lo_pct", "95% lo", ".3f"),
                        ("ci_hi_pct", "95% hi", ".3f"), ("every_for_1pct", "1% at every", ".1f")]))
    worst = max(rows, key=lambda x: x["overhead_pct"])
    report(f"overhead: {worst['overhead_pct']:.3f} % of training time on rank {worst['rank']} (95% interval "
           f"[{worst['ci_lo_pct']:.3f}, {worst['ci_hi_pct']:.3f}] %), = (per step {worst['per_step_us']:.1f} us + "
           f"per log {worst['per_log_ms']:.2f} ms / {args.every}) / step {worst['step_ms']:.2f} ms; the 1 % budget "
           f"holds for a log every {worst['every_for_1pct']:.0f} steps or more")
    payload = {"every": args.every, "reps": args.reps, "world_size": WORLD_SIZE, "rows": rows,
               "overhead_pct": worst["overhead_pct"]}
    print(f"json: {save('logging_overhead', payload, report.text, out=args.out, used=USED)}")


if __name__ == "__main__":
    main()

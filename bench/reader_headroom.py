"""How many times faster the Parquet reader makes a rank's batches than the default training job consumes them.

The default job at world size 2 (INT4 QAT, 64 rows per batch per rank, the bundled synthetic data), built as
``pipeline.train`` builds it (plan, shard, QAT prepare, gradient compression, SGD), one torch thread per rank as
under torchrun. In each of ``--reps`` rounds both ranks, at the same time as in the job:

1. read their whole slice of the training split into ``Batch``es through ``ParquetBatches`` configured as the job's
   (shuffled, decoded ahead by its background thread), at the job's batch size and at 4096;
2. train ``--steps`` steps through the job's ``Trainer`` (reading included, as in the job).

Reported per rank: rows/s (wall; the two ranks share the machine's cores as in the job) and rows per CPU-second of
the reading process, medians over the rounds with a 95% bootstrap interval; and "headroom", the median over rounds
of reader rows/s / training rows/s (both per rank, same round), with its interval. The reader is not otherwise busy
while it is timed: headroom says how much slower the reader could be before the job waited for it.

    python -m bench.reader_headroom [--reps 5] [--steps 300] [--config default] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import resource
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from bench.common import add_out_argument, paired_ratio, save, table
from dqrm.datasets.reader import ParquetBatches
from dqrm.pipeline.checkpoint import Checkpointer
from dqrm.pipeline.configs import get_config
from dqrm.pipeline.data import resolve_data
from dqrm.pipeline.parallelize import build_sharded_model
from dqrm.pipeline.quiet import quiet_library_noise
from dqrm.pipeline.trainer import Splits, Trainer
from tests.dist_utils import run_distributed

LARGE_BATCH = 4096


def _read(data) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds of this process (all its threads) and rows of one pass over ``data``."""
    dist.barrier()
    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    rows = sum(b.labels.numel() for b in data)
    wall, cpu1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return wall, cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, rows


def _worker(rank: int, world_size: int, config: str, reps: int, steps: int, warmup: int, run_dir: str) -> dict:
    quiet_library_noise()
    cfg = get_config(config)
    cfg.run_dir = run_dir
    paths, _ = resolve_data(cfg, rank)
    job_reader = cfg.data.reader(train=True, seed=cfg.seed)
    readers = {bs: ParquetBatches(paths["train"], cfg.model.num_embeddings,
                                  dataclasses.replace(job_reader, batch_size=bs), rank=rank, world_size=world_size)
               for bs in (job_reader.batch_size, LARGE_BATCH)}
    train = readers[job_reader.batch_size]
    model, optimizer, counter, _ = build_sharded_model(cfg, rank, world_size, torch.device("cpu"))
    trainer = Trainer(cfg, model, optimizer, torch.device("cpu"), Splits(train=train, val=train, test=train),
                      Checkpointer(run_dir + "/checkpoints"), rank=rank, comm_counter=counter)

    def train_steps(n: int, epoch: int) -> float:
        cfg.limit_train_batches = n
        dist.barrier()
        return trainer.train_epoch(epoch)["train_seconds"]

    train_steps(warmup, 0)
    for data in readers.values():  # warm the page cache and the imports of the read path
        sum(1 for _ in itertools.islice(iter(data), 20))
    out = {"read": {bs: [] for bs in readers}, "train_s": [], "slice_rows": train.row_end - train.row_begin,
           "job_batch": job_reader.batch_size}
    for rep in range(reps):
        for bs, data in readers.items():
            data.set_epoch(rep + 1)
            out["read"][bs].append(_read(data))
        out["train_s"].append(train_steps(steps, rep + 1))
    return out


def _median_ci(xs: list[float]) -> dict:
    """Median and a 95% bootstrap interval of it (``paired_ratio`` against ones)."""
    r = paired_ratio(xs, [1.0] * len(xs))
    return {"median": r["median"], "ci95": r["ci95"], "values": xs}


def main() -> None:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="default", help="named config of the job (default: %(default)s)")
    p.add_argument("--reps", type=int, default=5, help="rounds (read both batch sizes, then train)")
    p.add_argument("--steps", type=int, default=300, help="timed training steps per round")
    p.add_argument("--warmup", type=int, default=50, help="untimed training steps first")
    add_out_argument(p)
    args = p.parse_args()
    world_size = 2
    with tempfile.TemporaryDirectory(prefix="reader_headroom_") as run_dir:
        ranks = run_distributed(_worker, args.config, args.reps, args.steps, args.warmup, run_dir,
                                world_size=world_size)
    job_batch = ranks[0]["job_batch"]
    train_rows = [args.steps * job_batch / max(r["train_s"][i] for r in ranks) for i in range(args.reps)]
    rows, payload = [], {"config": args.config, "world_size": world_size, "reps": args.reps, "steps": args.steps,
                         "job_batch": job_batch, "slice_rows": [r["slice_rows"] for r in ranks], "readers": {}}
    train = _median_ci(train_rows)
    for bs in ranks[0]["read"]:
        per_round = [[r["read"][bs][i] for r in ranks] for i in range(args.reps)]  # (wall, cpu, rows) per rank
        wall = [statistics.fmean(rows_ / w for w, _, rows_ in rnd) for rnd in per_round]
        cpu = [statistics.fmean(rows_ / c for _, c, rows_ in rnd) for rnd in per_round]
        read = {"rows_per_s": _median_ci(wall), "rows_per_cpu_s": _median_ci(cpu),
                "headroom": paired_ratio(wall, train_rows), "raw": per_round}
        payload["readers"][bs] = read
        rows.append({"what": f"reader, batch {bs}" + (" (the job's)" if bs == job_batch else ""),
                     "rate": read["rows_per_s"]["median"], "lo": read["rows_per_s"]["ci95"][0],
                     "hi": read["rows_per_s"]["ci95"][1], "cpu": read["rows_per_cpu_s"]["median"],
                     "headroom": f"{read['headroom']['median']:.0f}x [{read['headroom']['ci95'][0]:.0f}, "
                                 f"{read['headroom']['ci95'][1]:.0f}]"})
    rows.append({"what": f"training step, batch {job_batch}", "rate": train["median"], "lo": train["ci95"][0],
                 "hi": train["ci95"][1], "cpu": float("nan"), "headroom": "1x"})
    payload["training_rows_per_s"] = train
    payload["torch_threads_per_rank"] = 1  # tests.dist_utils, as torchrun
    text = "\n".join([
        f"{args.config} job at world size {world_size}, {job_batch} rows per batch per rank, one torch thread per "
        f"rank; per rank, medians of {args.reps} rounds [95% bootstrap interval]; both ranks read at once, as in the "
        f"job; headroom = reader rows/s / training rows/s, same round",
        table(rows, [("what", "what", "s"), ("rate", "rows/s per rank", ",.0f"), ("lo", "95% lo", ",.0f"),
                     ("hi", "95% hi", ",.0f"), ("cpu", "rows/CPU-s", ",.0f"), ("headroom", "headroom [95%]", "s")]),
        f"the reader makes a rank's batches {payload['readers'][job_batch]['headroom']['median']:.0f}x as fast as "
        f"the {args.config} job trains on them at its batch of {job_batch} "
        f"({payload['readers'][LARGE_BATCH]['headroom']['median']:.0f}x at batch {LARGE_BATCH})"])
    print(text)
    print(f"json: {save('reader_headroom', payload, text, out=args.out)}")


if __name__ == "__main__":
    main()

"""Training samples/s of the default FP32 job, ours against a minimal TorchRec reference loop, at world size 1 and 2.

The reference is written like TorchRec's golden-training example: DMP + TrainPipelineSparseDist on the same model
shape and the same batches, and a bare ``while True: pipeline.progress(it)``. Both run in the same processes,
alternating, several repetitions each; the table reports medians and the per-step cost ratio.

    python -m bench.train_throughput [--steps 300] [--reps 9] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from bench.common import Report, add_out_argument, median, paired_ratio, save, table
from dqrm.datasets.reader import ParquetBatches
from dqrm.datasets.synthetic import ensure_synthetic
from dqrm.pipeline.checkpoint import Checkpointer
from dqrm.pipeline.configs import get_config
from dqrm.pipeline.model import build_dlrm
from dqrm.pipeline.optimizer import build_optimizer, fuse_embedding_optimizer
from dqrm.pipeline.quiet import quiet_library_noise
from dqrm.pipeline.trainer import Splits, Trainer
from dqrm.sharding.byte_counter import ByteCounter
from dqrm.sharding.comm import compress_gradients
from dqrm.sharding.plan import plan_sharding, shard_model
from dqrm.sharding.policy import plan_by_policy
from tests.dist_utils import run_distributed


def _model(cfg, world_size, *, as_shipped: bool):
    """``as_shipped``: wired as ``pipeline.train`` wires the job (policy plan, comm hooks with the byte counter);
    otherwise the bare TorchRec setup of the reference loop."""
    torch.manual_seed(0)
    model = build_dlrm(cfg.model, torch.device("cpu"))
    fuse_embedding_optimizer(model.model.sparse_arch.parameters(), cfg.optim)
    if as_shipped:
        plan = plan_by_policy(model, cfg.plan, world_size=world_size, device=torch.device("cpu"), pg=dist.group.WORLD)
    else:
        plan = plan_sharding(model, world_size=world_size, device=torch.device("cpu"), pg=dist.group.WORLD)
    model = shard_model(model, plan, torch.device("cpu"))
    if as_shipped and world_size > 1:
        compress_gradients(model, cfg.comm, ByteCounter().install() if cfg.comm.count_bytes else None)
    return model, build_optimizer(model, cfg.optim)


def _worker(rank, world_size, steps, reps, warmup):
    quiet_library_noise()
    cfg = get_config("default_fp32")
    root = ensure_synthetic(cfg.data.synthetic)
    data = ParquetBatches([root / "train.parquet"], cfg.model.num_embeddings,
                          cfg.data.reader(train=True, seed=0), rank=rank, world_size=world_size)
    splits = Splits(train=data, val=data, test=data)
    ours_model, ours_opt = _model(cfg, world_size, as_shipped=True)
    trainer = Trainer(cfg, ours_model, ours_opt, torch.device("cpu"), splits, Checkpointer("/nonexistent"), rank=rank)
    ref_model, ref_opt = _model(cfg, world_size, as_shipped=False)
    ref_pipeline = TrainPipelineSparseDist(ref_model, ref_opt, torch.device("cpu"))

    def run_ours(n):
        cfg.limit_train_batches = n
        dist.barrier()
        t0 = time.perf_counter()
        trainer.train_epoch(0)
        return time.perf_counter() - t0

    def run_ref(n):
        dist.barrier()
        ref_model.train()
        it = itertools.islice(iter(data), n)
        t0 = time.perf_counter()
        while True:
            try:
                ref_pipeline.progress(it)
            except StopIteration:
                break
        return time.perf_counter() - t0

    run_ours(warmup)
    run_ref(warmup)
    ours, ref = [], []
    for rep in range(reps):  # alternate which loop goes first, so neither always runs on a warmer machine
        if rep % 2:
            ref.append(run_ref(steps))
            ours.append(run_ours(steps))
        else:
            ours.append(run_ours(steps))
            ref.append(run_ref(steps))
    return {"ours_s": ours, "ref_s": ref, "batch_size": cfg.data.batch_size}


def main() -> None:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="timed training steps per repetition")
    p.add_argument("--reps", type=int, default=9, help="repetitions of each loop (medians are reported)")
    p.add_argument("--warmup", type=int, default=150, help="untimed steps first")
    add_out_argument(p)
    args = p.parse_args()
    rows = []
    for ws in (1, 2):
        r = run_distributed(_worker, args.steps, args.reps, args.warmup, world_size=ws)[0]
        samples = args.steps * r["batch_size"] * ws
        ours, ref = median(r["ours_s"]), median(r["ref_s"])
        paired = paired_ratio(r["ours_s"], r["ref_s"])  # each repetition timed both loops back to back
        rows.append({"world_size": ws, "ours_samples_per_s": samples / ours, "ref_samples_per_s": samples / ref,
                     "ours_ms_per_step": 1e3 * ours / args.steps, "ref_ms_per_step": 1e3 * ref / args.steps,
                     "step_cost_ratio": paired["median"], "ratio_ci95_lo": paired["ci95"][0],
                     "ratio_ci95_hi": paired["ci95"][1], "ratio_q1": paired["q1"], "ratio_q3": paired["q3"],
                     "ours_s": r["ours_s"], "ref_s": r["ref_s"]})
    report = Report()
    report(f"default_fp32 job, batch {r['batch_size']} per rank; medians of {args.reps} repetitions of {args.steps} "
           f"steps (after {args.warmup} untimed), the two loops alternated; one torch thread per rank at world size 2; "
           f"ours/ref: median of the per-repetition ratios, with a bootstrap 95% interval of that median")
    report(table(rows, [("world_size", "world size", "d"), ("ours_samples_per_s", "ours samples/s", ".0f"),
                        ("ref_samples_per_s", "ref samples/s", ".0f"), ("ours_ms_per_step", "ours ms/step", ".2f"),
                        ("ref_ms_per_step", "ref ms/step", ".2f"), ("step_cost_ratio", "ours/ref", ".3f"),
                        ("ratio_ci95_lo", "95% lo", ".3f"), ("ratio_ci95_hi", "95% hi", ".3f")]))
    path = save("train_throughput", {"steps": args.steps, "reps": args.reps, "warmup": args.warmup, "rows": rows},
                report.text, out=args.out)
    print(f"json: {path}")

if __name__ == "__main__":
    main()

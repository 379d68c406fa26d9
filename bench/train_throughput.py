"""Training samples/s of the default FP32 job, ours against a minimal TorchRec reference loop, at world size 1 and 2.

The reference is written like TorchRec's golden-training example: DMP + TrainPipelineSparseDist on the same model
shape and the same batches, and a bare ``while True: pipeline.progress(it)``. Three variants run in the same
processes on the same batches, in turn, ``--steps`` steps each, ``--reps`` times (the order rotates every
repetition, so none always runs on a warmer machine):

- ``ref``:   the reference loop on the reference model (TorchRec's default plan, no comm hooks);
- ``loop``:  our ``Trainer.train_epoch`` on a model wired like the reference's: what our loop alone costs;
- ``ours``:  our loop on the model as ``pipeline.train`` wires it (the policy plan, the comm hooks and their byte
             counter at world size 2);
- ``uncounted``: ``ours`` without the byte counter (``comm.count_bytes=false``: at world size 2 its all-reduce
             hook is then DDP's own, so this isolates what counting costs).

Ratios are per repetition (the variants ran seconds apart) and summarized by their median with a bootstrap 95%
interval of it; short repetitions, many of them, keep the machine's drift out of each pair. Optimizer: the job's
(SGD, fused into the embedding kernels for the tables).

    python -m bench.train_throughput [--steps 100] [--reps 30] [--warmup 150] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from bench.common import Report, add_out_argument, median, optimizer_name, paired_ratio, save, table
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


def _model(cfg, world_size, *, as_shipped: bool, count: bool = True):
    """``as_shipped``: wired as ``pipeline.train`` wires the job (policy plan, comm hooks with the byte counter
    unless not ``count``); otherwise the bare TorchRec setup of the reference loop."""
    torch.manual_seed(0)
    model = build_dlrm(cfg.model, torch.device("cpu"))
    fuse_embedding_optimizer(model.model.sparse_arch.parameters(), cfg.optim)
    if as_shipped:
        plan = plan_by_policy(model, cfg.plan, world_size=world_size, device=torch.device("cpu"), pg=dist.group.WORLD)
    else:
        plan = plan_sharding(model, world_size=world_size, device=torch.device("cpu"), pg=dist.group.WORLD)
    model = shard_model(model, plan, torch.device("cpu"))
    if as_shipped and world_size > 1:
        compress_gradients(model, cfg.comm, ByteCounter().install() if cfg.comm.count_bytes and count else None)
    return model, build_optimizer(model, cfg.optim)


VARIANTS = ("ref", "loop", "ours", "uncounted")


def _worker(rank, world_size, steps, reps, warmup):
    quiet_library_noise()
    cfg = get_config("default_fp32")
    root = ensure_synthetic(cfg.data.synthetic)
    data = ParquetBatches([root / "train.parquet"], cfg.model.num_embeddings,
                          cfg.data.reader(train=True, seed=0), rank=rank, world_size=world_size)
    splits = Splits(train=data, val=data, test=data)
    trainers = {}
    for variant in ("loop", "ours", "uncounted"):
        model, opt = _model(cfg, world_size, as_shipped=variant != "loop", count=variant == "ours")
        trainers[variant] = Trainer(cfg, model, opt, torch.device("cpu"), splits, Checkpointer("/nonexistent"),
                                    rank=rank)
    ref_model, ref_opt = _model(cfg, world_size, as_shipped=False)
    ref_pipeline = TrainPipelineSparseDist(ref_model, ref_opt, torch.device("cpu"))

    def run_trainer(trainer, n):
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

    run = {"ref": run_ref, **{v: (lambda n, t=t: run_trainer(t, n)) for v, t in trainers.items()}}
    for v in VARIANTS:
        run[v](warmup)
    times = {v: [] for v in VARIANTS}
    for rep in range(reps):  # rotate the order, so that none always runs first or last
        k = rep % len(VARIANTS)
        for v in VARIANTS[k:] + VARIANTS[:k]:
            times[v].append(run[v](steps))
    return {"times": times, "batch_size": cfg.data.batch_size,
            "optimizer": optimizer_name(cfg.optim)}


def main() -> None:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100, help="timed training steps per variant and repetition")
    p.add_argument("--reps", type=int, default=30, help="repetitions (each runs every variant once)")
    p.add_argument("--warmup", type=int, default=150, help="untimed steps of each variant first")
    add_out_argument(p)
    args = p.parse_args()
    rows = []
    for ws in (1, 2):
        r = run_distributed(_worker, args.steps, args.reps, args.warmup, world_size=ws)[0]
        samples = args.steps * r["batch_size"] * ws
        t = r["times"]
        row = {"world_size": ws, **{f"{v}_ms_per_step": 1e3 * median(t[v]) / args.steps for v in VARIANTS},
               **{f"{v}_samples_per_s": samples / median(t[v]) for v in VARIANTS}, "times_s": t}
        for v in VARIANTS[1:]:
            paired = paired_ratio(t[v], t["ref"])  # each repetition timed every variant back to back
            row.update({f"{v}_ratio": paired["median"], f"{v}_ci95_lo": paired["ci95"][0],
                        f"{v}_ci95_hi": paired["ci95"][1], f"{v}_q1": paired["q1"], f"{v}_q3": paired["q3"]})
        rows.append(row)
    report = Report()
    report(f"default_fp32 job, batch {r['batch_size']} per rank, optimizer: {r['optimizer']}; {args.reps} "
           f"repetitions of {args.steps} steps of each variant (after {args.warmup} untimed), in rotating order; one "
           f"torch thread per rank at world size 2; ms/step: medians over the repetitions; x/ref: median of the "
           f"per-repetition ratios with a bootstrap 95% interval of that median ({args.reps} pairs)")
    report("ref: TorchRec's bare loop and model; loop: our loop, the same model wiring; ours: our loop and wiring, "
           "as the job runs; uncounted: ours without the byte counter")
    report(table(rows, [("world_size", "world size", "d"), ("ref_ms_per_step", "ref ms/step", ".3f"),
                        ("loop_ms_per_step", "loop ms/step", ".3f"), ("ours_ms_per_step", "ours ms/step", ".3f"),
                        ("loop_ratio", "loop/ref", ".3f"), ("loop_ci95_lo", "95% lo", ".3f"),
                        ("loop_ci95_hi", "95% hi", ".3f"), ("ours_ratio", "ours/ref", ".3f"),
                        ("ours_ci95_lo", "95% lo", ".3f"), ("ours_ci95_hi", "95% hi", ".3f"),
                        ("uncounted_ratio", "uncounted/ref", ".3f"), ("uncounted_ci95_lo", "95% lo", ".3f"),
                        ("uncounted_ci95_hi", "95% hi", ".3f")]))
    path = save("train_throughput", {"steps": args.steps, "reps": args.reps, "warmup": args.warmup,
                                     "optimizer": r["optimizer"], "rows": rows}, report.text, out=args.out)
    print(f"json: {path}")


if __name__ == "__main__":
    main()

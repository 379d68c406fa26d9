"""Bytes per step and step time of training with compressed gradient communication, world size 2 (gloo, CPU).

Models: ``default`` with every table data-parallel (the paper's setting: the dense baseline all-reduces
whole-table gradients), and the Kaggle-shaped model (``kaggle`` config, 33.8M rows) under the plan its job uses
(TorchRec's planner: small tables data-parallel, large ones table-wise), since all 2.2 GB of it data-parallel
does not fit two ranks on this 23 GB machine.
Variants, same model and batches, built side by side in the same two processes and stepped in turn:
dense FP32 | touched rows FP32 | touched rows INT8 | touched rows INT8 + INT8 MLP with error feedback (the fully
compressed step) | the same + TorchRec INT8 qcomms on the model-parallel all-to-alls (all compression on) | the fully
compressed step with every data-parallel kernel exchanging touched rows (``comm.dp_whole_max_rows=0``; by default
kernels of at most 1024 rows, such as the Kaggle plan's 7 small tables with 101 rows in all, are all-reduced whole).
Bytes are counted by instrumenting the collectives (what each rank hands to each, padding included). Times: the
median step, and, since the shared machine's speed drifts over a run, the median and quartiles of the per-round
ratio to dense (each round steps every variant once, starting from a different one, so a round's ratio compares
steps taken milliseconds apart) with a bootstrap 95% interval of that median; two warm-up rounds are not timed.
Runs differ by more than that interval (the machine's state between runs), so compare medians across runs too.

    python -m bench.comm [--models default,kaggle] [--steps 20,1000] [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
import torch.distributed as dist

from bench.common import Report, add_out_argument, paired_ratio, random_batches, save, table
from dqrm.pipeline.configs import get_config
from dqrm.pipeline.model import build_dlrm
from dqrm.pipeline.optimizer import build_optimizer, fuse_embedding_optimizer
from dqrm.pipeline.quiet import quiet_library_noise
from dqrm.sharding.byte_counter import ByteCounter
from dqrm.sharding.comm import CommConfig, compress_gradients, sharders_for
from dqrm.sharding.plan import TablePlacement, describe_plan, manual_plan, shard_model
from dqrm.sharding.policy import plan_by_policy
from tests.dist_utils import run_distributed

FULL = "touched INT8 + MLP INT8 EF"  # the fully compressed step the issue times against dense
VARIANTS = {
    "dense FP32": CommConfig(),
    "touched FP32": CommConfig(dp_tables="touched"),
    "touched INT8": CommConfig(dp_tables="touched_int8"),
    FULL: CommConfig(dp_tables="touched_int8", dense="int8_ef"),
    "all INT8 (+ qcomms INT8)": CommConfig(dp_tables="touched_int8", dense="int8_ef", qcomms="int8"),
    f"{FULL}, every DP kernel by touched rows": CommConfig(dp_tables="touched_int8", dense="int8_ef",
                                                            dp_whole_max_rows=0),
}


def _build(cfg, config_name, comm, world_size, counter):
    torch.manual_seed(0)
    model = build_dlrm(cfg.model, torch.device("cpu"))
    fuse_embedding_optimizer(model.model.sparse_arch.parameters(), cfg.optim)
    sharders = sharders_for(comm, torch.device("cpu"))
    if config_name == "default":
        placements = {f"t_cat_{i}": TablePlacement(kind="data_parallel") for i in range(26)}
        plan = manual_plan(model, placements, world_size=world_size, device=torch.device("cpu"))
    else:
        plan = plan_by_policy(model, cfg.plan, world_size=world_size, device=torch.device("cpu"),
                              pg=dist.group.WORLD, sharders=sharders)
    kinds = collections.Counter(r["sharding"] for r in describe_plan(plan))
    model = shard_model(model, plan, torch.device("cpu"), sharders)
    compress_gradients(model, comm, counter)
    model.train()
    return model, build_optimizer(model, cfg.optim), dict(kinds)


def _worker(rank, world_size, config_name, steps, variants=VARIANTS):
    """The variants (name -> ``CommConfig``; the first is the baseline of the ratios) built side by side and
    stepped in turn (round i: every variant's step i, starting from a different variant each round), so that the
    machine's load drifts over all of them alike; the first two rounds are warm-up."""
    quiet_library_noise()
    cfg = get_config(config_name)
    batches = random_batches(cfg.model.num_embeddings, cfg.data.batch_size, steps + 2, seed=rank)
    counter = ByteCounter().install()
    built = {name: _build(cfg, config_name, comm, world_size, counter) for name, comm in variants.items()}
    base = next(iter(variants))
    times = {name: [] for name in built}
    sent = {name: collections.Counter() for name in built}
    for i, b in enumerate(batches):
        names = list(built)
        for name in names[i % len(names):] + names[: i % len(names)]:  # rotated: no variant always goes first
            model, opt, _ = built[name]
            counter.reset()
            dist.barrier()
            t0 = time.perf_counter()
            loss, _ = model(b)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
                sent[name].update(counter.bytes)
    results = {}
    for name, (_, _, kinds) in built.items():
        per_step = {k: v / steps for k, v in sorted(sent[name].items())}
        per_step["total"] = sum(sent[name].values()) / steps
        r = paired_ratio(times[name], times[base])
        results[name] = {"step_ms": 1e3 * statistics.median(times[name]), "bytes": per_step, "plan": kinds,
                         "ratio_median": r["median"], "ratio_q1": r["q1"], "ratio_q3": r["q3"], "ratio_ci95": r["ci95"]}
    return results


def result_rows(model: str, res: dict) -> list[dict]:
    """One row per variant of ``_worker``'s result: bytes by kind, step time, and both against the first variant."""
    base = next(iter(res.values()))
    rows = []
    for name, r in res.items():
        b = r["bytes"]
        rows.append({"model": model, "variant": name, "bytes_per_step": b["total"],
                     "embedding_bytes": sum(v for k, v in b.items() if "DP tables" in k),
                     "all_to_all_bytes": sum(v for k, v in b.items() if "all_to_all" in k),
                     "mlp_bytes": sum(v for k, v in b.items() if "MLP" in k),
                     "step_ms": r["step_ms"], "bytes_vs_dense": b["total"] / base["bytes"]["total"],
                     "time_vs_dense": r["ratio_median"], "ratio_q1": r["ratio_q1"], "ratio_q3": r["ratio_q3"],
                     "ratio_ci95": r["ratio_ci95"],
                     "median_step_vs_dense": r["step_ms"] / base["step_ms"], "plan": r["plan"], "detail": b})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="default,kaggle", help="named configs giving the model shape and batch")
    p.add_argument("--steps", default="20,1000",
                   help="timed steps per variant: one number, or one per model (default: 20 for the default model, "
                        "whose steps take ~0.5 s, and 1000 for the Kaggle shape, whose ~25 ms steps vary by 20%%)")
    add_out_argument(p)
    args = p.parse_args()
    models = args.models.split(",")
    steps = [int(x) for x in args.steps.split(",")]
    steps = steps * len(models) if len(steps) == 1 else steps
    if len(steps) != len(models):
        p.error(f"--steps gives {len(steps)} counts for {len(models)} models")
    rows = []
    for model, n in zip(models, steps):
        rows += result_rows(model, run_distributed(_worker, model, n, world_size=2)[0])
    report = Report()
    report(f"world size 2 (gloo, CPU, one torch thread per rank); timed steps per model: "
           f"{', '.join(f'{m} {n}' for m, n in zip(models, steps))}; time/dense: median per-round ratio, q1-q3 its "
           f"quartiles")
    report(table(rows, [("model", "model", "s"), ("variant", "variant", "s"), ("bytes_per_step", "bytes/step", ",.0f"),
                        ("embedding_bytes", "DP-table bytes", ",.0f"), ("all_to_all_bytes", "all-to-all", ",.0f"),
                        ("mlp_bytes", "MLP bytes", ",.0f"),
                        ("step_ms", "ms/step", ".1f"), ("bytes_vs_dense", "bytes/dense", ".4f"),
                        ("time_vs_dense", "time/dense", ".3f"), ("ratio_q1", "q1", ".3f"), ("ratio_q3", "q3", ".3f")]))
    for model in models:
        r = {x["variant"]: x for x in rows if x["model"] == model}
        t, t8 = r["touched FP32"]["embedding_bytes"], r["touched INT8"]["embedding_bytes"]
        full, every, qc = r[FULL], r[f"{FULL}, every DP kernel by touched rows"], r["all INT8 (+ qcomms INT8)"]
        ratio = (f"{t / max(t8, 1):.2f}x" if t != t8 else
                 "n/a (every data-parallel kernel is small enough to be all-reduced whole)")
        report(f"{model}: plan {r['dense FP32']['plan']}; DP-table bytes touched FP32 / touched INT8 = "
               f"{ratio}; fully compressed step time / dense (median per-round ratio) = "
               f"{full['time_vs_dense']:.3f} (quartiles {full['ratio_q1']:.3f}-{full['ratio_q3']:.3f}; 95% interval "
               f"of the median {full['ratio_ci95'][0]:.3f}-{full['ratio_ci95'][1]:.3f}), bytes/dense "
               f"{full['bytes_vs_dense']:.3f}; + qcomms INT8 {qc['time_vs_dense']:.3f}; every DP kernel by touched "
               f"rows {every['time_vs_dense']:.3f}")
    payload = {"steps": dict(zip(models, steps)), "world_size": 2, "rows": rows}
    print(f"json: {save('comm', payload, report.text, out=args.out)}")


if __name__ == "__main__":
    main()

"""Bytes per step and step time of training with compressed gradient communication, world size 2 (gloo, CPU).

Models: ``default`` with every table data-parallel (the paper's setting: the dense baseline all-reduces
whole-table gradients), and the Kaggle-shaped model (``kaggle`` config, 33.8M rows) under the plan its job uses
(TorchRec's planner: small tables data-parallel, large ones table-wise), since all 2.2 GB of it data-parallel
does not fit two ranks on this 23 GB machine.
Variants, same model and batches, built side by side in the same two processes and stepped in turn:
dense FP32 | touched rows FP32 | touched rows INT8 | touched rows INT8 + INT8 MLP with error feedback |
the same + TorchRec INT8 qcomms on the model-parallel all-to-alls (all compression on) | the same, but data-parallel
kernels of at most 1024 rows all-reduced whole (``comm.dp_whole_max_rows``: the Kaggle plan's 7 small tables, 101
rows in all, whose touched rows are as many bytes as the whole gradient).
Bytes are counted by instrumenting the collectives (what each rank hands to each, padding included); times are
medians over steps, measured after two warm-up steps.

    python -m bench.comm [--models default,kaggle] [--steps 10]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
import torch.distributed as dist

from bench.common import random_batches, save, table
from pipeline.configs import get_config
from pipeline.model import build_dlrm
from pipeline.optimizer import build_optimizer, fuse_embedding_optimizer
from sharding.comm import ByteCounter, CommConfig, compress_gradients, sharders_for
from sharding.plan import TablePlacement, describe_plan, manual_plan, shard_model
from sharding.policy import plan_by_policy
from tests.dist_utils import run_distributed

WHOLE_ROWS = 1024  # about the ids one batch of 128 looks up in a kernel of 8 small tables
VARIANTS = {
    "dense FP32": CommConfig(),
    "touched FP32": CommConfig(dp_tables="touched"),
    "touched INT8": CommConfig(dp_tables="touched_int8"),
    "touched INT8 + MLP INT8 EF": CommConfig(dp_tables="touched_int8", dense="int8_ef"),
    "all INT8 (+ qcomms INT8)": CommConfig(dp_tables="touched_int8", dense="int8_ef", qcomms="int8"),
    f"all INT8, DP kernels <= {WHOLE_ROWS} rows whole": CommConfig(dp_tables="touched_int8", dense="int8_ef",
                                                                  qcomms="int8", dp_whole_max_rows=WHOLE_ROWS),
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


def _worker(rank, world_size, config_name, steps):
    """All variants built side by side and stepped in turn (variant A step i, variant B step i, ...), so that the
    machine's load drifts over all of them alike; the first two rounds are warm-up."""
    cfg = get_config(config_name)
    batches = random_batches(cfg.model.num_embeddings, cfg.data.batch_size, steps + 2, seed=rank)
    counter = ByteCounter().install()
    built = {name: _build(cfg, config_name, comm, world_size, counter) for name, comm in VARIANTS.items()}
    times = {name: [] for name in built}
    sent = {name: collections.Counter() for name in built}
    for i, b in enumerate(batches):
        for name, (model, opt, _) in built.items():
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
        results[name] = {"step_ms": 1e3 * statistics.median(times[name]), "bytes": per_step, "plan": kinds}
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="default,kaggle", help="named configs giving the model shape and batch")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    args = p.parse_args()
    rows = []
    for model in args.models.split(","):
        res = run_distributed(_worker, model, args.steps, world_size=2)[0]
        base = res["dense FP32"]
        for name, r in res.items():
            b = r["bytes"]
            rows.append({"model": model, "variant": name, "bytes_per_step": b["total"],
                         "embedding_bytes": sum(v for k, v in b.items() if "DP tables" in k),
                         "all_to_all_bytes": sum(v for k, v in b.items() if "all_to_all" in k),
                         "mlp_bytes": sum(v for k, v in b.items() if "MLP" in k),
                         "step_ms": r["step_ms"], "bytes_vs_dense": b["total"] / base["bytes"]["total"],
                         "time_vs_dense": r["step_ms"] / base["step_ms"], "plan": r["plan"], "detail": b})
    print(table(rows, [("model", "model", "s"), ("variant", "variant", "s"), ("bytes_per_step", "bytes/step", ",.0f"),
                       ("embedding_bytes", "DP-table bytes", ",.0f"), ("all_to_all_bytes", "all-to-all", ",.0f"),
                       ("mlp_bytes", "MLP bytes", ",.0f"),
                       ("step_ms", "ms/step", ".1f"), ("bytes_vs_dense", "bytes/dense", ".4f"),
                       ("time_vs_dense", "time/dense", ".3f")]))
    for model in args.models.split(","):
        r = {x["variant"]: x for x in rows if x["model"] == model}
        t, t8 = r["touched FP32"]["embedding_bytes"], r["touched INT8"]["embedding_bytes"]
        whole = r[f"all INT8, DP kernels <= {WHOLE_ROWS} rows whole"]
        print(f"{model}: plan {r['dense FP32']['plan']}; DP-table bytes touched FP32 / touched INT8 = "
              f"{t / max(t8, 1):.2f}x; fully compressed step time / dense = "
              f"{r['all INT8 (+ qcomms INT8)']['time_vs_dense']:.3f} (small DP kernels whole: "
              f"{whole['time_vs_dense']:.3f}, bytes/dense {whole['bytes_vs_dense']:.3f})")
    print(f"json: {save('comm', {'steps': args.steps, 'world_size': 2, 'rows': rows})}")


if __name__ == "__main__":
    main()

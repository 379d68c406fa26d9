"""Plan a Terabyte-scale DLRM for simulated GPU clusters, without the hardware:
``python -m dqrm.pipeline.scale [--gpus 8,16,64] [--hbm-gb 80]``.

TorchRec's planner places the MLPerf DLRMv2 tables (40M-row cap, dim 128) for each simulated topology; the table
then gives each rank's embedding storage at FP32 and, for the same placement, in FBGEMM's INT4 row format (4-bit
codes plus an fp16 scale and bias per row), and how many 80 GB ranks' worth of memory each needs in total; and what
the shard-local export (``quant.convert.stream_integer_rows``) adds to each rank's memory while it streams the
integer rows to rank 0, and what rank 0 then needs to build the serving module. It builds the model
(``pipeline.model``), so it sits with the composition rather than in ``sharding``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import ShardingType

from dqrm.pipeline.config import ModelConfig
from dqrm.pipeline.model import build_dlrm
from dqrm.quant.convert import CHUNK_ROWS

from dqrm.pipeline.configs import DLRMV2_CARDINALITIES  # noqa: F401 - re-exported: bench and tests read it here


def row_bytes(dim: int, bits: int) -> float:
    return dim * 4 if bits == 32 else dim * bits / 8 + 4


def per_rank_bytes(plan, world_size: int, dims: dict[str, int], rows: dict[str, int], bits: int) -> list[float]:
    load = [0.0] * world_size
    for module_plan in plan.plan.values():
        for table, ps in module_plan.items():
            if ps.sharding_type == ShardingType.DATA_PARALLEL.value or ps.sharding_spec is None:
                for r in range(world_size):
                    load[r] += rows[table] * row_bytes(dims[table], bits)
                continue
            for shard in ps.sharding_spec.shards:
                r = shard.placement.rank()
                n_rows, n_cols = shard.shard_sizes
                load[r] += n_rows * row_bytes(n_cols, bits)  # an INT4 shard keeps a scale and bias per row
    return load


def export_peak_bytes(plan, world_size: int, dims: dict[str, int], bits: int,
                      chunk_rows: int = CHUNK_ROWS) -> dict[str, list[float] | float]:
    """What the shard-local export adds, per rank. A rank that owns rows of a table quantizes them one chunk at a
    time where they live (on a GPU: the torch ops' float temporaries, about three chunks of float32) and hands the
    chunk's codes (a byte each) to the host, which packs them; rank 0 also holds the chunk it assembles and the one it receives. Replicated
    tables are converted by rank 0 alone. After streaming, with the float model freed, rank 0 builds the serving
    module, which allocates the integer tables once in host memory."""
    device = [0.0] * world_size
    host = [0.0] * world_size
    for module_plan in plan.plan.values():
        for table, ps in module_plan.items():
            owners = range(1) if ps.sharding_type == ShardingType.DATA_PARALLEL.value or ps.sharding_spec is None \
                else {shard.placement.rank() for shard in ps.sharding_spec.shards}
            chunk_float = 3 * chunk_rows * dims[table] * 4
            chunk_int = chunk_rows * (row_bytes(dims[table], bits) + dims[table])  # + one byte a code before packing
            for r in owners:
                device[r] = max(device[r], chunk_float)
                host[r] = max(host[r], chunk_int)
    host[0] = max(host[0], 2 * max(chunk_rows * row_bytes(d, bits) for d in dims.values()))
    return {"device_bytes": device, "host_bytes": host}


def plan_cluster(gpus: int, hbm_gb: float, dim: int = 128):
    model = build_dlrm(ModelConfig(embedding_dim=dim, num_embeddings=DLRMV2_CARDINALITIES,
                                   dense_arch=(512, 256, dim), over_arch=(1024, 1024, 512, 256, 1)),
                       torch.device("meta"))
    topology = TopologyFactory.create_topology(
        TrainerConfig(world_size=gpus, local_world_size=min(8, gpus), hbm_cap_bytes=int(hbm_gb * 2**30)),
        kernel_config=KernelConfig(compute_device="cuda"))
    return EmbeddingShardingPlanner(topology=topology).plan(model, get_default_sharders())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dqrm.pipeline.scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", default="8,16,64", help="comma-separated cluster sizes")
    p.add_argument("--hbm-gb", type=float, default=80.0, help="memory per GPU")
    p.add_argument("--dim", type=int, default=128, help="embedding dimension (DLRMv2: 128)")
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    names = [f"t_cat_{i}" for i in range(26)]
    rows = dict(zip(names, DLRMV2_CARDINALITIES))
    dims = {n: args.dim for n in names}
    total = {b: sum(r * row_bytes(args.dim, b) for r in rows.values()) for b in (32, 4)}
    hbm = args.hbm_gb * 2**30
    out = {"tables_total_gb": {str(b): v / 2**30 for b, v in total.items()},
           "min_ranks_of_memory": {str(b): math.ceil(v / hbm) for b, v in total.items()}, "clusters": {}}
    print(f"DLRMv2 tables (40M cap, dim {args.dim}): FP32 {total[32] / 2**30:.1f} GB = "
          f"{out['min_ranks_of_memory']['32']} x {args.hbm_gb:.0f} GB ranks of memory; INT4 (FBGEMM rows) "
          f"{total[4] / 2**30:.1f} GB = {out['min_ranks_of_memory']['4']} rank(s)")
    for gpus in (int(g) for g in args.gpus.split(",")):
        plan = plan_cluster(gpus, args.hbm_gb, args.dim)
        kinds: dict[str, int] = {}
        for module_plan in plan.plan.values():
            for ps in module_plan.values():
                kinds[ps.sharding_type] = kinds.get(ps.sharding_type, 0) + 1
        fp32 = per_rank_bytes(plan, gpus, dims, rows, 32)
        int4 = per_rank_bytes(plan, gpus, dims, rows, 4)
        gb = lambda xs: [x / 2**30 for x in xs]  # noqa: E731
        export = export_peak_bytes(plan, gpus, dims, 4)
        out["clusters"][gpus] = {"sharding_types": kinds, "fp32_gb_per_rank": gb(fp32), "int4_gb_per_rank": gb(int4),
                                 "export_added_device_gb_per_rank": gb(export["device_bytes"]),
                                 "export_added_host_gb_per_rank": gb(export["host_bytes"]),
                                 "export_rank0_serving_module_host_gb": total[4] / 2**30}
        print(f"\n{gpus} GPUs x {args.hbm_gb:.0f} GB: tables by sharding type {kinds}")
        print(f"{'':>14} {'min GB':>8} {'max GB':>8} {'mean GB':>8} {'max/mean':>9} {'max % of HBM':>13}")
        for label, xs in (("FP32", fp32), ("INT4", int4)):
            mean = sum(xs) / len(xs)
            print(f"{label:>14} {min(xs) / 2**30:>8.2f} {max(xs) / 2**30:>8.2f} {mean / 2**30:>8.2f} "
                  f"{max(xs) / mean:>9.2f} {100 * max(xs) / hbm:>12.1f}%")
        print(f"  export, shard-local: adds at most {max(export['device_bytes']) / 2**20:.0f} MB of GPU memory and "
              f"{max(export['host_bytes']) / 2**20:.0f} MB of host memory to any rank while the INT4 rows stream to "
              f"rank 0 (peak GPU use = the FP32 max above + that); rank 0 then builds the serving module in "
              f"{total[4] / 2**30:.1f} GB of host memory, after the float model is freed (the gathered export "
              f"needed the whole FP32 state, {total[32] / 2**30:.1f} GB, on rank 0)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

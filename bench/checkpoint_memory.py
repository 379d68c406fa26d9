"""What a checkpoint save adds to each rank's memory: DCP by itself against ``Checkpointer.save``.

A DLRM whose 26 tables hold ``--table-gb`` GB of FP32 weights (dimension 64) is sharded table-wise over
``--world-size`` gloo ranks on CPU (DMP with fused SGD, as training runs it: each rank's tables are views into its
fused TBE's flat buffer) and saved once, each variant in fresh processes:

- ``dcp.save``: ``dcp.save({"model": ..., "optim": ...}, checkpoint_id=...)`` with DCP's default planner, which is
  what ``pipeline/checkpoint.py`` did before (DCP copies every view and holds the copies until the rank's file is
  written);
- ``Checkpointer.save``: the project's save (the tables handed to DCP without a copy, the disk-space check, each
  rank hashing its files, the manifest, the rename).

Per rank: the bytes of its table shards, RSS just before the save, the peak RSS during it (Linux's VmHWM, reset just
before), the difference, and the seconds the save took.

    python -m bench.checkpoint_memory [--table-gb 2] [--world-size 2] [--dir /tmp] [--out DIR]

Results go to bench/results/checkpoint_memory.{json,txt} with the commit, whether the files it ran from differ from
it, and the command. Checkpoints are written under ``--dir`` and deleted afterwards.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.common import add_out_argument, provenance, save, table

VARIANTS = ("dcp.save", "Checkpointer.save")
USED = ("bench/checkpoint_memory.py", "pipeline/checkpoint.py", "pipeline/dcp_reader.py", "pipeline/phases.py",
        "pipeline/model.py", "sharding/plan.py")
DIM = 64


def _worker(rank: int, world_size: int, variant: str, table_gb: float, where: str) -> dict:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from dqrm.pipeline.checkpoint import Checkpointer, tensor_bytes
    from dqrm.pipeline.config import ModelConfig, OptimConfig
    from dqrm.pipeline.model import build_dlrm
    from dqrm.pipeline.phases import reset_peak, status_bytes
    from dqrm.pipeline.optimizer import build_optimizer, fuse_embedding_optimizer
    from dqrm.pipeline.quiet import quiet_library_noise
    from dqrm.sharding.plan import TablePlacement, manual_plan, shard_model

    quiet_library_noise()
    rows = int(table_gb * 1e9 / (26 * DIM * 4))
    cfg = ModelConfig(embedding_dim=DIM, num_embeddings=(rows,) * 26, dense_arch=(128, DIM), over_arch=(256, 1))
    model = build_dlrm(cfg, torch.device("cpu"))
    fuse_embedding_optimizer(model.model.sparse_arch.parameters(), OptimConfig())
    placements = {f"t_cat_{i}": TablePlacement(kind="table_wise", ranks=(i % world_size,)) for i in range(26)}
    model = shard_model(model, manual_plan(model, placements, world_size=world_size, device=torch.device("cpu")),
                        torch.device("cpu"))
    optimizer = build_optimizer(model, OptimConfig())
    shards = tensor_bytes(model.state_dict())[0]
    gc.collect()
    dist.barrier()
    reset_peak()
    before = status_bytes("VmRSS")
    t0 = time.perf_counter()
    if variant == "dcp.save":
        dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=f"{where}/plain")
    else:
        Checkpointer(Path(where)).save(1, model, optimizer, {})
    seconds = time.perf_counter() - t0
    peak = status_bytes("VmHWM")
    return {"variant": variant, "rank": rank, "shard_gb": shards / 1e9, "rss_before_gb": before / 1e9,
            "peak_gb": peak / 1e9, "added_gb": (peak - before) / 1e9, "added_of_shards": (peak - before) / shards,
            "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table-gb", type=float, default=2.0, help="FP32 table bytes of the whole model, in GB")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the checkpoints are written (then deleted)")
    add_out_argument(p)
    args = p.parse_args(argv)
    prov = provenance(USED)

    from tests.dist_utils import run_distributed

    rows = []
    for variant in VARIANTS:
        where = tempfile.mkdtemp(prefix="checkpoint_memory_", dir=args.dir)
        try:
            rows += run_distributed(_worker, variant, args.table_gb, where, world_size=args.world_size)
        finally:
            shutil.rmtree(where, ignore_errors=True)
    columns = [("variant", "variant (save call)", ""), ("rank", "rank", "d"), ("shard_gb", "shards GB", ".3f"),
               ("rss_before_gb", "RSS before GB", ".3f"), ("peak_gb", "peak GB", ".3f"),
               ("added_gb", "added GB", ".3f"), ("added_of_shards", "added/shards", ".3f"),
               ("seconds", "save s", ".1f")]
    text = (f"{args.table_gb:g} GB of FP32 tables (26 x dim {DIM}), table-wise over {args.world_size} rank(s)\n\n"
            + table(rows, columns))
    print(text)
    payload = {**prov, "table_gb": args.table_gb, "world_size": args.world_size, "rows": rows}
    print(f"json: {save('checkpoint_memory', payload, text, out=args.out, used=USED)}")


if __name__ == "__main__":
    main()

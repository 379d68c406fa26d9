"""What one rank's process runs in: its process group and device, and its log files; set up at the start of a job and
torn down at its end, however it ends."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist


@contextlib.contextmanager
def rank_runtime() -> Iterator[tuple[int, int, torch.device]]:
    """(rank, world size, device) of this process, its process group living exactly as long as the ``with`` block;
    the log handlers ``setup_logging`` installed are closed with it."""
    rank, world_size, device = init_distributed()
    try:
        yield rank, world_size, device
    finally:
        for h in list(logging.getLogger().handlers):
            h.close()
            logging.getLogger().removeHandler(h)
        if dist.is_initialized():
            dist.destroy_process_group()


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the process group a launcher set up (nccl on GPUs, gloo on CPU), or a group of one without a launcher
    (DistributedModelParallel needs a process group even alone)."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend)
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), device


def setup_logging(run_dir: Path, rank: int) -> None:
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.FileHandler(run_dir / "logs" / f"rank{rank}.log")]
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stdout))
    root = logging.getLogger()
    for h in list(root.handlers):  # a library may have called basicConfig already
        root.removeHandler(h)
    root.setLevel(logging.WARNING)  # libraries (torchrec, fbgemm) log per-table details at INFO on the root logger
    for h in handlers:
        h.setFormatter(fmt)
        # torchrec's planner warns once per table that it is sharded as planned: not news.
        h.addFilter(lambda r: "Sharding spec not found" not in r.getMessage())
        root.addHandler(h)
    for ours in ("dqrm",):  # every module of the package logs under dqrm.*
        logging.getLogger(ours).setLevel(logging.INFO)

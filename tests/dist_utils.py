"""Spawn world-size-N gloo process groups on CPU for distributed tests (one shared helper)."""

from __future__ import annotations

import os
import socket
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results: Any, links: Any) -> None:
    master = links.enter(rank) if links is not None else "127.0.0.1"
    os.environ.update(MASTER_ADDR=master, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    if world_size > 1:  # as torchrun does: one intra-op thread per process, or the ranks fight over the cores
        torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results[rank] = ("ok", fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - the parent re-raises with the child's traceback
        results[rank] = ("error", traceback.format_exc())
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, *args: Any, world_size: int = 2, links: Any = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes; return each rank's result (picklable).
    ``links`` (benches only, ``bench.links.Links``): each rank first enters its own network namespace, and the ranks
    talk over the emulated links instead of loopback."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results, links))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=600)
            if p.is_alive():
                p.kill()
                raise TimeoutError("a distributed test worker hung for 600 s")
        out = []
        for r in range(world_size):
            if r not in results:
                raise RuntimeError(f"rank {r} died without a result (exit code {procs[r].exitcode})")
            status, value = results[r]
            if status != "ok":
                raise RuntimeError(f"rank {r} failed:\n{value}")
            out.append(value)
        return out

"""Entry point of a training job: ``python -m dqrm.pipeline.train --config NAME [overrides]`` (one process per rank).

A job is a sequence of named stages, each in the module that owns it: the config from the command line
(``pipeline.cli``), the rank's process group and logs (``pipeline.runtime``), the data (``pipeline.data``), the
sharded QAT model (``pipeline.parallelize``), the training loop and its checkpoints (``pipeline.trainer``), the
export (``pipeline.export``) and the report (``pipeline.report``). Each stage's wall time and peak memory per rank
go to ``logs/phases_rankR.json``.
"""

from __future__ import annotations

import gc
import logging
import sys
import time

import torch
import torch.distributed as dist

from dqrm.pipeline.budget import budget_summary, budgeted
from dqrm.pipeline.checkpoint import Checkpointer, NotEnoughDiskSpace
from dqrm.pipeline.cli import config_or_exit, parse_args
from dqrm.pipeline.config import JobConfig
from dqrm.pipeline.data import build_splits, resolve_data
from dqrm.pipeline.export import finish_export, write_integer_rows
from dqrm.pipeline.launch import refusal, write_refused
from dqrm.pipeline.parallelize import build_sharded_model
from dqrm.pipeline.phases import PhaseLog
from dqrm.pipeline.quiet import quiet_library_noise
from dqrm.pipeline.report import report
from dqrm.pipeline.runtime import rank_runtime, setup_logging
from dqrm.pipeline.trainer import NonFiniteLossError, Trainer

log = logging.getLogger("dqrm")


def run(cfg: JobConfig) -> dict:
    """One rank of a job; the process group lives exactly as long as this call."""
    with rank_runtime() as (rank, world_size, device):
        return run_rank(cfg, rank, world_size, device)


def run_rank(cfg: JobConfig, rank: int, world_size: int, device: torch.device) -> dict:
    """One rank of a job in a process group that already exists (``run`` makes one; tests spawn their own); returns
    this rank's summary."""
    run_dir = cfg.run_path
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run dir {run_dir} exists and is not a directory")
    setup_logging(run_dir, rank)
    phases = PhaseLog(run_dir / "logs" / f"phases_rank{rank}.json")
    log.info("job %s: world size %d on %s, run dir %s", cfg.name, world_size, device, run_dir)
    with phases("data"):
        paths, bayes = resolve_data(cfg, rank)
    if cfg.quant.has_budget:
        with phases("budget_search"):
            cfg = budgeted(cfg, paths, rank, world_size, device)
    with phases("readers"):
        splits = build_splits(cfg, paths, rank, world_size)

    with phases("build_shard"):
        model, optimizer, counter, comm_state = build_sharded_model(cfg, rank, world_size, device)
    checkpointer = Checkpointer(run_dir / "checkpoints", timed=phases, extra=comm_state)
    trainer = Trainer(cfg, model, optimizer, device, splits, checkpointer, rank=rank, comm_counter=counter)
    with phases("resume_load"):
        if trainer.resume():
            log.info("resuming at epoch %d (step %d)", trainer.start_epoch + 1, trainer.step)
    t0 = time.perf_counter()
    with phases("train"):
        history = trainer.train()
    eval_history, exported = trainer.eval_history, None
    if cfg.quant_mode != "fp32":
        with phases("export_rows"):
            ref_logits, parts = write_integer_rows(cfg, trainer, model)
        del trainer, model, optimizer, splits  # the float model is not needed any more: free it before serving
        gc.collect()
        dist.barrier()
        if rank == 0:
            exported = finish_export(cfg, parts, ref_logits, paths["test"], world_size, phases)
    summary = {"config": cfg.name, "quant_mode": cfg.quant_mode, "world_size": world_size, "device": str(device),
               "epochs": history, "eval_history": eval_history, "bayes_test": bayes, "export": exported,
               "test_files": [str(p) for p in paths["test"]], "budget": budget_summary(cfg, exported),
               "wall_seconds_this_attempt": time.perf_counter() - t0}
    if rank == 0:
        report(run_dir, cfg.name, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_library_noise()
    cfg = config_or_exit(args)
    if isinstance(cfg, int):
        return cfg
    try:
        run(cfg)
    except (FileNotFoundError, ValueError, NotImplementedError, NonFiniteLossError, NotEnoughDiskSpace) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the file system refused: full, read-only, no permission
        print(f"error: {os_error_line(e, cfg.run_path)}", file=sys.stderr)
        return 1
    except RuntimeError:
        # torch's writers (torch.jit.save, torch.save) report a full disk as a RuntimeError ("unexpected pos")
        refused = write_refused(cfg.run_path)
        if refused is None:
            raise
        print(f"error: {refused}", file=sys.stderr)
        return 1
    return 0


def os_error_line(e: OSError, run_dir) -> str:
    """One line for a write the file system refused: the file, why, and what to do (the newest complete checkpoint
    and any finished artifact are untouched: checkpoints are written aside and renamed, so a rerun resumes)."""
    where = e.filename or run_dir
    return (f"{where}: {refusal(e)} ({e.strerror or e}). Free space or make {run_dir} writable (or point --run-dir "
            f"elsewhere), then rerun the same command: the job resumes from its newest complete checkpoint")


if __name__ == "__main__":
    sys.exit(main())

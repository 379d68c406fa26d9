"""The single-device DLRM made the sharded model a job trains: planned, sharded (DMP), prepared for QAT, its gradient
communication compressed, with its optimizer (the wiring of ``sharding`` and ``quant`` around ``pipeline.model``)."""

from __future__ import annotations

import json
import logging

import torch
import torch.distributed as dist

from dqrm.pipeline.config import JobConfig, to_dict
from dqrm.pipeline.model import build_dlrm
from dqrm.pipeline.optimizer import build_optimizer, describe as describe_optimizers, fuse_embedding_optimizer
from dqrm.quant.api import QATConfig, quantize_, set_fake_quant
from dqrm.sharding.byte_counter import ByteCounter
from dqrm.sharding.comm import check_qcomms, compress_gradients, sharders_for
from dqrm.sharding.ddp_hooks import Int8ErrorFeedbackHook
from dqrm.sharding.plan import describe_plan, plan_table, save_plan, shard_model
from dqrm.sharding.policy import placements_from_plan, plan_by_policy, save_placements

log = logging.getLogger("dqrm")


def build_sharded_model(cfg: JobConfig, rank: int, world_size: int, device: torch.device):
    """The DLRM, planned, sharded (DMP), prepared for QAT, with gradient compression and its optimizer; rank 0
    writes the plan and config into the run dir. Returns (model, optimizer, byte counter or None, the gradient
    compression's state to checkpoint by name)."""
    torch.manual_seed(cfg.seed)
    model = build_dlrm(cfg.model, device)
    fuse_embedding_optimizer(model.model.sparse_arch.parameters(), cfg.optim)
    sharders = sharders_for(cfg.comm, device)
    plan = plan_by_policy(model, cfg.plan, world_size=world_size, device=device, pg=dist.group.WORLD,
                          sharders=sharders)
    rows = describe_plan(plan)
    check_qcomms(cfg.comm, rows)
    model = shard_model(model, plan, device, sharders)
    if cfg.quant_mode != "fp32":
        quantize_(model, QATConfig(spec=cfg.quant, step="prepare"), pg=dist.group.WORLD)
        set_fake_quant(model, cfg.quant_mode == "qat")  # ptq trains in float
    counter = ByteCounter().install(dist.group.WORLD) if cfg.comm.count_bytes and world_size > 1 else None
    hooks = compress_gradients(model, cfg.comm, counter)
    comm_state = {"comm_int8_ef": h for h in hooks if isinstance(h, Int8ErrorFeedbackHook)}
    optimizer = build_optimizer(model, cfg.optim)
    if rank == 0:
        run_dir = cfg.run_path
        log.info("sharding plan:\n%s", plan_table(rows))
        log.info("optimizers: %s", describe_optimizers(cfg.optim))
        save_plan(rows, run_dir / "plan.json")
        try:
            save_placements(placements_from_plan(plan), run_dir / "placements.json")
        except ValueError as e:  # e.g. the planner chose table_column_wise, which placements cannot express
            log.warning("placements.json not written (%s); plan.json holds the full plan", e)
        (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    return model, optimizer, counter, comm_state

"""TensorBoard for a training job: rank 0 writes its scalars into ``RUN_DIR/tensorboard`` as the job runs
(``tensorboard --logdir runs/``).

Every ``observe.log_every_steps`` steps, and at the end of each epoch for the steps since the previous log:

=====================================  ==========================================================================
``train/loss``                         mean training loss of those steps over every rank's batches
``train/samples_per_s``                rows of all ranks / wall time since the previous log (or the epoch's start)
``lr/embedding``, ``lr/mlp``           the optimizer's learning rates (``_N`` suffixes where one part has several)
``qat_scale/TABLE``                    table grid: the table's scale (``pipeline.qat_stats``)
``qat_scale_min|max/TABLE``            row grid: the range of the scales of the rows looked up since the last log
``qat_clip_share/TABLE``               share of those rows' values clipped at the grid's ends
``qat_quant_error/TABLE``              mean ``|FQ(w) - w|`` over those rows' values
``comm_bytes_per_step/KIND``           rank 0's byte counter (``sharding.byte_counter``): wire bytes of each kind
                                       since the previous log / steps, and their ``total``
=====================================  ==========================================================================

and at each evaluation ``SPLIT/auc``, ``SPLIT/accuracy``, ``SPLIT/logloss`` (``val``, ``test``; ``ptq_val``,
``ptq_test`` for post-training quantization), each at the number of training steps done. The QAT scalars exist for
``quant_mode=qat``, the byte counts where the job counts bytes (``comm.count_bytes`` at world size > 1).

Only rank 0 writes. Each log gathers every rank's loss and QAT statistics to it in one ``all_gather`` (all ranks log
at the same steps: they step together); everything else is rank 0's own. A resumed job drops the events of the steps
it repeats, those after the checkpoint it resumes from (``SummaryWriter(purge_step=...)``).
``bench/logging_overhead.py`` measures the cost.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from dqrm.pipeline.config import JobConfig
from dqrm.pipeline.qat_stats import GridStats
from dqrm.quant.api import embedding_quantizer
from dqrm.sharding.byte_counter import ByteCounter

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
"""Where a job's event files go, inside its run dir."""
MAX_QUEUE = 1024
"""Events the writer queues before the training thread waits for them to be written (a log is ~90 for 26 tables)."""


class Observer:
    """The TensorBoard scalars of one rank of a job (see the module docstring); every method is a no-op when it is
    off (``Observer.off()``, or ``observe.tensorboard=false``)."""

    def __init__(self, log_dir: Path | None, *, every: int, rows_per_step: int, rank: int, world_size: int,
                 device: torch.device, optimizer: Optimizer | None = None, grid: GridStats | None = None,
                 counter: ByteCounter | None = None, purge_step: int | None = None) -> None:
        """``log_dir`` None: off. ``rows_per_step``: rows of all ranks per training step. ``grid``: the QAT grid's
        statistics, None without QAT. ``purge_step``: events of an earlier attempt at this step or later are
        dropped (TensorBoard's reader drops them)."""
        self.enabled = log_dir is not None
        self.every, self.rows_per_step, self.rank, self.world_size = every, rows_per_step, rank, world_size
        self.device, self.optimizer, self.grid, self.counter = device, optimizer, grid, counter
        self.writer = None
        if self.enabled and rank == 0:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only where it writes

            # A queue that holds a whole log: with the default (10 events) the training thread waits for the
            # writer thread (and the GIL) every 10 scalars, which made a log 3-4x slower on a busy 2-core machine.
            self.writer = SummaryWriter(str(log_dir), purge_step=purge_step or None, max_queue=MAX_QUEUE,
                                        flush_secs=30)
        self.start_epoch()

    @classmethod
    def off(cls) -> "Observer":
        return cls(None, every=1, rows_per_step=0, rank=0, world_size=1, device=torch.device("cpu"))

    @classmethod
    def for_job(cls, cfg: JobConfig, model: nn.Module, optimizer: Optimizer, *, rank: int, world_size: int,
                device: torch.device, counter: ByteCounter | None, start_step: int) -> "Observer":
        """The job's observer; ``start_step``: the steps done before (a resumed job's checkpoint), whose events an
        earlier attempt wrote and which stay; those it wrote after them are of steps this job repeats."""
        if not cfg.observe.tensorboard:
            return cls.off()
        quantizer = embedding_quantizer(model) if cfg.quant_mode == "qat" else None
        return cls(cfg.run_path / TENSORBOARD_DIR, every=cfg.observe.log_every_steps,
                   rows_per_step=cfg.data.batch_size * world_size, rank=rank, world_size=world_size, device=device,
                   optimizer=optimizer, grid=GridStats(quantizer) if quantizer is not None else None,
                   counter=counter, purge_step=start_step + 1)

    def start_epoch(self) -> None:
        """A new interval starts (the byte counter was just reset, or training starts)."""
        self._steps = 0
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._bytes_before = dict(self.counter.bytes) if self.counter is not None else {}
        self._t0 = time.perf_counter()

    def step_done(self, step: int, loss: torch.Tensor) -> None:
        """After each training step (``step``: the steps done, ``loss``: this rank's, not read back here)."""
        if not self.enabled:
            return
        self._loss_sum += loss
        self._steps += 1
        if step % self.every == 0:
            self.log_interval(step)

    def end_epoch(self, step: int) -> None:
        """Log the steps since the previous log, if any (collective, like ``log_interval``)."""
        if self.enabled and self._steps:
            self.log_interval(step)

    @torch.no_grad()
    def log_interval(self, step: int) -> None:
        """Log the steps since the previous log at ``step`` (collective: every rank calls it at the same step)."""
        if not self.enabled:
            return
        now = time.perf_counter()
        parts = [self._loss_sum.reshape(1).to(self.device)]
        if self.grid is not None:
            parts.append(self.grid.collect().reshape(-1).to(self.device))
        mine = torch.cat(parts)
        if self.world_size > 1:
            gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
            dist.all_gather(gathered, mine)
            per_rank = torch.stack(gathered).cpu()
        else:
            per_rank = mine.unsqueeze(0).cpu()
        if self.writer is not None:
            scalars = {}
            if self._steps:
                scalars["train/loss"] = float(per_rank[:, 0].sum()) / (self._steps * self.world_size)
                scalars["train/samples_per_s"] = self._steps * self.rows_per_step / max(now - self._t0, 1e-9)
                scalars.update(self._bytes_per_step())
            scalars.update({f"lr/{k}": v for k, v in learning_rates(self.optimizer).items()})
            if self.grid is not None:
                stats = per_rank[:, 1:].reshape(self.world_size, len(self.grid.table_names), -1)
                scalars.update(self.grid.scalars(GridStats.combine(stats)))
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
        if self.counter is not None:
            self._bytes_before = dict(self.counter.bytes)
        self._steps, self._t0 = 0, now
        self._loss_sum.zero_()

    def _bytes_per_step(self) -> dict[str, float]:
        """Rank 0's wire bytes per step since the previous log, by the counter's kinds, and their total."""
        if self.counter is None:
            return {}
        sent = {k: v - self._bytes_before.get(k, 0.0) for k, v in sorted(self.counter.bytes.items())}
        out = {f"comm_bytes_per_step/{k}": v / self._steps for k, v in sent.items()}
        out["comm_bytes_per_step/total"] = sum(sent.values()) / self._steps
        return out

    def log_eval(self, split: str, metrics: dict[str, float], step: int) -> None:
        """An evaluation's AUC, accuracy and log loss under ``split/`` at ``step`` (rank 0; not collective)."""
        if self.writer is not None:
            for name in ("auc", "accuracy", "logloss"):
                self.writer.add_scalar(f"{split}/{name}", metrics[name], step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.grid is not None:
            self.grid.remove()


def learning_rates(optimizer: Optimizer | None) -> dict[str, float]:
    """The learning rate of each part of a job's optimizer (a TorchRec ``CombinedOptimizer`` of keyed optimizers):
    ``embedding`` for the parts over the tables (fused or data-parallel), ``mlp`` for the others; where a name has
    several distinct rates, ``NAME_0``, ``NAME_1``, ... in the optimizer's order."""
    if optimizer is None:
        return {}
    rates: dict[str, list[float]] = {}
    for _, part in getattr(optimizer, "optimizers", [("", optimizer)]):
        names = getattr(part, "params", {})
        # a table's weight is an EmbeddingBagCollection's (TorchRec names its tables ``...embedding_bags.NAME``)
        kind = "embedding" if any(".embedding_bags." in f".{n}" for n in names) else "mlp"
        for group in part.param_groups:
            if float(group["lr"]) not in rates.setdefault(kind, []):
                rates[kind].append(float(group["lr"]))
    return {(k if len(v) == 1 else f"{k}_{i}"): lr for k, v in rates.items() for i, lr in enumerate(v)}

"""The train/eval loop: ``train()`` -> ``train_epoch()`` -> ``train_step()`` (one ``TrainPipelineSparseDist.progress``),
watched through TensorBoard (``pipeline.observe``) and, for a window of steps, the profiler (``pipeline.profile``)."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import signal
import sys
import time
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from tqdm import tqdm

from dqrm.datasets.reader import ParquetBatches
from dqrm.pipeline.checkpoint import MANIFEST, Checkpointer
from dqrm.pipeline.config import JobConfig, parse_profile_steps
from dqrm.pipeline.metrics import binary_metrics, gather
from dqrm.pipeline.observe import Observer
from dqrm.pipeline.phases import attempt
from dqrm.pipeline.profile import PROFILE_DIR, ProfileWindow
from dqrm.quant.api import embedding_quantizer, set_fake_quant

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Splits:
    train: ParquetBatches
    val: ParquetBatches
    test: ParquetBatches


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    """Trains a sharded DLRM through TorchRec's ``TrainPipelineSparseDist``, evaluating and checkpointing each epoch."""

    def __init__(self, cfg: JobConfig, model: nn.Module, optimizer: Optimizer, device: torch.device, data: Splits,
                 checkpointer: Checkpointer, *, rank: int = 0, comm_counter=None) -> None:
        self.cfg, self.model, self.optimizer, self.device, self.data = cfg, model, optimizer, device, data
        self.checkpointer, self.rank, self.comm_counter = checkpointer, rank, comm_counter
        self.pipeline = TrainPipelineSparseDist(model, optimizer, device)
        self.step = 0
        self.start_epoch = 0
        self.history: list[dict[str, Any]] = []
        self.eval_history: list[dict[str, Any]] = []
        # Position inside a partly trained epoch (restored from a mid-epoch checkpoint).
        self.in_epoch: dict[str, Any] = {"batches_done": 0, "loss_sum": 0.0}
        # Off until train() opens them (a bench or the budget search may call train_epoch / train_step alone).
        self.observer = Observer.off()
        self.profile = ProfileWindow(None, cfg.run_path / PROFILE_DIR, rank)

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint in the run dir, if there is one."""
        latest = self.checkpointer.latest_valid()
        if latest is None:
            return False
        self._check_resumable(latest)
        progress = self.checkpointer.load(latest, self.model, self.optimizer)
        self.step, self.start_epoch = progress["step"], progress["epoch"]
        self.history, self.eval_history = progress["history"], progress.get("eval_history", [])
        self.in_epoch = progress.get("in_epoch") or {"batches_done": 0, "loss_sum": 0.0}
        return True

    def _check_resumable(self, path) -> None:
        """A mid-epoch checkpoint continues its epoch only at the world size that wrote it: each rank reads its own
        slice of the rows in its own shuffled order, so another world size has no position to continue from."""
        progress = json.loads((path / MANIFEST).read_text())["progress"]
        done = (progress.get("in_epoch") or {}).get("batches_done", 0)
        saved, now = progress.get("world_size"), _world_size()
        if not done or saved == now:
            return
        if saved is None:
            log.warning("%s was written mid-epoch by a version that did not record its world size; resuming at %d "
                        "assumes it is the same", path, now)
            return
        raise ValueError(f"{path} was written mid-epoch (epoch {progress['epoch'] + 1}, {done} batches done) at world "
                         f"size {saved}; this job runs at world size {now}. Each rank reads its own slice of an epoch "
                         f"in its own shuffled order, so another world size cannot continue that epoch. Resume at "
                         f"world size {saved} (e.g. --nproc {saved}), or from an end-of-epoch checkpoint, which any "
                         f"world size can resume (move the newer checkpoints out of {path.parent})")

    def train(self) -> list[dict[str, Any]]:
        self.observer = Observer.for_job(self.cfg, self.model, self.optimizer, rank=self.rank,
                                         world_size=_world_size(), device=self.device, counter=self.comm_counter,
                                         start_step=self.step)
        self.profile = ProfileWindow(parse_profile_steps(self.cfg.observe.profile_steps),
                                     self.cfg.run_path / PROFILE_DIR, self.rank)
        try:
            for epoch in range(self.start_epoch, self.cfg.epochs):
                reason = early_stop(self.history, self.cfg.early_stop_epochs)
                if reason:
                    log.info("stopping before epoch %d of %d: %s", epoch + 1, self.cfg.epochs, reason)
                    break
                stats = self.train_epoch(epoch)
                stats["val"], stats["test"] = self.evaluate("val"), self.evaluate("test")
                if self.cfg.quant_mode == "ptq":
                    with post_training_quantized(self.model):
                        stats["ptq_val"], stats["ptq_test"] = self.evaluate("val"), self.evaluate("test")
                self.history.append(stats)
                self._log_epoch(stats)
                self.in_epoch = {"batches_done": 0, "loss_sum": 0.0}
                self.checkpointer.save(self.step, self.model, self.optimizer, self._progress(epoch + 1),
                                       keep=self.cfg.checkpoint_keep)
        finally:
            self.profile.close()
            self.observer.close()
        return self.history

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        self.model.train()
        self.data.train.set_epoch(epoch)
        limit = self.cfg.limit_train_batches or len(self.data.train)
        skip = self.in_epoch["batches_done"]  # batches this epoch already trained before a restart
        if skip:
            log.info("epoch %d: skipping the %d batches trained before the restart", epoch + 1, skip)
        batches = itertools.islice(iter(self.data.train), skip, limit)
        total = min(limit, len(self.data.train))
        loss_sum = float(self.in_epoch["loss_sum"])  # a Python float: one read of the loss a step, no tensor ops
        steps, t0 = skip, time.perf_counter()
        if self.comm_counter is not None:
            self.comm_counter.reset()
        self.observer.start_epoch()
        with tqdm(total=total, initial=skip, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", unit="batch",
                  disable=self.rank != 0, mininterval=1 if sys.stderr.isatty() else 15, file=sys.stderr) as bar:
            while True:
                try:
                    with self.profile.step(self.step):
                        loss = self.train_step(batches)
                except StopIteration:
                    break
                value = float(loss)  # float64 already: the sum's arithmetic is the float64 tensor sum's
                if not math.isfinite(value):
                    raise self._non_finite(value, epoch)
                loss_sum += value
                steps += 1
                self.step += 1
                bar.update()
                self.observer.step_done(self.step, loss)
                _maybe_inject_fault(self.step, self.rank)
                every = self.cfg.checkpoint_every_steps
                if every and self.step % every == 0 and steps < total:
                    self.in_epoch = {"batches_done": steps, "loss_sum": loss_sum}
                    self.checkpointer.save(self.step, self.model, self.optimizer, self._progress(epoch),
                                           keep=self.cfg.checkpoint_keep)
                if self.cfg.eval_every_steps and self.step % self.cfg.eval_every_steps == 0:
                    self.eval_history.append({"step": self.step, "epoch": epoch, "val": self.evaluate("val")})
                    self.observer.log_eval("val", self.eval_history[-1]["val"], self.step)
                    log.info("step %d: val AUC %.4f", self.step, self.eval_history[-1]["val"]["auc"])
        seconds = time.perf_counter() - t0
        self.observer.end_epoch(self.step)
        mean_loss = loss_sum / max(steps, 1)
        rows = (steps - skip) * self.data.train.cfg.batch_size * _world_size()
        stats = {"epoch": epoch + 1, "step": self.step, "train_loss": mean_loss, "train_steps": steps,
                 "train_seconds": seconds, "samples_per_s": rows / seconds if seconds else 0.0}
        if self.comm_counter is not None:  # bytes this rank handed to collectives per training step
            stats["comm_bytes_per_step"] = self.comm_counter.snapshot(steps - skip)
        return stats

    def _non_finite(self, loss: float, epoch: int) -> NonFiniteLossError:
        # rank 0's message is the one on the console: only it rereads checkpoints to name one that verifies
        last = self.checkpointer.latest_verified_here() if self.rank == 0 else self.checkpointer.latest()
        return NonFiniteLossError(
            f"rank {self.rank}: training loss is {loss} at step {self.step + 1} (epoch {epoch + 1}); "
            f"last good checkpoint: {last or 'none'}. Lower optim.lr / optim.embedding_lr or check the input data, "
            f"then rerun with the same --run-dir to resume from that checkpoint")

    def train_step(self, batches: Iterator) -> torch.Tensor:
        loss, _logits, _labels = self.pipeline.progress(batches)
        return loss.detach().double()

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        """AUC, accuracy and log loss of a split over all ranks."""
        logits, labels = self.predict(split)
        return binary_metrics(logits, labels)

    @torch.no_grad()
    def predict(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and labels of a split, all ranks' rows in file order, scored with the model taken out of the
        pipeline (the pipeline's in-flight batches are kept)."""
        data: ParquetBatches = getattr(self.data, split)
        model = self.pipeline.detach()
        was_training = model.training
        model.eval()
        logits, labels = [], []
        limit = self.cfg.limit_eval_batches or len(data)
        for batch in itertools.islice(iter(data), limit):
            _, (_, out, lab) = model(batch.to(self.device))
            logits.append(out.float())
            labels.append(lab.float())
        model.train(was_training)
        self.pipeline.attach(model)
        return gather(torch.cat(logits)).cpu(), gather(torch.cat(labels)).cpu()

    def _progress(self, epoch: int) -> dict[str, Any]:
        """What a restart needs besides the model: ``epoch`` is the first epoch not finished."""
        return {"epoch": epoch, "step": self.step, "history": self.history, "eval_history": self.eval_history,
                "in_epoch": dict(self.in_epoch), "world_size": _world_size()}

    def _log_epoch(self, s: dict[str, Any]) -> None:
        for split in ("val", "test", "ptq_val", "ptq_test"):
            if split in s:
                self.observer.log_eval(split, s[split], s["step"])
        if self.rank != 0:
            return
        v, t = s["val"], s["test"]
        log.info("epoch %d/%d | train loss %.4f | val AUC %.4f acc %.2f%% logloss %.4f | test AUC %.4f acc %.2f%% "
                 "logloss %.4f | %.0f samples/s", s["epoch"], self.cfg.epochs, s["train_loss"], v["auc"],
                 100 * v["accuracy"], v["logloss"], t["auc"], 100 * t["accuracy"], t["logloss"], s["samples_per_s"])


def early_stop(history: list[dict[str, Any]], patience: int) -> str | None:
    """Why training stops now (validation AUC not above its best for ``patience`` epochs), or None to go on."""
    if patience <= 0 or not history:
        return None
    aucs = [s["val"]["auc"] for s in history]
    best = max(range(len(aucs)), key=aucs.__getitem__)  # the first epoch with the best AUC
    if len(aucs) - 1 - best < patience:
        return None
    return (f"validation AUC {aucs[best]:.4f} at epoch {best + 1} has not improved for {len(aucs) - 1 - best} "
            f"epoch(s) (early_stop_epochs={patience}; last {aucs[-1]:.4f})")


@contextlib.contextmanager
def post_training_quantized(model: nn.Module):
    """Evaluate a float-trained model on the integer grid: fake-quant on, per-table scales from the current weights."""
    set_fake_quant(model, True)
    quantizer = embedding_quantizer(model)
    if quantizer is not None:
        quantizer.update_scales()
    try:
        yield
    finally:
        set_fake_quant(model, False)


def _maybe_inject_fault(step: int, rank: int) -> None:
    """Test hook: SIGKILL this worker at ``DQRM_FAULT_KILL_AT_STEP`` on rank ``DQRM_FAULT_KILL_RANK`` (first attempt
    only), to exercise restart and resume the way a lost machine would."""
    at = os.environ.get("DQRM_FAULT_KILL_AT_STEP")
    if at and step == int(at) and rank == int(os.environ.get("DQRM_FAULT_KILL_RANK", "0")) and attempt() == 0:
        log.warning("fault injection: killing rank %d at step %d", rank, step)
        os.kill(os.getpid(), signal.SIGKILL)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

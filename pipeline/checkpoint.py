"""Distributed checkpoints (``torch.distributed.checkpoint``) of model, optimizer and progress, written atomically.

A checkpoint is written under a temporary name and renamed once every rank has finished and rank 0 has written
its ``manifest.json``; a folder without a manifest is never loaded, so a crash mid-write cannot be resumed from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.optim import Optimizer

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify(path: Path) -> str | None:
    """``None`` if every file listed in the manifest is present with its size and checksum, else what is wrong."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"{MANIFEST} unreadable: {e}"
    for name, info in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"file {name} missing"
        if f.stat().st_size != info["bytes"]:
            return f"file {name} has {f.stat().st_size} bytes, expected {info['bytes']} (truncated?)"
        if _sha256(f) != info["sha256"]:
            return f"file {name} checksum mismatch (corrupt or modified)"
    return None


class Checkpointer:
    """Saves ``step_XXXXXXXX`` folders under ``root`` and finds the newest complete one."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step_*") if (p / MANIFEST).is_file())

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def latest_verified_here(self, *, report: bool = False) -> Path | None:
        """``latest_valid`` without the collective (for one rank's error message): the newest checkpoint whose
        files match its manifest; with ``report``, each one skipped is logged with what is wrong with it."""
        for path in reversed(self.complete()):
            problem = verify(path)
            if problem is None:
                return path
            if report:
                log.warning("checkpoint %s is unusable (%s); falling back to the previous one", path, problem)
        return None

    def latest_valid(self) -> Path | None:
        """The newest checkpoint whose files match its manifest; rank 0 decides and every rank gets its choice.
        Each one skipped is reported with what is wrong with it."""
        choice: list[str | None] = [None]
        if _rank() == 0:
            unfinished = sorted(self.root.glob(".tmp_step_*")) if self.root.is_dir() else []
            unfinished += [p for p in sorted(self.root.glob("step_*")) if not (p / MANIFEST).is_file()]
            for path in unfinished:
                log.warning("ignoring %s: a checkpoint write that did not finish (no %s); it is never resumed "
                            "from and can be deleted", path, MANIFEST)
            found = self.latest_verified_here(report=True)
            choice[0] = str(found) if found else None
        if dist.is_available() and dist.is_initialized():
            dist.broadcast_object_list(choice, src=0)
        return Path(choice[0]) if choice[0] else None

    def save(self, step: int, model: nn.Module, optimizer: Optimizer, progress: dict[str, Any]) -> Path:
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp_step_{step:08d}"
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=str(tmp))
        _barrier()
        if _rank() == 0:
            files = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(tmp.iterdir())}
            (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files, "progress": progress}, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            log.info("checkpoint saved: %s", final)
        _barrier()
        return final

    def load(self, path: Path, model: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
        """Load weights and optimizer state in place (resharding as needed); returns the saved progress."""
        manifest = json.loads((path / MANIFEST).read_text())
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        state = {"model": model.state_dict()}
        # Plain SGD has no state tensors, so nothing of it is in the checkpoint (its lr comes from the config).
        has_optim_state = any(k.startswith("optim.") for k in saved)
        if has_optim_state:
            state["optim"] = optimizer.state_dict()
        dcp.load(state, checkpoint_id=str(path))
        model.load_state_dict(state["model"])
        if has_optim_state:
            optimizer.load_state_dict(state["optim"])
        log.info("resumed from %s (step %d)", path, manifest["step"])
        return manifest["progress"]

"""Distributed checkpoints (``torch.distributed.checkpoint``) of model, optimizer and progress: written without a
copy of the tables, after a disk-space check, verified by checksums, never overwritten, pruned to the newest K.

A checkpoint is the folder ``step_XXXXXXXX`` (``step_XXXXXXXX-N`` when that step is written again, e.g. after a
resume from an older checkpoint because this one was damaged): DCP's files (``__R_0.distcp`` from each rank R,
``.metadata`` from rank 0) and ``manifest.json`` (each file's size and SHA-256, and the progress). It is written as
``.tmp_<name>`` and renamed once every rank has written and hashed its files and rank 0 has written the manifest.
A folder without a manifest is never loaded, a final name is never reused and older checkpoints are deleted only
after the new one is in place, so a crash at any moment leaves the newest whole checkpoint under its final name.

A checkpoint that a resume finds damaged gets a ``rejected.json`` (what was wrong, and when): the verdict is kept, so
it is never loaded again, never counts toward the K kept (pruning keeps the K newest good ones, not the damaged one
in their place) and is never re-hashed; it is left in place for the operator to inspect or delete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from dqrm.pipeline.dcp_reader import BoundedFileSystemReader
from dqrm.pipeline.optim_state import (OptimizerStateMismatch, agreed, check_nothing_left_behind, init_lazy_state,
                                       loadable, plan_row_state_carry, read_carried, stateful)

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
REJECTED = "rejected.json"
DCP_METADATA = ".metadata"
_NAME = re.compile(r"step_(\d+)(?:-(\d+))?")
# A checkpoint is a little larger than its tensors (file headers, DCP's metadata); keep this much spare besides.
_HEADROOM = 1.05


class NotEnoughDiskSpace(OSError):
    """The checkpoint would not fit in the free space where it is written."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def _all_gather(obj: Any) -> list[Any]:
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    box = [obj]
    if _distributed():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _describe(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {n: {"bytes": (folder / n).stat().st_size, "sha256": _sha256(folder / n)} for n in names}


def _order(path: Path) -> tuple[int, int] | None:
    """Sort key of a checkpoint folder name: (step, how many times that step was written), or None if not one."""
    m = _NAME.fullmatch(path.name)
    return (int(m.group(1)), int(m.group(2) or 1)) if m else None


def _manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest's content without its own ``sha256`` (canonical JSON): the progress it holds (step,
    epoch position, running loss) is restored as it is, so a damaged value must not pass for a good one. (Manifests
    written before this was added have no ``sha256``; their files are still checked.)"""
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def verify(path: Path, names: list[str] | None = None) -> str | None:
    """``None`` if the files ``names`` (default: all) listed in the manifest are present with their size and
    checksum, else what is wrong."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return f"{MANIFEST} missing"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} unreadable: {e!r}"
    if manifest.get("sha256", _manifest_digest(manifest)) != _manifest_digest(manifest):
        return f"{MANIFEST} checksum mismatch (its progress or file list was modified or is corrupt)"
    for name in files if names is None else names:
        f, info = path / name, files[name]
        if not f.is_file():
            return f"file {name} missing"
        if f.stat().st_size != info["bytes"]:
            return f"file {name} has {f.stat().st_size} bytes, expected {info['bytes']} (truncated?)"
        if _sha256(f) != info["sha256"]:
            return f"file {name} checksum mismatch (corrupt or modified)"
    return None


def share(files: dict[str, dict[str, Any]], rank: int, world_size: int) -> list[str]:
    """The files ``rank`` checks: each file goes, largest first, to the rank with the fewest bytes so far, so the
    ranks read about equal amounts (the same split on every rank, as every rank reads the same manifest)."""
    load = [0] * world_size
    mine = []
    for name in sorted(files, key=lambda n: (-files[n]["bytes"], n)):
        r = load.index(min(load))
        load[r] += files[name]["bytes"]
        if r == rank:
            mine.append(name)
    return mine


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor whose storage is exactly its bytes, sharing its memory (no copy).

    A fused TBE's per-table weights (what a sharded EmbeddingBagCollection's state dict holds) are views into one
    flat buffer. DCP's file writer (``filesystem._SerialCpuLoader``) clones every tensor whose storage is larger than
    the tensor, so that ``torch.save`` does not write the whole buffer, and keeps each clone until the rank's file
    is complete: a save would double the memory of the tables. A tensor over the same memory with a storage of its
    own size is written as it is."""
    if t.device.type != "cpu" or not t.is_contiguous() or t.untyped_storage().nbytes() == t.nbytes or not t.numel():
        return t  # no larger buffer behind it, empty, or a copy is needed anyway (not contiguous, not on the CPU)
    raw = t.detach().reshape(-1).view(torch.uint8).numpy()  # numpy's view of the same memory
    return torch.from_numpy(raw).view(t.dtype).view(t.shape)


class InPlaceSavePlanner(DefaultSavePlanner):
    """DCP's default save plan, with every CPU tensor handed to the writer as ``_own_storage`` of itself: a save
    then writes the tables from where they are and adds no copy of them to the rank's memory."""

    def resolve_data(self, write_item):
        data = super().resolve_data(write_item)
        return _own_storage(data) if isinstance(data, torch.Tensor) else data


def tensor_bytes(state: Any) -> tuple[int, int]:
    """Bytes of the tensors in a (nested) state dict on this rank: (sharded, replicated). DCP writes each rank's
    shards (ShardedTensor, DTensor) and one copy of the plain tensors, which every rank holds."""
    if isinstance(state, dict):
        state = list(state.values())
    if isinstance(state, (list, tuple)):
        parts = [tensor_bytes(v) for v in state]
        return sum(p[0] for p in parts), sum(p[1] for p in parts)
    if isinstance(state, DTensor):
        return state.to_local().nbytes, 0
    if hasattr(state, "local_shards"):  # ShardedTensor
        return sum(s.tensor.nbytes for s in state.local_shards()), 0
    if isinstance(state, torch.Tensor):
        return 0, state.nbytes
    return 0, 0


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.3g} MB"


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk_space(root: Path, state: dict[str, Any], *, keep: int) -> int:
    """Raise ``NotEnoughDiskSpace`` on every rank unless the checkpoint of ``state`` fits in the free space of
    ``root`` as each rank sees it; returns the bytes it needs. Collective."""
    sharded, replicated = tensor_bytes(state)
    total = replicated + sum(_all_gather(sharded))
    needed = int(total * _HEADROOM)
    where = _existing(root)
    free = shutil.disk_usage(where).free
    short = [(r, f, w) for r, (f, w) in enumerate(_all_gather((free, str(where)))) if f < needed]
    if short:
        rank, free, where = short[0]
        on = f" (as rank {rank} sees it)" if _world_size() > 1 else ""
        raise NotEnoughDiskSpace(
            f"not enough disk space for a checkpoint in {root}: it needs about {_size(needed)} (the model's and "
            f"optimizer's tensors on all ranks, {_size(total)}, plus {_HEADROOM - 1:.0%}) but {where} has "
            f"{_size(free)} free{on}. Free space there (of the checkpoints in {root}, the newest is all a resume "
            f"needs, and those holding {REJECTED} are damaged), point --run-dir at a bigger disk, or lower checkpoint_keep (now {keep}): a run needs room for "
            f"checkpoint_keep + 1 = {keep + 1} checkpoints, as a new one is written before the oldest is deleted")
    return needed


_PROBE_BYTES = 1 << 20


def _refused_write(e: BaseException, where: Path) -> OSError | None:
    """The file system's refusal behind a failed DCP save (a full disk, a read-only folder) as an ``OSError`` naming
    the file, else ``None``. DCP gathers the ranks' failures into a ``CheckpointException`` (a ``BaseException``) on
    every rank, and ``torch.save`` reports a full disk as a ``RuntimeError`` ("unexpected pos"): so where the failure
    is no ``OSError`` itself, a probe write of 1 MiB into ``where`` says whether the disk refuses writes."""
    if isinstance(e, (KeyboardInterrupt, SystemExit)):
        return None
    failures = e.failures.values() if isinstance(e, CheckpointException) else [(e, None)]
    for exc, _ in failures:
        if isinstance(exc, OSError):
            return OSError(exc.errno, exc.strerror, exc.filename or str(where))
    probe = where / f".probe_rank{_rank()}"
    try:
        with open(probe, "wb") as f:
            f.write(bytes(_PROBE_BYTES))
            f.flush()
            os.fsync(f.fileno())
    except OSError as refused:
        return OSError(refused.errno, refused.strerror, str(where))
    finally:
        probe.unlink(missing_ok=True)
    return None


def _barrier_quietly() -> None:
    """A barrier that does not raise: used on the way out of a failed save, where a peer may already be gone."""
    try:
        _barrier()
    except Exception:  # noqa: BLE001 - the save's own failure is what is reported
        pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    """Saves ``step_XXXXXXXX`` folders under ``root``, keeps the newest K and finds the newest complete one."""

    def __init__(self, root: Path, *, timed=None, extra: dict[str, Any] | None = None) -> None:
        """``timed(name)``: a context manager around each save (e.g. ``pipeline.phases.PhaseLog``). ``extra``:
        more training state saved and restored with the model, each an object with ``state_dict()`` (tensors under
        keys unique to the rank where they are the rank's own) and ``load_state_dict()``, which receives every saved
        rank's entries under the object's name (so that it can carry them over to another world size)."""
        self.root = Path(root)
        self.timed = timed or (lambda name: contextlib.nullcontext())
        self.extra = dict(extra or {})

    def complete(self) -> list[Path]:
        """Checkpoints with a manifest that no resume has rejected, oldest first."""
        if not self.root.is_dir():
            return []
        done = [p for p in self.root.glob("step_*")
                if _order(p) and (p / MANIFEST).is_file() and not (p / REJECTED).exists()]
        return sorted(done, key=_order)

    def rejected(self) -> list[Path]:
        """Checkpoints a resume found damaged (``rejected.json``), oldest first."""
        found = [p for p in self.root.glob("step_*") if _order(p) and (p / REJECTED).exists()] \
            if self.root.is_dir() else []
        return sorted(found, key=_order)

    @staticmethod
    def _reject(path: Path, problem: str) -> None:
        """Remember that ``path`` is damaged, so that it is neither loaded nor kept in place of a good one."""
        try:
            with open(path / REJECTED, "w") as f:
                f.write(json.dumps({"problem": problem, "rejected_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            # Not remembered: the next resume checks it again and pruning still counts it; say so.
            log.warning("could not mark %s as rejected (%s): it will be checked again at the next resume and may "
                        "count toward checkpoint_keep; delete it or make the folder writable", path, e)
            return
        log.warning("checkpoint %s is marked rejected (%s): it is never resumed from and does not count toward "
                    "checkpoint_keep; it is left in place for you to inspect or delete", path, path / REJECTED)

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
        """The newest checkpoint whose files match its manifest, the same on every rank; each rank checks a share
        of the files and every rank combines the verdicts. Each one skipped is reported with what is wrong."""
        candidates = None
        if _rank() == 0:
            unfinished = sorted(self.root.glob(".tmp_*")) if self.root.is_dir() else []
            unfinished += [p for p in sorted(self.root.glob("step_*")) if not (p / MANIFEST).is_file()]
            for path in unfinished:
                log.warning("ignoring %s: a checkpoint write that did not finish (no %s); it is never resumed "
                            "from and can be deleted", path, MANIFEST)
            candidates = [str(p) for p in reversed(self.complete())]
        for path in map(Path, _broadcast(candidates)):
            problem = self._verify_together(path)
            if problem is None:
                return path
            if _rank() == 0:
                log.warning("checkpoint %s is unusable (%s); falling back to the previous one", path, problem)
                self._reject(path, problem)
        return None

    def _verify_together(self, path: Path) -> str | None:
        """``verify`` with the files split among the ranks; the first problem found, the same on every rank."""
        try:
            mine = share(json.loads((path / MANIFEST).read_text())["files"], _rank(), _world_size())
        except (OSError, ValueError, KeyError, TypeError):
            mine = []  # verify says what is wrong with the manifest
        problem = verify(path, mine)
        for rank, found in enumerate(_all_gather(problem)):
            if found is not None:
                if _world_size() == 1:
                    return found
                hint = "; every rank must see the same checkpoint folder" if "missing" in found else ""
                return f"{found}, checked on rank {rank}{hint}"
        return None

    def save(self, step: int, model: nn.Module, optimizer: Optimizer, progress: dict[str, Any], *,
             keep: int = 2) -> Path:
        """Write a checkpoint of ``step``, then delete all but the newest ``keep`` complete ones up to it.
        Collective."""
        with self.timed("checkpoint_save"):
            return self._save(step, model, optimizer, progress, keep=keep)

    def _save(self, step: int, model: nn.Module, optimizer: Optimizer, progress: dict[str, Any], *,
              keep: int) -> Path:
        if keep < 1:
            raise ValueError(f"keep must be at least 1 (the checkpoint just written), got {keep}")
        state = {"model": model.state_dict(), "optim": optimizer.state_dict(),
                 **{name: obj.state_dict() for name, obj in self.extra.items()}}
        check_disk_space(self.root, state, keep=keep)
        final = self.root / _broadcast(self._unused_name(step) if _rank() == 0 else None)
        tmp = final.with_name(f".tmp_{final.name}")
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        try:
            dcp.save(state, checkpoint_id=str(tmp), planner=InPlaceSavePlanner())
        except BaseException as e:
            refused = _refused_write(e, tmp)  # before the partial folder is deleted, which frees its space
            _barrier_quietly()
            if _rank() == 0:  # every rank has stopped writing: DCP gathers the ranks' outcomes before raising
                shutil.rmtree(tmp, ignore_errors=True)
            if refused is not None:
                raise refused from None
            raise
        # Each rank hashes the files it wrote (DCP names them __RANK_N.distcp); rank 0 also DCP's metadata.
        mine = sorted(p.name for p in tmp.glob(f"__{_rank()}_*.distcp"))
        if _rank() == 0:
            mine.append(DCP_METADATA)
        hashed = _all_gather(_describe(tmp, mine))
        files = {name: info for part in hashed for name, info in part.items()}
        unseen = _broadcast([name for name in files if not (tmp / name).is_file()] if _rank() == 0 else None)
        if unseen:
            raise FileNotFoundError(
                f"rank 0 does not see {', '.join(unseen)} in {tmp}, written there by other ranks: checkpoints need "
                f"a folder that every rank sees (a shared filesystem for a multi-node job; node-local disks work "
                f"only when all ranks are on one node). Point --run-dir at storage all nodes mount")
        if _rank() == 0:
            unclaimed = sorted(p.name for p in tmp.iterdir() if p.name not in files)  # should DCP's naming change
            files.update(_describe(tmp, unclaimed))
            self._write_manifest(tmp, {"step": step, "files": dict(sorted(files.items())), "progress": progress})
            tmp.rename(final)
            _fsync_dir(self.root)
            log.info("checkpoint saved: %s", final)
            self.prune(keep, final)
        _barrier()
        return final

    def _unused_name(self, step: int) -> str:
        name, n = f"step_{step:08d}", 1
        while (self.root / name).exists():
            n += 1
            name = f"step_{step:08d}-{n}"
        return name

    @staticmethod
    def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
        with open(folder / MANIFEST, "w") as f:
            f.write(json.dumps({**manifest, "sha256": _manifest_digest(manifest)}, indent=2))
            f.flush()
            os.fsync(f.fileno())

    def prune(self, keep: int, newest: Path) -> None:
        """Delete complete checkpoints older than ``newest`` but the ``keep - 1`` newest of them. Rejected ones are
        not complete: they neither count nor are deleted. Newer ones (a run resumed from before them, as they did not
        verify) are left for the operator."""
        older = [p for p in self.complete() if _order(p) < _order(newest)]
        for path in older[:max(len(older) - (keep - 1), 0)]:
            doomed = path.with_name(f".deleting_{path.name}")  # renamed first: a half-deleted one is never loaded
            path.rename(doomed)
            shutil.rmtree(doomed)
            log.info("deleted checkpoint %s (checkpoint_keep=%d)", path, keep)
        for leftover in self.root.glob(".deleting_*"):  # a deletion interrupted before
            shutil.rmtree(leftover, ignore_errors=True)

    def load(self, path: Path, model: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
        """Load weights and optimizer state in place (resharding as needed); returns the saved progress."""
        manifest = json.loads((path / MANIFEST).read_text())
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        state = {"model": model.state_dict()}
        # Plain SGD has no state tensors, so nothing of it is in the checkpoint (its lr comes from the config).
        has_optim_state = any(k.startswith("optim.") for k in saved)
        if not has_optim_state and stateful(optimizer):
            raise OptimizerStateMismatch(f"{path}: the checkpoint has no optimizer state (it was written with plain "
                                         f"SGD) but this job's optimizer keeps some; resume with optim.embedding=sgd "
                                         f"optim.dense=sgd, or start a new run dir")
        carry: dict[str, dict] = {}
        if has_optim_state:
            init_lazy_state(optimizer)
            optim_state = optimizer.state_dict()
            carry = agreed(plan_row_state_carry, saved, optim_state, path)
            agreed(check_nothing_left_behind, saved, optim_state, carry, path)
            state["optim"] = loadable(optim_state, carry)
        extra = {}
        for name in self.extra:
            # Every rank reads every rank's entries: its object takes its own or, at another world size, carries
            # them over (e.g. INT8 error-feedback residuals).
            entries = {k[len(name) + 1:]: torch.empty(md.size, dtype=md.properties.dtype)
                       for k, md in saved.items() if k.startswith(f"{name}.")}
            if entries:
                extra[name] = entries
            elif _rank() == 0:  # e.g. a checkpoint from before this state was saved
                log.warning("%s has no %s state; it starts afresh", path, name)
        state.update(extra)
        reader = BoundedFileSystemReader(str(path))  # tables read into place, not through a second copy
        dcp.load(state, storage_reader=reader)
        for name, loaded in extra.items():
            self.extra[name].load_state_dict(loaded)
        self.last_load_streamed = reader.streamed_items
        model.load_state_dict(state["model"])
        if has_optim_state:
            read_carried(path, carry, optim_state, manifest["step"])
            optimizer.load_state_dict(optim_state)
        log.info("resumed from %s (step %d)", path, manifest["step"])
        return manifest["progress"]

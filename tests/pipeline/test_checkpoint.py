"""Checkpoints: a checkpoint written at one world size loads at another (DCP reshards) bit for bit, whatever the two
plans; a save adds no copy of the tables to a rank's memory; each rank hashes the files it wrote and verifies a share
on resume; a save that would not fit stops first; old checkpoints are pruned and a new one never replaces one in
place."""

from __future__ import annotations

import dataclasses
import errno
import gc
import os
import subprocess
import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

import dqrm.pipeline.checkpoint as checkpoint_module
from dqrm.pipeline.checkpoint import (MANIFEST, REJECTED, Checkpointer, InPlaceSavePlanner, NotEnoughDiskSpace, share,
                                      tensor_bytes, verify)
from dqrm.pipeline.config import JobConfig, OptimConfig
from dqrm.pipeline.model import build_dlrm
from dqrm.pipeline.phases import reset_peak, status_bytes
from dqrm.pipeline.optimizer import build_optimizer, fuse_embedding_optimizer
from dqrm.quant.convert import gather_full_state
from dqrm.sharding.plan import manual_plan, shard_model
from tests.dist_utils import run_distributed
from tests.helpers import CARDS, MODEL, batches, mixed_placements, sharded_model, tiny_data, train_steps


def _save_after_training(rank, world_size, data_dir, root):
    model, _ = sharded_model(world_size, mixed_placements(world_size, with_column_wise=world_size == 2))
    optimizer = build_optimizer(model, OptimConfig(lr=0.5, embedding_lr=5.0))
    train_steps(model, optimizer, batches(data_dir / "train.parquet", 64, rank=rank, world_size=world_size, limit=3))
    Checkpointer(Path(root)).save(3, model, optimizer, {"epoch": 0})
    return gather_full_state(model)


def _load(rank, world_size, root):
    model, _ = sharded_model(world_size, mixed_placements(world_size, with_column_wise=world_size == 2))
    optimizer = build_optimizer(model, OptimConfig())
    fresh = gather_full_state(model)
    checkpointer = Checkpointer(Path(root))
    progress = checkpointer.load(checkpointer.latest_valid(), model, optimizer)
    return {"fresh": fresh, "loaded": gather_full_state(model), "progress": progress,
            "streamed": checkpointer.last_load_streamed}


@pytest.mark.parametrize("saved_at, loaded_at", [(2, 1), (1, 2)])
def test_weights_come_back_bit_for_bit_at_another_world_size(saved_at, loaded_at, tmp_path):
    data_dir = tiny_data(tmp_path / "data")
    saved = run_distributed(_save_after_training, data_dir, str(tmp_path / "ckpt"), world_size=saved_at)[0]
    out = run_distributed(_load, str(tmp_path / "ckpt"), world_size=loaded_at)[0]
    assert out["progress"] == {"epoch": 0}
    assert out["streamed"] >= 20  # the tables went the bounded way (read into place), not through DCP's copy
    assert saved.keys() == out["loaded"].keys()
    changed = 0
    for key, value in saved.items():
        assert torch.equal(out["loaded"][key], value), key
        changed += not torch.equal(out["fresh"][key], value)
    assert changed >= len(saved) - 2  # training moved (nearly) every weight, so equality means it was loaded


# ---- memory: a save writes the tables from where they are -------------------------------------------------------
# DCP without a process group says it saves in one process, which is the point here.
one_process = pytest.mark.filterwarnings("ignore:torch.distributed is disabled, unavailable or uninitialized")
needs_peak_rss = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                                    reason="peak RSS is read and reset through Linux's /proc/self")


def _save_peak(state: dict, path: Path, planner) -> int:
    """How far a DCP save of ``state`` raised this process's peak RSS, in bytes."""
    gc.collect()
    reset_peak()
    before = status_bytes("VmHWM")
    dcp.save(state, checkpoint_id=str(path), planner=planner)
    return status_bytes("VmHWM") - before


@needs_peak_rss
@one_process
def test_views_of_one_buffer_are_saved_without_a_copy(tmp_path):
    # What a fused TBE's state dict holds: per-table views into one flat buffer (here 4 x 32 MiB of 128 MiB).
    flat = torch.randn(2 ** 25)
    state = {f"t{i}": flat[i * 2 ** 23:(i + 1) * 2 ** 23].view(-1, 64) for i in range(4)}
    dcp_alone = _save_peak(state, tmp_path / "default", None)
    ours = _save_peak(state, tmp_path / "ours", InPlaceSavePlanner())
    assert dcp_alone > 0.75 * flat.nbytes  # the control: DCP by itself copies every view
    assert ours < 0.1 * flat.nbytes, f"the save added {ours / 2 ** 20:.0f} MiB to {flat.nbytes / 2 ** 20:.0f} MiB"
    loaded = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(loaded, checkpoint_id=str(tmp_path / "ours"))
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


# ---- world size 2: bounded memory, per-rank checksums, shared verification, one verdict -------------------------
BIG = (7, 10)  # table-wise on rank 1 and rank 0 in mixed_placements: 2^20 rows x 16 each, 64 MiB per rank


def _big_model(world_size):
    cards = tuple(2 ** 20 if i in BIG else c for i, c in enumerate(CARDS))
    model = build_dlrm(dataclasses.replace(MODEL, num_embeddings=cards), torch.device("cpu"))
    fuse_embedding_optimizer(model.model.sparse_arch.parameters(), OptimConfig())
    plan = manual_plan(model, mixed_placements(world_size, with_column_wise=True), world_size=world_size,
                       device=torch.device("cpu"))
    model = shard_model(model, plan, torch.device("cpu"))
    return model, build_optimizer(model, OptimConfig())


def _save_verify_and_refuse(rank, world_size, root):
    root = Path(root)
    model, optimizer = _big_model(world_size)
    checkpointer = Checkpointer(root)
    hashed: list[str] = []
    real_sha256 = checkpoint_module._sha256

    def recording_sha256(path):
        hashed.append(Path(path).name)
        return real_sha256(path)

    checkpoint_module._sha256 = recording_sha256
    out = {}
    checkpointer.save(1, model, optimizer, {"epoch": 0})  # warms up every code path of a save
    local_table_bytes = tensor_bytes(model.state_dict())[0]
    gc.collect()
    dist.barrier()
    reset_peak()
    before = status_bytes("VmHWM")
    hashed.clear()
    second = checkpointer.save(2, model, optimizer, {"epoch": 1})
    out["save_added"], out["local_table_bytes"] = status_bytes("VmHWM") - before, local_table_bytes
    out["hashed_on_save"] = sorted(hashed)
    hashed.clear()
    out["latest"] = str(checkpointer.latest_valid())
    out["hashed_on_verify"] = sorted(hashed)

    # A file that rank 1 checks is damaged: every rank falls back to step 1, rank 0 names the file and the rank.
    files = json.loads((second / MANIFEST).read_text())["files"]
    victim = share(files, 1, world_size)[0]
    if rank == 0:
        raw = bytearray((second / victim).read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        (second / victim).write_bytes(bytes(raw))
    dist.barrier()
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("dqrm.pipeline.checkpoint").addHandler(handler)
    out["after_damage"] = str(checkpointer.latest_valid())
    out["victim"], out["messages"] = victim, messages

    # Only rank 1 lacks space: both ranks refuse (none is left waiting in the save's collectives).
    real_disk_usage, real_describe = shutil.disk_usage, checkpoint_module._describe
    if rank == 1:
        shutil.disk_usage = lambda path: SimpleNamespace(total=10 ** 12, used=10 ** 12 - 10 ** 6, free=10 ** 6)
    try:
        checkpointer.save(3, model, optimizer, {"epoch": 2})
    except NotEnoughDiskSpace as e:
        out["refused"] = str(e)
    dist.barrier()
    out["folders"] = sorted(p.name for p in root.iterdir())
    shutil.disk_usage = real_disk_usage

    # Rank 1's disk is not rank 0's (node-local disks on two nodes): rank 1's file is elsewhere once written.
    def written_elsewhere(folder, names):
        described = real_describe(folder, names)
        for name in names:
            (folder / name).rename(root / f"elsewhere_{name}")
        return described

    if rank == 1:
        checkpoint_module._describe = written_elsewhere
    try:
        checkpointer.save(4, model, optimizer, {"epoch": 3})
    except FileNotFoundError as e:
        out["not_shared"] = str(e)
    return out


@needs_peak_rss
def test_world_size_2_save_adds_no_copy_ranks_share_checksums_and_refuse_together(tmp_path):
    root = tmp_path / "ckpt"
    out = run_distributed(_save_verify_and_refuse, str(root), world_size=2)
    files = json.loads((root / "step_00000002" / MANIFEST).read_text())["files"]
    # every file DCP wrote is in the manifest; the damage found on resume is remembered beside them
    assert set(files) == {p.name for p in (root / "step_00000002").iterdir()} - {MANIFEST, REJECTED}
    assert "checksum mismatch" in json.loads((root / "step_00000002" / REJECTED).read_text())["problem"]
    for rank, o in enumerate(out):
        # memory: each rank holds 64 MiB of one big table (plus small ones); a save that copied them adds as much
        assert o["local_table_bytes"] > 64 * 2 ** 20
        assert o["save_added"] < o["local_table_bytes"] / 8, (rank, o["save_added"] / 2 ** 20)
        # on save, each rank hashed exactly the files it wrote (rank 0 also DCP's metadata)
        assert o["hashed_on_save"] == sorted([f"__{rank}_0.distcp"] + ([".metadata"] if rank == 0 else []))
        assert o["latest"] == str(root / "step_00000002")
        # the one-rank message of test_bad_input, here with the rank that found it
        assert o["after_damage"] == str(root / "step_00000001")
        assert "not enough disk space" in o["refused"] and "as rank 1 sees it" in o["refused"]
        assert o["folders"] == ["step_00000001", "step_00000002"]  # refused before anything was written
        assert "rank 0 does not see __1_0.distcp" in o["not_shared"] and "shared filesystem" in o["not_shared"]
    assert not (root / "step_00000004").exists()
    # on resume, the ranks verified disjoint shares that together cover every file
    shares = [set(o["hashed_on_verify"]) for o in out]
    assert shares[0] and shares[1] and not shares[0] & shares[1] and shares[0] | shares[1] == set(files)
    assert any(f"step_00000002 is unusable (file {out[1]['victim']} checksum mismatch" in m and "rank 1" in m
               for m in out[0]["messages"]), out[0]["messages"]


# ---- one process: pruning, no replacement in place, the disk-space check ---------------------------------------
def _small():
    """A model and an optimizer with state (momentum), both in the checkpoint."""
    torch.manual_seed(0)
    model = nn.Linear(64, 64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 64)).square().sum().backward()
    optimizer.step()
    return model, optimizer


def _names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def _die_at_the_final_rename(monkeypatch) -> None:
    """The process is killed when a written checkpoint is about to be renamed to its final name."""
    real_rename = Path.rename

    def rename(self, target):
        if self.name.startswith(".tmp_"):
            raise KeyboardInterrupt("killed")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)


@one_process
def test_only_the_newest_k_complete_checkpoints_are_kept(tmp_path):
    model, optimizer = _small()
    checkpointer = Checkpointer(tmp_path)
    for step in range(1, 5):
        checkpointer.save(step, model, optimizer, {"step": step}, keep=2)
    assert _names(tmp_path) == ["step_00000003", "step_00000004"]
    checkpointer.save(5, model, optimizer, {"step": 5}, keep=1)
    assert _names(tmp_path) == ["step_00000005"]
    assert verify(tmp_path / "step_00000005") is None
    with pytest.raises(ValueError, match="checkpoint_keep must be at least 1"):
        JobConfig(checkpoint_keep=0)


@one_process
def test_resumed_checkpoint_survives_until_a_newer_one_is_complete(tmp_path, monkeypatch):
    model, optimizer = _small()
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(10, model, optimizer, {"step": 10}, keep=1)
    # A newer checkpoint that does not verify: resume falls back to step 10 and never deletes the damaged one.
    damaged = tmp_path / "step_00000020"
    shutil.copytree(tmp_path / "step_00000010", damaged)
    victim = next(damaged.glob("*.distcp"))
    victim.write_bytes(victim.read_bytes()[:10])
    resumed = checkpointer.latest_valid()
    assert resumed == tmp_path / "step_00000010"
    # The next save dies at its last moment -> the checkpoint resumed from is still there, whatever checkpoint_keep.
    _die_at_the_final_rename(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save(15, model, optimizer, {"step": 15}, keep=1)
    monkeypatch.undo()
    assert _names(tmp_path) == [".tmp_step_00000015", "step_00000010", "step_00000020"]
    assert verify(resumed) is None
    # Once step 15 is complete, keep=1 deletes step 10; the damaged newer one is left for the operator.
    checkpointer.save(15, model, optimizer, {"step": 15}, keep=1)
    assert _names(tmp_path) == ["step_00000015", "step_00000020"]
    assert checkpointer.latest_valid() == tmp_path / "step_00000015"


@one_process
def test_a_rejected_checkpoint_never_counts_toward_the_k_kept(tmp_path, caplog):
    """The sequence of issue 29: step 100 and 200 exist, 200 fails its checksum, the job resumes from 100, saves 150
    and later 200 again. With keep=2 the two newest good ones (150 and 200-2) stay; the damaged one stays too (left
    for the operator, marked, never re-hashed), and step 100 is the one pruned."""
    model, optimizer = _small()
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(100, model, optimizer, {"step": 100}, keep=2)
    damaged = checkpointer.save(200, model, optimizer, {"step": 200}, keep=2)
    victim = next(damaged.glob("*.distcp"))
    victim.write_bytes(b"\xff" + victim.read_bytes()[1:])  # same size, one byte flipped
    with caplog.at_level(logging.WARNING, logger="dqrm.pipeline.checkpoint"):
        assert checkpointer.latest_valid() == tmp_path / "step_00000100"
    assert "checksum mismatch" in json.loads((damaged / REJECTED).read_text())["problem"]
    assert "marked rejected" in caplog.text and "does not count toward checkpoint_keep" in caplog.text
    assert checkpointer.complete() == [tmp_path / "step_00000100"]
    assert checkpointer.rejected() == [damaged]
    checkpointer.save(150, model, optimizer, {"step": 150}, keep=2)
    again = checkpointer.save(200, model, optimizer, {"step": 200}, keep=2)
    assert again.name == "step_00000200-2"
    assert _names(tmp_path) == ["step_00000150", "step_00000200", "step_00000200-2"]
    assert [p.name for p in checkpointer.complete()] == ["step_00000150", "step_00000200-2"]
    assert all(verify(p) is None for p in checkpointer.complete())
    # The verdict is remembered: the next resume does not hash the damaged one again (it is not a candidate).
    assert checkpointer.latest_valid() == again


@one_process
def test_a_manifest_whose_progress_was_changed_is_rejected(tmp_path):
    """The manifest's progress (step, position in the epoch, running loss) is restored as it is: one changed digit
    that leaves valid JSON must not pass (found by bench.faults: a flipped bit in the running loss resumed with it)."""
    model, optimizer = _small()
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(1, model, optimizer, {"loss_sum": 0.5329361772785585}, keep=2)
    newest = checkpointer.save(2, model, optimizer, {"loss_sum": 0.5329361772785585}, keep=2)
    text = (newest / MANIFEST).read_text()
    assert verify(newest) is None and "0.5329361772785585" in text
    (newest / MANIFEST).write_text(text.replace("0.5329361772785585", "0.5329361772785584"))
    assert "manifest.json checksum mismatch" in verify(newest)
    assert checkpointer.latest_valid() == tmp_path / "step_00000001"
    assert checkpointer.rejected() == [newest]


@one_process
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_disk_that_fills_during_the_save_stops_with_an_os_error_naming_the_file(tmp_path, monkeypatch):
    """The space check passes (the disk fills up meanwhile, here: the check is told so), DCP's writers hit ENOSPC:
    the save raises the OSError (DCP wraps it in a CheckpointException, a BaseException the job's one-line error
    would miss; found by bench.faults), leaves no partial folder, and the checkpoint before it stays whole."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=True)
    try:
        small, small_opt = _small()
        checkpointer = Checkpointer(disk)
        first = checkpointer.save(1, small, small_opt, {"step": 1}, keep=2)
        big = nn.Linear(1024, 1024)  # 4 MB: more than the disk holds
        big_opt = torch.optim.SGD(big.parameters(), lr=0.1)
        monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=2 ** 40, used=0, free=2 ** 40))
        with pytest.raises(OSError) as e:
            checkpointer.save(2, big, big_opt, {"step": 2}, keep=2)
        assert e.value.errno == errno.ENOSPC and str(disk) in str(e.value.filename), e.value
        assert _names(disk) == ["step_00000001"] and verify(first) is None
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@one_process
def test_writing_a_step_again_never_removes_the_old_checkpoint_first(tmp_path, monkeypatch):
    model, optimizer = _small()
    checkpointer = Checkpointer(tmp_path)
    first = checkpointer.save(7, model, optimizer, {"version": 1}, keep=2)
    with torch.no_grad():
        model.weight.add_(1.0)
    # The machine dies just as the new checkpoint is renamed into place: the old one must still be whole.
    _die_at_the_final_rename(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save(7, model, optimizer, {"version": 2}, keep=2)
    monkeypatch.undo()
    assert checkpointer.latest_valid() == first
    # Written again, the step gets a new name; the newest is the one loaded.
    second = checkpointer.save(7, model, optimizer, {"version": 2}, keep=2)
    assert second.name == "step_00000007-2" and checkpointer.latest_valid() == second
    fresh, fresh_optimizer = _small()
    assert checkpointer.load(second, fresh, fresh_optimizer) == {"version": 2}
    assert torch.equal(fresh.weight, model.weight)
    checkpointer.save(8, model, optimizer, {"version": 3}, keep=2)
    assert _names(tmp_path) == ["step_00000007-2", "step_00000008"]


@one_process
def test_a_save_that_would_not_fit_stops_first_and_says_what_to_do(tmp_path, monkeypatch):
    model, optimizer = _small()
    checkpointer = Checkpointer(tmp_path / "run" / "checkpoints")  # not created yet: the check looks at its disk
    needed = 1.05 * 2 * sum(t.nbytes for t in model.state_dict().values())  # weights and their momentum
    seen = []

    def small_disk(path):
        seen.append(Path(path))
        return SimpleNamespace(total=10 ** 9, used=10 ** 9 - int(needed * 0.9), free=int(needed * 0.9))

    monkeypatch.setattr(shutil, "disk_usage", small_disk)
    with pytest.raises(NotEnoughDiskSpace) as e:
        checkpointer.save(1, model, optimizer, {}, keep=3)
    message = str(e.value)
    assert seen == [tmp_path] and not (tmp_path / "run").exists()
    assert f"needs about {needed / 1e6:.3g} MB" in message and f"{str(tmp_path)} has" in message
    assert "--run-dir" in message and "checkpoint_keep (now 3)" in message and "4 checkpoints" in message
    # With room for the estimate it saves.
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10 ** 9, used=0, free=int(needed)))
    checkpointer.save(1, model, optimizer, {}, keep=3)


@needs_peak_rss
@one_process
def test_a_load_reads_the_tables_into_place(tmp_path):
    """DCP's reader deserializes each tensor whole and then copies it into the model, so a resume briefly holds a
    second copy of the largest table; the bounded reader adds next to nothing and loads the same bits. (Column
    slices, which resharding to column-wise shards reads, are checked by the world-size tests above.)"""
    from dqrm.pipeline.dcp_reader import BoundedFileSystemReader

    tables = {f"t{i}": torch.randn(1 << 18, 64) for i in range(4)}  # 4 x 64 MiB
    dcp.save(tables, checkpoint_id=str(tmp_path))
    added = {}
    for name in ("dcp", "bounded"):
        dest = {k: torch.zeros_like(v) for k, v in tables.items()}
        gc.collect()
        reset_peak()
        before = status_bytes("VmHWM")
        reader = BoundedFileSystemReader(str(tmp_path)) if name == "bounded" else None
        dcp.load(dest, checkpoint_id=str(tmp_path), storage_reader=reader)
        added[name] = status_bytes("VmHWM") - before
        assert all(torch.equal(dest[k], v) for k, v in tables.items())
    assert added["dcp"] >= 60 << 20  # at least one table's copy
    assert added["bounded"] < 8 << 20, added

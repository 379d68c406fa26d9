"""The campaign's machinery: launching a job through ``pipeline.launch``, finding its ranks, waiting for a random
point inside a phase, striking (signals, a full or read-only file system, damaged files), and cleaning up after
itself (every process it started, every mount it made) however a fault ends."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.faults.catalog import Damage, Fault, FillDisk, Kill, Phase, ReadOnly, SmallDisk

ROOT = Path(__file__).resolve().parents[2]
POLL = 0.002  # seconds between looks at the run dir while waiting for a point


# ---- processes ----

def _cmdline(pid: str) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def processes_of(run_dir: Path) -> list[int]:
    """Every process whose command line names ``run_dir`` (the launcher, torchx, torchrun, the ranks)."""
    key = str(run_dir).encode()
    return [int(p) for p in filter(str.isdigit, os.listdir("/proc"))
            if int(p) != os.getpid() and any(key in a for a in _cmdline(p))]


def rank_pid(run_dir: Path, rank: int) -> int | None:
    """The worker of ``rank`` (``python -m dqrm.pipeline.train`` with ``RANK=rank`` in its environment)."""
    for pid in processes_of(run_dir):
        cmd = _cmdline(str(pid))
        if b"dqrm.pipeline.train" not in cmd or any(b"torchrun" in a or b"distributed.run" in a for a in cmd):
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None


def kill_all(run_dir: Path) -> list[str]:
    """SIGKILL every process of ``run_dir`` still alive; returns their command lines."""
    left = []
    for pid in processes_of(run_dir):
        left.append(b" ".join(_cmdline(str(pid))).decode(errors="replace")[:200])
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


@dataclasses.dataclass
class Launched:
    proc: subprocess.Popen
    run_dir: Path
    log: Path
    started: float

    def wait(self, timeout: float) -> tuple[int | None, list[str]]:
        """(exit status or None after ``timeout``, processes of the run dir left behind). Whatever is left is
        killed."""
        try:
            rc = self.proc.wait(timeout=max(1.0, self.started + timeout - time.time()))
        except subprocess.TimeoutExpired:
            rc = None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        left = []
        for _ in range(20):  # torchx tears its workers down after the launcher returns; give it a moment
            if not processes_of(self.run_dir):
                break
            time.sleep(0.5)
        else:
            left = kill_all(self.run_dir)
        return rc, left


def launch(run_dir: Path, train_args: list[str], env: dict[str, str], log: Path) -> Launched:
    cmd = [sys.executable, "-m", "dqrm.pipeline.launch", "--run-dir", str(run_dir), "--nproc", "2", "--", *train_args]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"+ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return Launched(proc, run_dir, log, time.time())


# ---- output ----

_ERROR = re.compile(r"(?:^|\]:)\s*(error: .*)$")
_WORKER = re.compile(r"^\S+ \[\d+\]:")


_GENERIC = re.compile(r"training job failed \(exit -?\d+\); rank logs are in ")


def error_lines(text: str) -> tuple[str, ...]:
    """The ``error:`` lines of a command's output, a worker's prefix removed, without the launcher's generic
    'training job failed' line (it names the logs, not the fault); the launcher's line with its diagnosis of the run
    dir (full, read-only) counts."""
    out = []
    for line in text.splitlines():
        m = _ERROR.search(line)
        if m and not _GENERIC.search(m.group(1)):
            out.append(m.group(1))
    return tuple(dict.fromkeys(out))


_TORCHRUN = re.compile(r"^\S+/\d+ ")


def has_traceback(text: str, *, workers_only: bool) -> bool:
    """A Python traceback in a worker's lines (``train/0 [R]:``) or the launcher's own (torchx's included); with
    ``workers_only``, not torchrun's (``train/0 ...``: its report that a worker failed always has one)."""
    return any("Traceback (most recent call last)" in line
               and (not workers_only or _WORKER.match(line) or not _TORCHRUN.match(line))
               for line in text.splitlines())


# ---- watching a job ----

class Watch:
    """What a job launched at ``since`` has done so far, read from its run dir."""

    def __init__(self, run_dir: Path, since: float) -> None:
        self.run_dir, self.since = run_dir, since
        self._mtime, self._phases = 0.0, []

    def phases(self) -> list[str]:
        """Phases rank 0 finished in this launch (``logs/phases_rank0.json``, written at each phase's end)."""
        path = self.run_dir / "logs" / "phases_rank0.json"
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return []
        if mtime < self.since:
            return []  # an earlier launch's
        if mtime != self._mtime:
            try:
                self._phases = [e["phase"] for e in json.loads(path.read_text())]
                self._mtime = mtime
            except (OSError, ValueError):
                pass  # being written
        return self._phases

    def started(self) -> bool:
        try:
            return "world size" in (self.run_dir / "logs" / "rank0.log").read_text()
        except OSError:
            return False


def allocated(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return -1


def folder_bytes(path: Path) -> int:
    try:
        return sum(f.stat().st_blocks * 512 for f in path.iterdir())
    except OSError:
        return -1


# Phase -> (the phase rank 0 finishes when it starts, the phases it lasts, reference phases its length is taken
# from); None: the start is the first log line.
WINDOWS = {
    Phase.DATA: (None, "data", ("data",)),
    Phase.BUDGET: ("data", "budget_search", ("budget_search",)),
    Phase.BUILD: ("budget_search", "build_shard", ("readers", "build_shard")),
    Phase.RESUME_LOAD: ("build_shard", "resume_load", ()),  # the reference does not resume: RESUME_LOAD_SECONDS
    Phase.TRAIN: ("resume_load", "train", ("train",)),
    Phase.EXPORT_MODULE: ("export_rows", "export_module", ("export_module",)),
    Phase.CHECK: ("export_module", "program_check", ("artifact_load", "predict", "program_check")),
}
RESUME_LOAD_SECONDS = 0.3  # what verifying and loading one checkpoint of the default job takes here


@dataclasses.dataclass(frozen=True)
class Reference:
    """What the uninterrupted run measured, to place random points: seconds per phase (rank 0), bytes of a
    checkpoint and of the rows file."""

    seconds: dict[str, float]
    checkpoint_bytes: int
    rows_bytes: int


def wait_for_point(fault: Fault, job: Launched, ref: Reference, rng: random.Random) -> str | None:
    """Wait for the fault's random point in its phase; a description of the point, or None when the job ended
    or left the phase first."""
    watch, share = Watch(job.run_dir, job.started), rng.uniform(0.05, 0.9)
    alive = lambda: job.proc.poll() is None  # noqa: E731
    if fault.phase is Phase.CHECKPOINT_SAVE:
        seen: list[str] = []
        ckpts = job.run_dir / "checkpoints"
        while alive():
            tmps = sorted(p.name for p in ckpts.glob(".tmp_step_*")) if ckpts.is_dir() else []
            seen += [t for t in tmps if t not in seen]
            if len(seen) >= fault.save and seen[fault.save - 1] in tmps:
                tmp = ckpts / seen[fault.save - 1]
                want = int(share * ref.checkpoint_bytes)
                while alive() and tmp.exists() and folder_bytes(tmp) < want:
                    time.sleep(POLL)
                done = folder_bytes(tmp)
                return f"save {fault.save} ({tmp.name}) at {done / 1e6:.1f} of {ref.checkpoint_bytes / 1e6:.1f} MB" \
                    if alive() and done >= want else None
            time.sleep(POLL)
        return None
    if fault.phase is Phase.EXPORT_ROWS:
        tmp = job.run_dir / "model_int4.rows.tmp"
        want = int(share * ref.rows_bytes)
        while alive() and allocated(tmp) < want:
            time.sleep(POLL)
        done = allocated(tmp)
        return f"rows file at {done / 1e6:.1f} of {ref.rows_bytes / 1e6:.1f} MB" if alive() and done >= want else None
    begin, end, lengths = WINDOWS[fault.phase]
    while alive() and not (watch.started() if begin is None else begin in watch.phases()):
        time.sleep(POLL)
    t0 = time.time()
    length = sum(ref.seconds.get(p, 0.0) for p in lengths) or RESUME_LOAD_SECONDS
    delay = share * length
    while alive() and time.time() < t0 + delay and end not in watch.phases():
        time.sleep(POLL)
    if not alive() or end in watch.phases():
        return None
    return f"{delay:.2f} s into {fault.phase.name.lower()} (reference length {length:.2f} s)"


# ---- striking ----

def strike_signal(action: Kill, job: Launched, rng: random.Random) -> str:
    if action.group:
        os.killpg(job.proc.pid, action.sig)
        return f"{action.sig.name} to the launcher's process group"
    rank = action.rank if action.rank is not None else rng.choice((0, 1))
    pid = rank_pid(job.run_dir, rank)
    if pid is None:
        return f"rank {rank} not found"
    os.kill(pid, action.sig)
    return f"{action.sig.name} to rank {rank} (pid {pid})"


def free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def fill(folder: Path) -> str:
    """Take every free byte of ``folder``'s file system with a filler file: allocated in chunks, halved whenever
    one does not fit (a tmpfs refuses a whole request it cannot meet, so one request of "all that is free" may
    allocate nothing), down to a page."""
    free = free_bytes(folder)
    fd = os.open(folder / ".filler", os.O_WRONLY | os.O_CREAT, 0o644)
    offset, chunk = 0, 64 << 20
    try:
        while chunk >= 4096:
            try:
                os.posix_fallocate(fd, offset, chunk)
                offset += chunk
            except OSError:
                chunk //= 2
    finally:
        os.close(fd)
    return f"filled the disk ({free / 1e6:.1f} MB free before, {free_bytes(folder) / 1e6:.3f} MB after)"


class Mounts:
    """Mounts made for a fault, undone (lazily if busy) on ``close``, however the fault ended."""

    def __init__(self) -> None:
        self.points: list[Path] = []

    def tmpfs(self, at: Path, mb: int) -> None:
        at.mkdir(parents=True, exist_ok=True)
        _run("mount", "-t", "tmpfs", "-o", f"size={mb}m", "tmpfs", str(at))
        self.points.append(at)

    def resize(self, at: Path, mb: int) -> None:
        _run("mount", "-o", f"remount,size={mb}m", str(at))

    def read_only(self, at: Path) -> None:
        """A new bind mount of ``at`` over itself, made read-only (a remount of the mount the job writes through
        would fail while it holds files open for writing)."""
        _run("mount", "--bind", str(at), str(at))
        self.points.append(at)
        _run("mount", "-o", "remount,bind,ro", str(at))

    def unmount(self, at: Path) -> None:
        if at in self.points:
            self.points.remove(at)
            if subprocess.run(["umount", str(at)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(at)], capture_output=True)

    def close(self) -> None:
        for at in reversed(list(self.points)):
            self.unmount(at)


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


# ---- damaging files ----

def damage(run_dir: Path, action: Damage, rng: random.Random) -> list[str]:
    """Damage the files ``action`` names; returns what was done to each (enough to repeat it by hand)."""
    pattern = action.pattern
    if "{newest}" in pattern:
        pattern = pattern.replace("{newest}", newest_checkpoint(run_dir / "checkpoints").name)
    files = sorted(run_dir.glob(pattern))
    if not files:
        raise FileNotFoundError(f"nothing matches {pattern} in {run_dir}")
    done = []
    for f in files:
        size = f.stat().st_size
        if action.how == "truncate":
            keep = int(size * rng.uniform(0.05, 0.95))
            os.truncate(f, keep)
            done.append(f"{f.relative_to(run_dir)}: truncated from {size} to {keep} bytes")
        else:
            data = bytearray(f.read_bytes())
            offset, bit = _flip_point(data, action.key, rng)
            data[offset] ^= 1 << bit
            f.write_bytes(bytes(data))
            done.append(f"{f.relative_to(run_dir)}: bit {bit} of byte {offset} (of {size}) flipped")
    return done


def _flip_point(data: bytearray, key: str, rng: random.Random) -> tuple[int, int]:
    if not key:
        return rng.randrange(len(data)), rng.randrange(8)
    m = re.search(rb'"' + re.escape(key.encode()) + rb'":\s*(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)', bytes(data))
    if m is None:
        raise ValueError(f"no number under key {key!r} to flip")
    digits = [m.start(1) + i for i, c in enumerate(m.group(1)) if chr(c).isdigit()]
    return rng.choice(digits), 0  # bit 0 turns a digit into another digit: the JSON stays valid


def newest_checkpoint(folder: Path) -> Path:
    from bench.faults.judge import checkpoint_order

    done = [p for p in folder.glob("step_*") if (p / "manifest.json").is_file()]
    if not done:
        raise FileNotFoundError(f"no complete checkpoint in {folder}")
    return max(done, key=lambda p: checkpoint_order(p.name))


def complete_checkpoints(run_dir: Path) -> list[str]:
    folder = run_dir / "checkpoints"
    return sorted(p.name for p in folder.glob("step_*") if (p / "manifest.json").is_file()) if folder.is_dir() else []


def verified(run_dir: Path) -> dict[str, bool]:
    """Each complete checkpoint of ``run_dir``: whether its files match its manifest (``pipeline.checkpoint``)."""
    from dqrm.pipeline.checkpoint import verify

    return {n: verify(run_dir / "checkpoints" / n) is None for n in complete_checkpoints(run_dir)}


def copy_run(src: Path, dst: Path) -> None:
    """A copy of a run dir to start a fault from (``dst`` may be an empty mount point)."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)


def predict(model: Path, data: Path, log: Path, timeout: float = 300) -> tuple[int | None, str, dict | None]:
    """``python -m dqrm.pipeline.predict --json`` on ``data``: (exit status, its output, the metrics or None)."""
    cmd = [sys.executable, "-m", "dqrm.pipeline.predict", "--model", str(model), "--data", str(data), "--json"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "", None
    out = proc.stdout + proc.stderr
    log.write_text(f"+ {' '.join(cmd)}\n{out}")
    metrics = None
    if proc.returncode == 0:
        with contextlib.suppress(ValueError, IndexError):
            metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    return proc.returncode, out, metrics


def strike(action, job: Launched, mounts: Mounts, rng: random.Random) -> str:
    """Strike ``action`` at the point reached; what was done."""
    if isinstance(action, Kill):
        return strike_signal(action, job, rng)
    if isinstance(action, FillDisk):
        return fill(job.run_dir)
    if isinstance(action, ReadOnly):
        at = job.run_dir / action.sub if action.sub else job.run_dir
        mounts.read_only(at)
        return f"made {at} read-only"
    if isinstance(action, SmallDisk):
        return "nothing (the disk was small from the start)"
    raise TypeError(f"no strike for {action!r}")


def repair(action, run_dir: Path, mounts: Mounts) -> str:
    """Undo what a fault did to the file system before the rerun."""
    if isinstance(action, FillDisk):
        (run_dir / ".filler").unlink(missing_ok=True)
        return "deleted the filler"
    if isinstance(action, SmallDisk):
        mounts.resize(run_dir, action.grow_mb)
        return f"grew the tmpfs to {action.grow_mb} MB"
    if isinstance(action, ReadOnly):
        mounts.unmount(run_dir / action.sub if action.sub else run_dir)
        return "unmounted the read-only bind"
    return ""

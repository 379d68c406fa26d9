"""A cache of training runs for the benches made of them (``compare_quant``, ``comm_auc``), so that a long bench can
be stopped and resumed across sessions without ever reusing a result it did not produce for the same job.

A run is keyed by its named config, the extra training arguments, the seed (``--set seed=N``), the number of
workers and the code commit: the newest commit that changed the code a job runs (``RUN_DEPENDS``), so that a
commit of docs or results does not start the cache afresh. Its directory, ``ROOT/<commit>/<config>-seed<N>-<digest>``, holds the job's
run dir as the launcher writes it, plus

- ``bench_key.json``: the key, written before the job starts; a directory whose key differs is refused;
- ``bench_done.json``: written after the launcher returned 0, with the SHA-256 of the ``summary.json`` the job wrote.

Only a ``summary.json`` whose key matches and whose hash ``bench_done.json`` records is reused. A directory with the
key but no ``bench_done.json`` (a bench killed mid-run) is launched again: the job resumes from its newest checkpoint
(``pipeline.launch`` resumes a run dir) and a ``summary.json`` left without a record is removed first.

The key's commit says which code ran only if that code was committed, so a run is cached only when no file under
``RUN_DEPENDS`` differs from HEAD (whose ``RUN_DEPENDS`` are then the code commit's); otherwise it is refused, or, with ``allow_dirty``, run in a fresh directory under
``ROOT/uncached/`` that is never reused (its key records the changed paths).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT as REPO, git, git_changes

DEFAULT_ROOT = REPO / "runs" / "bench_cache"
# What a training job runs: its packages (the launcher, the trainer, data, model, quantization, sharding, the torchx
# component). The environment (.venv) is not in the key; each result records the torch version.
RUN_DEPENDS = ("datasets", "pipeline", "quant", "sharding", "torchx_components")
KEY_FILE, DONE_FILE = "bench_key.json", "bench_done.json"


class DirtyTree(RuntimeError):
    """The code a run depends on differs from HEAD, so a cached result could not say which code produced it."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunKey:
    """Everything that decides a cached run's result."""

    config: str
    """Named config (``--config``)."""
    args: tuple[str, ...] = ()
    """Further ``pipeline.train`` arguments, as given (order matters: an equal job spelled differently is rerun)."""
    seed: int = 0
    """``JobConfig.seed``: model initialization and shuffling (the synthetic data are the same for every seed)."""
    nproc: int = 2
    """Workers (world size)."""
    commit: str
    """The code commit the job ran from (``head_commit``)."""

    def __post_init__(self) -> None:
        if any(a.startswith("seed=") for a in self.args):
            raise ValueError(f"pass the seed as RunKey.seed, not in args: {self.args}")

    def train_args(self) -> list[str]:
        return ["--config", self.config, *self.args, "--set", f"seed={self.seed}"]

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "args": list(self.args)}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()

    def dirname(self) -> str:
        return f"{self.config}-seed{self.seed}-{self.digest()[:12]}"


@dataclasses.dataclass(kw_only=True)
class CachedRun:
    """A finished run: its summary, where it lives, and whether this call launched it."""

    key: RunKey
    run_dir: Path
    summary: dict
    reused: bool
    cached: bool
    """False for a run made with ``allow_dirty`` from changed code (never reused)."""


def head_commit() -> str:
    """The newest commit that changed a file under ``RUN_DEPENDS`` (HEAD's code is that commit's)."""
    return git("log", "-1", "--format=%H", "HEAD", "--", *RUN_DEPENDS).strip()


def dirty_paths() -> list[str]:
    return git_changes(*RUN_DEPENDS)


def run(config: str, args: list[str] | tuple[str, ...] = (), *, seed: int = 0, nproc: int = 2,
        root: Path = DEFAULT_ROOT, allow_dirty: bool = False, launch=None) -> CachedRun:
    """The summary of ``python -m dqrm.pipeline.launch --nproc NPROC -- --config CONFIG ARGS --set seed=SEED``: reused
    from the cache if this key finished there, otherwise launched (resuming an unfinished run of the key).
    ``launch(cmd) -> exit code`` runs the launcher (tests pass a stand-in)."""
    launch, root = launch or _launch, Path(root).resolve()
    key = RunKey(config=config, args=tuple(args), seed=seed, nproc=nproc, commit=head_commit())
    changed = dirty_paths()
    if changed:
        if not allow_dirty:
            raise DirtyTree(f"{len(changed)} file(s) the training runs depend on differ from HEAD {key.commit[:12]} "
                            f"({', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}): a cached result could "
                            f"not say which code produced it. Commit them (or run from a clean worktree: git worktree "
                            f"add), or pass --allow-dirty to run uncached in a fresh directory that is never reused")
        (root / "uncached").mkdir(parents=True, exist_ok=True)
        run_dir = Path(tempfile.mkdtemp(prefix=f"{key.dirname()}-{time.strftime('%Y%m%d-%H%M%S')}-",
                                        dir=root / "uncached"))
        _write_json(run_dir / KEY_FILE, {**key.as_dict(), "dirty_paths": changed})
        return CachedRun(key=key, run_dir=run_dir, summary=_launch_and_read(key, run_dir, launch), reused=False,
                         cached=False)
    run_dir = root / key.commit / key.dirname()
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".bench_lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{run_dir} is being run by another bench process; wait for it") from None
        summary = reusable_summary(run_dir, key)
        if summary is not None:
            return CachedRun(key=key, run_dir=run_dir, summary=summary, reused=True, cached=True)
        if (run_dir / KEY_FILE).exists():
            print(f"resuming unfinished cached run {run_dir}", flush=True)
        elif any(p.name != ".bench_lock" for p in run_dir.iterdir()):
            raise RuntimeError(f"{run_dir} has files but no {KEY_FILE}: not made by this cache; move it away")
        _write_json(run_dir / KEY_FILE, key.as_dict())
        (run_dir / "summary.json").unlink(missing_ok=True)  # unrecorded: not known to be this key's
        summary = _launch_and_read(key, run_dir, launch)
        if dirty_paths():  # edited while the job ran: it may have imported the edit
            raise DirtyTree(f"files under {', '.join(RUN_DEPENDS)} changed while {run_dir} ran; not recording it "
                            f"as finished (rerun from a clean tree)")
        _write_json(run_dir / DONE_FILE, {"summary_sha256": _sha256(run_dir / "summary.json"),
                                          "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "key": key.as_dict()})
        return CachedRun(key=key, run_dir=run_dir, summary=summary, reused=False, cached=True)


def reusable_summary(run_dir: Path, key: RunKey) -> dict | None:
    """The run dir's summary if this cache finished it for ``key``; None if it is unfinished. Raises when the
    directory belongs to another key."""
    key_path, done_path, summary_path = run_dir / KEY_FILE, run_dir / DONE_FILE, run_dir / "summary.json"
    if not key_path.is_file():
        return None
    saved = json.loads(key_path.read_text())
    if saved != key.as_dict():
        raise RuntimeError(f"{key_path} records another run ({saved}), not {key.as_dict()}; move the directory away")
    if not done_path.is_file() or not summary_path.is_file():
        return None
    done = json.loads(done_path.read_text())
    if done.get("key") != key.as_dict() or done.get("summary_sha256") != _sha256(summary_path):
        return None  # rewritten since: not the summary this key's run produced
    return json.loads(summary_path.read_text())


def _launch_and_read(key: RunKey, run_dir: Path, launch) -> dict:
    cmd = [sys.executable, "-m", "dqrm.pipeline.launch", "--run-dir", str(run_dir), "--nproc", str(key.nproc), "--",
           *key.train_args()]
    rc = launch(cmd)
    if rc != 0:
        raise RuntimeError(f"training run failed (exit {rc}): {' '.join(cmd)}; logs in {run_dir}/torchx and "
                           f"{run_dir}/logs; rerunning the bench resumes it")
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary.get("config") != key.config:
        raise RuntimeError(f"{run_dir}/summary.json is of config {summary.get('config')!r}, not {key.config!r}")
    return summary


def _launch(cmd: list[str]) -> int:
    """The launcher with its output in the run dir's ``bench_launch.log`` (the job's own logs are in ``logs/`` and
    ``torchx/``), so the bench's console and result files carry no training chatter or library warnings."""
    run_dir = Path(cmd[cmd.index("--run-dir") + 1])
    print("+", " ".join(cmd), f"  (output: {run_dir / 'bench_launch.log'})", flush=True)
    with open(run_dir / "bench_launch.log", "a") as log:
        return subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    tmp.replace(path)

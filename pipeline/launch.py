"""``make train``: launch ``pipeline.train`` through ``torchx run -s local_cwd`` and fail when the job fails.

Everything after ``--`` goes to ``python -m dqrm.pipeline.train``. torchx's own logs (one folder per attempt, with each
rank's stdout/stderr) are kept in ``RUN_DIR/torchx``. torchx writes them as the job runs into a folder of the system's
temporary directory first and they are copied into the run dir after each attempt: on a full or read-only run dir
torchx's log threads would otherwise fail (with tracebacks of their own) and lose the ranks' error messages; when the
copy fails too, the error says where the logs are.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path



def component() -> str:
    """The torchx component ``dqrm.torchx_components.dlrm:train`` as torchx takes it, a file path: where dqrm is
    installed, so that the launcher runs from any working directory."""
    return f"{importlib.util.find_spec('dqrm.torchx_components.dlrm').origin}:train"


def torchx_command(run_dir: Path, nproc: int, train_args: list[str], *, log_dir: Path, scheduler: str = "local_cwd",
                   max_retries: int = 0) -> list[str]:
    torchx = str(Path(sys.executable).with_name("torchx"))
    return [torchx, "run", "-s", scheduler, "--wait", "--log",
            "--scheduler_args", f"log_dir={log_dir}",
            component(), "--nproc_per_node", str(nproc), "--max_retries", str(max_retries), "--run_dir", str(run_dir),
            "--", *train_args]


def merge_overrides(train_args: list[str]) -> list[str]:
    """torchx refuses a repeated option, so ``--set a=1 --set b=2`` travels as one ``--set a=1 b=2``."""
    out: list[str] = []
    values: list[str] = []
    at = None
    i = 0
    while i < len(train_args):
        tok = train_args[i]
        if tok == "--set":
            at = len(out) if at is None else at
            i += 1
            while i < len(train_args) and not train_args[i].startswith("--"):
                values.append(train_args[i])
                i += 1
            continue
        out.append(tok)
        i += 1
    if at is not None:
        out[at:at] = ["--set", *values]
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(prog="python -m dqrm.pipeline.launch", usage="%(prog)s --run-dir DIR [options] -- "
                                "[python -m dqrm.pipeline.train flags]",
                                description="Run a training job locally through torchx (local_cwd scheduler); "
                                            "everything after -- goes to python -m dqrm.pipeline.train.")
    p.add_argument("--run-dir", type=Path, required=True, help="run directory (logs, checkpoints, summary)")
    p.add_argument("--nproc", type=int, default=2, help="worker processes (ranks; default: %(default)s)")
    p.add_argument("--max-retries", type=int, default=0,
                   help="restarts allowed after a worker fails, each resuming from the newest checkpoint "
                        "(default: %(default)s)")
    args = p.parse_args(argv[:split])
    if args.nproc < 1 or args.max_retries < 0:
        p.error(f"--nproc must be at least 1 and --max-retries at least 0, got {args.nproc} and {args.max_retries}")
    train_args = merge_overrides(argv[split + 1:])
    # the torchx component refuses a second run dir among the job's flags, after torchx has started: say it here
    named = [arg for arg in train_args if arg.split("=", 1)[0] == "--run-dir" or arg.startswith("run_dir=")]
    if named:
        p.error(f"{named[0]} after --: give the run dir once, as --run-dir before --")
    from dqrm.pipeline.cli import config_or_exit, parse_args as parse_train_args  # torch: after --help

    # the workers would each refuse a bad flag or field: say it once, before torchx makes anything
    checked = config_or_exit(parse_train_args([*train_args, "--run-dir", str(args.run_dir)]))
    if isinstance(checked, int):
        return checked
    refused = write_refused(args.run_dir)
    if refused:
        print(f"error: {refused}", file=sys.stderr)
        return 2
    staging = Path(tempfile.mkdtemp(prefix="dqrm-torchx-"))
    cmd = torchx_command(args.run_dir, args.nproc, train_args, log_dir=staging, max_retries=args.max_retries)
    # torchx's local_cwd scheduler runs `torchrun` from PATH: make it this environment's.
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    # The local scheduler does not retry, so the restart budget is spent here: each attempt is a fresh torchx job
    # (fresh processes and rendezvous) that resumes from the newest complete checkpoint in the run dir.
    for attempt in range(args.max_retries + 1):
        print(f"+ {' '.join(cmd)}" + (f"   (attempt {attempt + 1} of {args.max_retries + 1})" if attempt else ""),
              flush=True)
        rc = subprocess.call(cmd, env={**env, "DQRM_ATTEMPT": str(attempt)})
        logs = keep_logs(staging, args.run_dir / "torchx")
        if rc == 0:
            break
        if attempt < args.max_retries:
            print(f"training job failed (exit {rc}); restarting from the latest checkpoint in {args.run_dir}",
                  flush=True)
    if logs != staging:
        shutil.rmtree(staging, ignore_errors=True)
    if rc != 0:
        refused = write_refused(args.run_dir)
        why = f"; {refused}" if refused else ""
        print(f"error: training job failed (exit {rc}){why}; rank logs are in {logs} and {args.run_dir / 'logs'}",
              file=sys.stderr)
        return 1
    return 0


def keep_logs(staging: Path, kept: Path) -> Path:
    """Copy torchx's logs from ``staging`` into ``kept`` (the run dir's ``torchx``) and return where they are now:
    ``kept``, or ``staging`` (left in place) where the run dir refuses the copy."""
    try:
        shutil.copytree(staging, kept, dirs_exist_ok=True)
    except (OSError, shutil.Error):
        return staging
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(exist_ok=True)  # the next attempt writes here again
    return kept


def refusal(e: OSError) -> str:
    """Why the file system refused a write, in the words the job's and the launcher's errors use."""
    return {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
            errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
            errno.EPERM: "permission denied"}.get(e.errno, e.strerror or str(e))


def write_refused(run_dir: Path, probe_bytes: int = 1 << 20) -> str | None:
    """What stops writes in ``run_dir`` (made if missing), as the error's words, or ``None``: a probe file of 1 MiB
    is written, synced and removed (a full disk, a read-only mount or a missing permission all show; ``chmod``
    alone does not stop root, a read-only mount does)."""
    probe = run_dir / f".write_probe_{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(bytes(probe_bytes))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return (f"{e.filename or run_dir}: {refusal(e)}; the run dir must be writable with room for checkpoints and "
                f"logs: free space or make it writable (or point --run-dir elsewhere), then rerun the same command "
                f"(a run dir with checkpoints resumes from its newest complete one)")
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:  # a read-only file system may say so even for a file that is not there
            pass
    return None


if __name__ == "__main__":
    sys.exit(main())

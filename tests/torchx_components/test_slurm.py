"""The README's small-cluster Slurm command, run for real: a two-node Slurm cluster on this machine
(``scripts/slurm_cluster.sh``, started and stopped here) runs the tiny job and the default job with 2 replicas through
``torchx run -s slurm`` into one run dir; ``torchx status`` and ``torchx log`` follow them; a worker SIGKILLed
mid-epoch makes Slurm requeue the job, which resumes to the numbers of an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.torchx_components.test_dlrm import ROOT, Launch, readme_launches

CLUSTER = ROOT / "scripts" / "slurm_cluster.sh"
CHECK = subprocess.run([str(CLUSTER), "check"], capture_output=True, text=True)
pytestmark = pytest.mark.skipif(
    CHECK.returncode != 0,
    reason=f"scripts/slurm_cluster.sh cannot run here: {CHECK.stdout.strip()} (the packages, as root: apt-get install "
           "slurm-wlm slurmdbd munge mariadb-server; .ci/run does)")
BIN = Path(sys.executable).parent
# The README's placeholder for storage every host sees; the tests put it in a temporary folder.
SHARED = "/shared/runs"
# test_resume's tiny job: 2 epochs of 64 steps, a checkpoint every 16, evaluation on each rank's first batch.
TINY = ["--config", "tiny", "--epochs", "2", "--limit-eval-batches", "1", "--set", "checkpoint_every_steps=16",
        "data.eval_batch_size=1024"]
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict[str, str]:
    """The environment a user has after ``scripts/slurm_cluster.sh up``: SLURM_CONF set, .venv/bin on PATH."""
    state = tmp_path_factory.mktemp("slurm")
    up = subprocess.run([str(CLUSTER), "up", str(state)], capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    assert up.stdout.strip() == f"export SLURM_CONF={state}/etc/slurm.conf"
    try:
        yield {**os.environ, "SLURM_CONF": f"{state}/etc/slurm.conf", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    finally:
        down = subprocess.run([str(CLUSTER), "down", str(state)], capture_output=True, text=True, timeout=300)
        assert down.returncode == 0, down.stderr
        assert not (state / "pids").exists()


def small_cluster() -> Launch:
    (launch,) = [launch for name, launch in readme_launches().items() if name.startswith("slurm/")
                 and launch.param("gpu") == "0"]
    return launch


def submit(env: dict[str, str], shared: Path, script_args: list[str] | None = None, **extra_env: str) -> tuple[str, Path]:
    """Run the README's small-cluster command with its shared folder at ``shared`` (and other `pipeline.train`
    arguments where given); return torchx's app handle and the job's run dir."""
    launch = small_cluster()
    argv = [arg.replace(SHARED, str(shared)) for arg in launch.argv]
    if script_args is not None:
        argv = argv[:argv.index("--") + 1] + script_args
    job_dir = Path(launch.cfg()["job_dir"].replace(SHARED, str(shared)))
    job_dir.mkdir(parents=True)  # the README's `mkdir -p`
    proc = subprocess.run(argv, cwd=ROOT, env={**env, **extra_env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    handle = proc.stdout.strip().splitlines()[0]
    assert re.fullmatch(r"slurm://torchx/\d+", handle), proc.stdout
    return handle, Path(launch.param("run_dir").replace(SHARED, str(shared)))


def torchx(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run([str(BIN / "torchx"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def wait(env: dict[str, str], handle: str, timeout: float) -> str:
    """Follow the job with `torchx status` (which asks Slurm's accounting) until it ends; its last status."""
    deadline = time.monotonic() + timeout
    while True:
        status = torchx(env, "status", handle)
        state = re.search(r"State: (\w+)", status).group(1)
        if state in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(2)


def scontrol(env: dict[str, str], handle: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", handle.rsplit("/", 1)[1]], env=env, capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def metrics(run_dir: Path) -> list[dict]:
    """summary.json's numbers, timings left out."""
    return [{k: e[k] for k in ("epoch", "step", "train_loss", "val", "test")}
            for e in json.loads((run_dir / "summary.json").read_text())["epochs"]]


def scores(run_dir: Path) -> dict:
    """`pipeline.predict` on the exported artifact, with the test split the job evaluated."""
    test_files = json.loads((run_dir / "summary.json").read_text())["test_files"]
    proc = subprocess.run([sys.executable, "-m", "dqrm.pipeline.predict", "--model", str(run_dir / "model_int4.pt"),
                           "--data", *test_files, "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_readme_small_cluster_command_fits_this_machine():
    """Two replicas of one rank and one CPU each: a heterogeneous job of two components, one per node of the
    script's cluster (each node has half of this machine's CPUs)."""
    launch = small_cluster()
    assert launch.options["--workspace"] == "" and launch.param("nnodes") == "2"
    assert launch.param("nproc_per_node") == "1" and int(launch.param("cpu")) * 2 <= os.cpu_count()
    assert launch.param("run_dir").startswith(SHARED) and launch.options["-cfg"].count(f"job_dir={SHARED}") == 1
    assert int(launch.param("max_retries")) >= 1


@pytest.fixture(scope="module")
def tiny_run(slurm, tmp_path_factory) -> tuple[str, Path]:
    handle, run_dir = submit(slurm, tmp_path_factory.mktemp("shared"), TINY)
    status = wait(slurm, handle, timeout=600)
    assert "State: SUCCEEDED" in status, status + torchx(slurm, "log", handle)
    return handle, run_dir


def test_tiny_job_runs_on_two_replicas_into_one_run_dir(slurm, tiny_run):
    handle, run_dir = tiny_run
    status = torchx(slurm, "status", handle)
    assert "train[0]:SUCCEEDED" in status and "train[1]:SUCCEEDED" in status
    job = scontrol(slurm, handle)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "0"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and len(summary["epochs"]) == 2
    # both replicas wrote into the one run dir: each rank's log, and rank 1's part of the checkpoints
    assert (run_dir / "logs" / "rank0.log").is_file() and (run_dir / "logs" / "rank1.log").is_file()
    assert any((run_dir / "checkpoints").glob("step_*/__1_0.distcp"))
    # `torchx log` finds the replicas' output in the job dir: rank 0's, on one of them, ends with the summary
    out = torchx(slurm, "log", "--streams", "stdout", handle)
    assert re.search(rf"^train/[01] \[0\]:summary: {re.escape(str(run_dir))}/summary.json ", out, re.M), out[-2000:]
    # the artifact serves: predict scores the test split the job evaluated, with the AUC the job reported
    export = summary["export"]
    scored = scores(run_dir)
    assert scored["rows"] > 0 and 0.5 < scored["auc"] <= 1
    assert export["max_abs_logit_diff_vs_fake_quant"] <= 1e-5


def test_killed_replica_is_requeued_and_resumes_to_the_same_numbers(slurm, tiny_run, tmp_path):
    _, clean = tiny_run
    handle, run_dir = submit(slurm, tmp_path, TINY, DQRM_FAULT_KILL_AT_STEP="40", DQRM_FAULT_KILL_RANK="1")
    status = wait(slurm, handle, timeout=900)
    assert "State: SUCCEEDED" in status, status + torchx(slurm, "log", handle)
    # Slurm ran it twice: torchx's batch script requeued it after the kill (its restart budget, --max_retries, is 1)
    assert scontrol(slurm, handle)["Restarts"] == "1"
    assert "fault injection: killing rank 1 at step 40" in (run_dir / "logs" / "rank1.log").read_text()
    rank0 = (run_dir / "logs" / "rank0.log").read_text()
    assert "resuming at epoch 1 (step 32)" in rank0  # the newest complete checkpoint before the kill, mid-epoch
    assert metrics(run_dir) == metrics(clean)
    assert scores(run_dir) == scores(clean)


def test_default_job_runs_on_two_replicas(slurm, tmp_path):
    """The README's command as it is, but for one epoch (the default's 5 take about 12 minutes on 2 CPUs)."""
    launch = small_cluster()
    assert launch.script_args == ["--config", "default"], shlex.join(launch.script_args)
    handle, run_dir = submit(slurm, tmp_path, [*launch.script_args, "--epochs", "1"])
    status = wait(slurm, handle, timeout=900)
    assert "State: SUCCEEDED" in status, status + torchx(slurm, "log", handle)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["config"] == "default"
    scored = scores(run_dir)
    assert scored["rows"] == 200_000 and scored["auc"] > 0.7

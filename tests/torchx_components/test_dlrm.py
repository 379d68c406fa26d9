"""The torchx component lints and materializes for local, Kubernetes and Slurm schedulers (dry run)."""

import subprocess
import sys
from pathlib import Path

import pytest
from torchx.specs.file_linter import validate

ROOT = Path(__file__).resolve().parents[2]
COMPONENT = ROOT / "torchx_components" / "dlrm.py"


def test_component_passes_torchx_lint():
    assert validate(str(COMPONENT), "train") == []


@pytest.mark.parametrize("scheduler, expect", [
    ("local_cwd", ["torchrun", "--nproc_per_node 2", "-m pipeline.train", "--config default"]),
    ("kubernetes", ["image: ghcr.io/acme/dqrm:latest", "torchrun", "-m pipeline.train", "nproc_per_node 4",
                    "nvidia.com/gpu", "maxRetry: 3"]),
    ("slurm", ["#SBATCH", "torchrun", "-m pipeline.train", "--nnodes 2", "--requeue", "TORCHX_MAX_RETRIES=3"]),
])
def test_dryrun_on_each_scheduler(scheduler, expect):
    torchx = Path(sys.executable).with_name("torchx")
    args = {"local_cwd": ["--nproc_per_node", "2"],
            "kubernetes": ["--image", "ghcr.io/acme/dqrm:latest", "--nnodes", "2", "--nproc_per_node", "4",
                           "--gpu", "4", "--max_retries", "3"],
            "slurm": ["--nnodes", "2", "--nproc_per_node", "8", "--gpu", "8", "--max_retries", "3"]}[scheduler]
    cfg = {"kubernetes": ["-cfg", "queue=default"], "slurm": ["-cfg", "partition=gpu"]}.get(scheduler, [])
    proc = subprocess.run([str(torchx), "run", "--dryrun", "--workspace", "", "-s", scheduler, *cfg, f"{COMPONENT}:train", *args, "--",
                           "--config", "default", "--epochs", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    for needle in expect:
        assert needle in out, f"{needle!r} not in the {scheduler} request"

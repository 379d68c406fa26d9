"""Fixtures shared across test folders: a tiny training job's run dir, for the examples and the README's blocks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The job the README's serving blocks and examples/serve_artifact.py are run on (world size 1, no torchx: ~40 s).
TINY_JOB = ["--config", "tiny", "--epochs", "1", "--limit-train-batches", "8", "--limit-eval-batches", "1"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The run dir of a finished tiny job: ``model_int4.pt`` (+ ``.pt2``, ``.rows``), ``export_check.pt`` (the
    QAT model's logits on the first 1024 test rows) and ``summary.json`` (which names the test split)."""
    base = tmp_path_factory.mktemp("tiny-run")
    env = {**os.environ, "DQRM_CACHE_DIR": str(base / "cache")}
    proc = subprocess.run([sys.executable, "-m", "dqrm.pipeline.train", *TINY_JOB, "--run-dir", str(base / "run")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return base / "run"

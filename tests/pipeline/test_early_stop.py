"""``early_stop_epochs``: training stops once validation AUC has not improved for N epochs, also when a finished run
dir is started again; the model trained last is exported, exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dqrm.pipeline.trainer import early_stop

ROOT = Path(__file__).resolve().parents[2]


def _history(*aucs: float) -> list[dict]:
    return [{"val": {"auc": a}} for a in aucs]


def test_the_rule_counts_epochs_since_the_best():
    assert early_stop(_history(0.6, 0.7, 0.65), 0) is None  # off
    assert early_stop([], 2) is None
    assert early_stop(_history(0.6, 0.7), 1) is None  # improving
    assert early_stop(_history(0.6, 0.7, 0.7), 1) == ("validation AUC 0.7000 at epoch 2 has not improved for 1 "
                                                       "epoch(s) (early_stop_epochs=1; last 0.7000)")  # equal is no gain
    assert early_stop(_history(0.6, 0.7, 0.65), 2) is None
    assert "for 2 epoch(s)" in early_stop(_history(0.6, 0.7, 0.65, 0.69), 2)


def _launch(run_dir: Path, cache: Path):
    cmd = [sys.executable, "-m", "dqrm.pipeline.launch", "--run-dir", str(run_dir), "--nproc", "2", "--", "--config",
           "tiny", "--epochs", "8", "--set", "early_stop_epochs=1", "optim.embedding=rowwise_adagrad",
           "optim.embedding_lr=0.3"]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, "DQRM_CACHE_DIR": str(cache)}, capture_output=True,
                          text=True, timeout=900)


def test_a_job_that_stops_improving_stops_and_exports_what_it_trained(tmp_path):
    # Row-wise Adagrad at 0.3 overfits tiny's 16k rows within a few epochs.
    first = _launch(tmp_path / "run", tmp_path / "cache")
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    aucs = [e["val"]["auc"] for e in summary["epochs"]]
    best = aucs.index(max(aucs))
    assert len(aucs) == best + 2 < 8, aucs  # stopped one epoch after the best, before the 8 configured
    log = (tmp_path / "run" / "logs" / "rank0.log").read_text()
    assert f"stopping before epoch {len(aucs) + 1} of 8: validation AUC {aucs[best]:.4f} at epoch {best + 1}" in log
    assert summary["export"]["max_abs_logit_diff_vs_fake_quant"] <= 1e-5  # the last model trained, exported
    assert summary["export"]["test"]["auc"] == summary["epochs"][-1]["test"]["auc"]
    # Started again, it resumes, trains nothing more and says why.
    again = _launch(tmp_path / "run", tmp_path / "cache")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epochs"] == summary["epochs"]
    said = again.stdout + again.stderr
    assert "resumed from" in said and f"stopping before epoch {len(aucs) + 1} of 8" in said

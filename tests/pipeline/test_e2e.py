"""The real entry point, launched through torchx with two workers, for a few steps of the tiny config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dqrm.pipeline.launch import write_refused

ROOT = Path(__file__).resolve().parents[2]


def _launch(run_dir: Path, cache: Path, *train_args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DQRM_CACHE_DIR": str(cache)}
    cmd = [sys.executable, "-m", "dqrm.pipeline.launch", "--run-dir", str(run_dir), "--nproc", "2", "--",
           "--config", "tiny", *train_args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    run_dir, cache = base / "run", base / "cache"
    # Two separate --set flags: torchx refuses repeated options, so the launcher must merge them.
    proc = _launch(run_dir, cache, "--epochs", "2", "--set", "comm.count_bytes=true", "--set", "comm.dense=fp32")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir, cache, proc


def test_torchx_job_trains_checkpoints_and_reports(finished_run):
    run_dir, _, proc = finished_run
    summary = json.loads((run_dir / "summary.json").read_text())
    epochs = summary["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert summary["world_size"] == 2
    # The loss falls and the model learns, measured against what this data allows: the generator knows the best
    # achievable test AUC. These 128 steps reach about a sixth of the way from chance (0.5) to it; a tenth is
    # required (0.039 above chance here, about 4 standard errors of a chance AUC on 4096 rows), and no model can
    # beat the true probabilities by more than sampling noise (a leak of the labels would).
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"]
    best, auc = summary["bayes_test"]["auc"], epochs[1]["test"]["auc"]
    assert epochs[0]["val"]["auc"] < epochs[1]["val"]["auc"]
    assert 0.5 + 0.1 * (best - 0.5) < auc <= best + 0.01, (auc, best)
    # What is served is what was evaluated: the exported artifact's test logits are the QAT model's.
    assert summary["export"]["max_abs_logit_diff_vs_fake_quant"] <= 1e-5
    assert summary["export"]["test"] == epochs[1]["test"]
    for e in epochs:
        for split in ("val", "test"):
            assert e[split]["rows"] == 4096
            assert 0 < e[split]["logloss"] < 1
    checkpoints = sorted((run_dir / "checkpoints").glob("step_*"))
    assert [c.name for c in checkpoints] == ["step_00000064", "step_00000128"]
    assert all((c / "manifest.json").is_file() for c in checkpoints)
    assert (run_dir / "metrics.png").stat().st_size > 10_000
    assert (run_dir / "plan.json").is_file() and (run_dir / "logs" / "rank1.log").is_file()
    out = proc.stdout + proc.stderr
    assert "test AUC" in out and "epoch 2/2" in out
    # comm.count_bytes: what each rank handed to each collective per step, by kind (uncompressed here)
    sent = epochs[-1]["comm_bytes_per_step"]
    assert sent["all_reduce fp32 (MLP)"] > 0 and sent["all_to_all (model-parallel)"] > 0, sent


def test_repeated_overrides_travel_as_one_flag():
    from dqrm.pipeline.launch import merge_overrides

    args = ["--config", "tiny", "--set", "a=1", "--epochs", "2", "--set", "b=2", "c=3"]
    assert merge_overrides(args) == ["--config", "tiny", "--set", "a=1", "b=2", "c=3", "--epochs", "2"]
    assert merge_overrides(["--epochs", "2"]) == ["--epochs", "2"]


def test_a_second_run_dir_is_refused_before_torchx_starts(tmp_path, capsys):
    from dqrm.pipeline.launch import main

    for named in (["--run-dir", str(tmp_path / "b")], ["--set", f"run_dir={tmp_path / 'b'}"]):
        with pytest.raises(SystemExit) as refused:
            main(["--run-dir", str(tmp_path / "a"), "--", "--config", "tiny", *named])
        assert refused.value.code == 2
        assert "give the run dir once, as --run-dir before --" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_rerun_resumes_from_latest_checkpoint(finished_run):
    run_dir, cache, _ = finished_run
    proc = _launch(run_dir, cache, "--epochs", "3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming at epoch 3 (step 128)" in proc.stdout + proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [e["epoch"] for e in summary["epochs"]] == [1, 2, 3]
    assert summary["epochs"][2]["step"] == 192


def test_missing_inputs_are_refused_before_anything_starts(tmp_path):
    run = tmp_path / "run"
    proc = _launch(run, tmp_path / "cache", "--data-dir", str(tmp_path / "nowhere"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: --data-dir {tmp_path / 'nowhere'}: no such folder")
    assert not run.exists() and "torchx" not in proc.stdout  # neither torchx nor a worker was started
    (tmp_path / "empty").mkdir()
    proc = _launch(run, tmp_path / "cache", "--data-dir", str(tmp_path / "empty"))
    assert proc.returncode == 2 and "no train.parquet" in proc.stderr and not run.exists()
    proc = _launch(run, tmp_path / "cache", "--set", f"data.row_map={tmp_path / 'gone.npz'}")
    assert proc.returncode == 2 and "data.row_map" in proc.stderr and "no such file" in proc.stderr


def test_failed_job_exits_nonzero(tmp_path):
    # inputs that exist but that a worker cannot read: the job fails in the workers, and says where their logs are
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "val", "test"):
        (data / f"{split}.parquet").write_text("not parquet")
    proc = _launch(tmp_path / "run", tmp_path / "cache", "--data-dir", str(data))
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "train.parquet" in out and "Parquet" in out
    run = tmp_path / "run"
    assert f"rank logs are in {run / 'torchx'} and {run / 'logs'}" in out, out[-2000:]


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a read-only bind or a tmpfs needs root")


@needs_root
def test_a_run_dir_that_refuses_writes_is_refused_before_torchx_starts(tmp_path):
    """A read-only run dir (found by bench.faults: torchx's own traceback, then a pointer to logs it could not write)
    and a full disk are named in one line, before torchx or a worker starts."""
    run = tmp_path / "run"
    run.mkdir()
    subprocess.run(["mount", "--bind", "-o", "ro", str(run), str(run)], check=True)
    try:
        proc = _launch(run, tmp_path / "cache")
    finally:
        subprocess.run(["umount", "-l", str(run)], check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {run}") and "the file system is read-only" in last and "rerun" in last, last
    assert "torchx" not in proc.stdout and not (run / "torchx").exists()
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(full)], check=True)
    try:
        refused = write_refused(full / "run")
    finally:
        subprocess.run(["umount", "-l", str(full)], check=False)
    assert refused is not None and "the disk is full" in refused and str(full / "run") in refused, refused

"""Faults: a worker SIGKILLed mid-epoch is restarted by torchrun and the job ends exactly where an uninterrupted run
does; checkpoints written at one world size resume at another, every weight as saved."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.dist_utils import run_distributed

ROOT = Path(__file__).resolve().parents[2]
# Evaluation limited to each rank's first batch: rank 1's rows are then not the split's next rows, which the export
# check must still compare with the artifact row for row.
ARGS = ["--config", "tiny", "--epochs", "2", "--limit-eval-batches", "1", "--set", "checkpoint_every_steps=16",
        "data.eval_batch_size=1024"]


def _launch(run_dir: Path, cache: Path, *train_args: str, nproc: int = 2, retries: int = 0, env=None):
    cmd = [sys.executable, "-m", "dqrm.pipeline.launch", "--run-dir", str(run_dir), "--nproc", str(nproc),
           "--max-retries", str(retries), "--", *train_args]
    full_env = {**os.environ, "DQRM_CACHE_DIR": str(cache), **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=900)


def _metrics(run_dir: Path) -> list[dict]:
    return [{k: e[k] for k in ("epoch", "step", "train_loss", "val", "test")}
            for e in json.loads((run_dir / "summary.json").read_text())["epochs"]]


# row-wise Adagrad on every table (fused on the sharded ones, TorchRec's on the two data-parallel ones) with Adam or
# Adagrad on the MLPs: their state is part of what a restart must read back
ADAGRAD = ["optim.embedding=rowwise_adagrad", "optim.embedding_lr=0.1", "optim.lr=0.01", "plan.data_parallel_max_rows=4"]


@pytest.mark.parametrize("settings", [["comm.dense=fp32"], ["comm.dense=int8_ef"],
                                      ["comm.dense=fp32", *ADAGRAD, "optim.dense=adam"],
                                      ["comm.dense=fp32", *ADAGRAD, "optim.dense=adagrad"]],
                         ids=["sgd", "sgd-int8_ef", "rowwise_adagrad-adam", "rowwise_adagrad-adagrad"])
def test_killed_worker_restarts_and_matches_uninterrupted_run(settings, tmp_path):
    """Also with INT8 MLP gradients, whose error-feedback residuals are part of the training state, and with
    optimizers that keep state; under each, the exported INT4 artifact is the model the job evaluated."""
    cache, args = tmp_path / "cache", [*ARGS, *settings]
    clean = _launch(tmp_path / "clean", cache, *args)
    assert clean.returncode == 0, clean.stderr[-3000:]
    optimizers = "every table row-wise Adagrad" if ADAGRAD[0] in settings else "every table SGD"
    assert optimizers in (tmp_path / "clean" / "logs" / "rank0.log").read_text()
    killed = _launch(tmp_path / "killed", cache, *args, retries=1,
                     env={"DQRM_FAULT_KILL_AT_STEP": "40", "DQRM_FAULT_KILL_RANK": "1"})
    out = killed.stdout + killed.stderr
    assert killed.returncode == 0, out[-3000:]
    assert "fault injection: killing rank 1 at step 40" in (tmp_path / "killed" / "logs" / "rank1.log").read_text()
    assert "restarting from the latest checkpoint" in out and "attempt 2 of 2" in out
    assert "resuming at epoch 1 (step 32)" in out  # the last checkpoint before the kill, mid-epoch
    assert "skipping the 32 batches trained before the restart" in out
    # Deterministic training: identical numbers, not merely close.
    assert _metrics(tmp_path / "killed") == _metrics(tmp_path / "clean")
    # The resumed job's artifact is the model it evaluated, compared on the rows evaluation scored.
    export = json.loads((tmp_path / "killed" / "summary.json").read_text())["export"]
    assert export["test"]["rows"] == 2048 and export["max_abs_logit_diff_vs_fake_quant"] <= 1e-5


def _resumed_by_the_job(rank, world_size, checkpoints, scratch):
    """What a job at this world size holds once it has resumed, before any training step: the job's own model
    (pipeline.train's builder: plan, DMP, QAT, gradient hooks, optimizer) restored by the job's Trainer from
    ``checkpoints``; whole tables and weights gathered on rank 0, with those of the same model before the resume."""
    from dqrm.pipeline.checkpoint import Checkpointer
    from dqrm.pipeline.configs import get_config
    from dqrm.pipeline.train import build_sharded_model
    from dqrm.pipeline.trainer import Trainer
    from dqrm.quant.convert import gather_full_state

    cfg = get_config("tiny")
    cfg.run_dir = scratch  # the builder writes plan.json and config.json there, not into the run dir under test
    cpu = torch.device("cpu")
    model, optimizer, _, comm_state = build_sharded_model(cfg, rank, world_size, cpu)
    fresh = gather_full_state(model)
    trainer = Trainer(cfg, model, optimizer, cpu, None, Checkpointer(Path(checkpoints), extra=comm_state), rank=rank)
    assert trainer.resume()
    resumed = gather_full_state(model)
    return {"fresh": fresh, "resumed": resumed, "step": trainer.step, "epoch": trainer.start_epoch} if rank == 0 \
        else None


def _saved(checkpoint: Path, out: Path) -> dict[str, torch.Tensor]:
    """The model state in a checkpoint, read without the job's loader: DCP's own conversion to one torch.save file
    of whole tensors."""
    dcp_to_torch_save(checkpoint, out)
    return torch.load(out, weights_only=False)["model"]


def test_checkpoint_reshards_between_world_sizes(tmp_path):
    cache = tmp_path / "cache"
    for first, second in ((2, 1), (1, 2)):
        run = tmp_path / f"ws{first}to{second}"
        a = _launch(run, cache, "--config", "tiny", "--epochs", "1", nproc=first)
        assert a.returncode == 0, a.stderr[-3000:]
        [checkpoint] = sorted((run / "checkpoints").glob("step_*"))
        steps = 16384 // (128 * first)  # one epoch of the tiny config's rows, 128 per rank per step
        assert checkpoint.name == f"step_{steps:08d}"
        saved = _saved(checkpoint, tmp_path / f"saved_ws{first}.pt")
        scratch = tmp_path / f"scratch{first}to{second}"
        scratch.mkdir()
        out = run_distributed(_resumed_by_the_job, str(run / "checkpoints"), str(scratch), world_size=second)[0]
        assert (out["step"], out["epoch"]) == (steps, 1)
        # Every table row, MLP weight and quantizer scale is the saved one, though other ranks now hold them...
        assert out["resumed"].keys() == saved.keys()
        for key, value in saved.items():
            assert torch.equal(out["resumed"][key], value), key
        # ... and came from the checkpoint: an epoch of training moved every table and MLP weight off its start.
        unmoved = [k for k, v in saved.items() if k.startswith("model.") and torch.equal(out["fresh"][k], v)]
        assert not unmoved, unmoved
        first_epoch = json.loads((run / "summary.json").read_text())["epochs"]

        b = _launch(run, cache, "--config", "tiny", "--epochs", "2", nproc=second)
        out = b.stdout + b.stderr
        assert b.returncode == 0, out[-3000:]
        assert f"resuming at epoch 2 (step {steps})" in out
        summary = json.loads((run / "summary.json").read_text())
        assert summary["epochs"][:1] == first_epoch and summary["world_size"] == second
        assert [e["epoch"] for e in summary["epochs"]] == [1, 2]
        # Epoch 2 starts from epoch 1's weights: its loss continues from there rather than from scratch.
        assert summary["epochs"][1]["train_loss"] < summary["epochs"][0]["train_loss"]


def test_a_mid_epoch_checkpoint_resumes_only_at_its_world_size(tmp_path):
    """Each rank reads its own slice of an epoch in its own order: a mid-epoch checkpoint written at world size 2
    cannot continue its epoch at world size 1, and the job says so instead of training other rows."""
    cache, run = tmp_path / "cache", tmp_path / "run"
    args = ["--config", "tiny", "--epochs", "1", "--set", "checkpoint_every_steps=16"]
    killed = _launch(run, cache, *args, env={"DQRM_FAULT_KILL_AT_STEP": "40", "DQRM_FAULT_KILL_RANK": "1"})
    assert killed.returncode != 0 and (run / "checkpoints" / "step_00000032" / "manifest.json").is_file()
    other = _launch(run, cache, *args, nproc=1)
    out = other.stdout + other.stderr
    assert other.returncode != 0
    assert "written mid-epoch (epoch 1, 32 batches done) at world size 2; this job runs at world size 1" in out
    assert "resuming at" not in out

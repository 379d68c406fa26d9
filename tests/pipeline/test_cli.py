"""Resuming a run dir through the command line: a vocabulary job and a budgeted vocabulary job resume (their table
sizes come from the vocabulary before the run dir's config is compared), a resume may change what
``RESUME_MAY_CHANGE`` lists (the evaluation batch size among them, also for a budget's saved choice), and the same
run dir spelled relative or absolute is the same run dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dqrm.datasets.convert import main as convert
from dqrm.pipeline import train

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT.parent / "shared" / "data" / "criteo-samples" / "kaggle_dac_train_head900.tsv"
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
needs_sample = pytest.mark.skipif(not SAMPLE.is_file(), reason=f"Criteo sample not found at {SAMPLE}")


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("kaggle")
    assert convert([str(SAMPLE), "--out", str(data), "--split", "kaggle", "--vocab-min-count", "2"]) == 0
    return data


def _job(data: Path, *extra: str) -> list[str]:
    return ["--config", "tiny", "--data-dir", str(data), "--limit-eval-batches", "2",
            "--set", f"data.vocab_dir={data / 'vocab'}", "data.batch_size=32", *extra]


def _epochs(run_dir: Path) -> list[int]:
    return [e["epoch"] for e in json.loads((run_dir / "summary.json").read_text())["epochs"]]


@needs_sample
def test_a_vocabulary_job_resumes(converted, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train.main([*_job(converted), "--run-dir", str(run_dir), "--epochs", "1"]) == 0
    assert any((run_dir / "checkpoints").glob("step_*/manifest.json"))
    capsys.readouterr()
    # the same job, one epoch longer and evaluated in other batches: resumed, not refused as another job's
    assert train.main([*_job(converted, "data.eval_batch_size=64"), "--run-dir", str(run_dir), "--epochs", "2"]) == 0
    assert "holds checkpoints of another job" not in capsys.readouterr().err
    assert _epochs(run_dir) == [1, 2]
    # what may not change is still refused, by name
    assert train.main([*_job(converted, "seed=7"), "--run-dir", str(run_dir), "--epochs", "3"]) == 2
    assert "seed: 0 in the run dir, 7 now" in capsys.readouterr().err


@needs_sample
def test_a_budgeted_vocabulary_job_resumes_with_its_choice_however_the_run_dir_is_spelled(
        converted, tmp_path, monkeypatch, capsys):
    # the MLPs and the file take 144,424 bytes here and the vocabulary's FP32 tables about 83,000: a budget that
    # makes the search choose fewer bits for some tables
    budget = ("quant.budget_bytes=165000", "quant.budget_warmup_steps=10", "quant.budget_eval_rows=256")
    run_dir = tmp_path / "run"
    assert train.main([*_job(converted, *budget), "--run-dir", str(run_dir), "--epochs", "1"]) == 0
    plan = (run_dir / "budget.json").read_text()
    assert len({t["bits"] for t in json.loads(plan)["tables"]}) >= 2
    capsys.readouterr()
    # now relative to the working directory, with another evaluation batch size (a field a resume may change)
    monkeypatch.chdir(tmp_path)
    assert train.main([*_job(converted, *budget, "data.eval_batch_size=64"), "--run-dir", "run",
                       "--epochs", "2"]) == 0
    err = capsys.readouterr().err
    assert "holds checkpoints of another job" not in err
    assert (run_dir / "budget.json").read_text() == plan  # the saved choice was reused, not searched again
    assert _epochs(run_dir) == [1, 2]


def test_a_run_dir_written_before_a_field_existed_resumes(tmp_path, capsys):
    """A config.json without a field added later (here the model's arch fields) was written by a job that ran as
    their defaults: it resumes; a field it holds that differs is still refused."""
    run_dir = tmp_path / "run"
    tiny = ["--config", "tiny", "--limit-eval-batches", "1", "--limit-train-batches", "8"]
    assert train.main([*tiny, "--run-dir", str(run_dir), "--epochs", "1"]) == 0
    saved = json.loads((run_dir / "config.json").read_text())
    for field in ("arch", "dcn_num_layers", "dcn_low_rank_dim"):
        del saved["model"][field]
    (run_dir / "config.json").write_text(json.dumps(saved))
    capsys.readouterr()
    assert train.main([*tiny, "--run-dir", str(run_dir), "--epochs", "2"]) == 0, capsys.readouterr().err[-2000:]
    assert _epochs(run_dir) == [1, 2]
    assert train.main([*tiny, "--run-dir", str(run_dir), "--epochs", "3", "--set", "model.arch=dcn"]) == 2
    assert "model.arch: 'dlrm' in the run dir, 'dcn' now" in capsys.readouterr().err

"""Real Criteo lines end to end: convert the Kaggle sample with the Kaggle split and a frequency-thresholded
vocabulary, train the `kaggle` config on it through the launcher (2 workers), export, and score with `predict`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from datasets.convert import main as convert
from datasets.vocab import vocab_num_embeddings
from pipeline.predict import main as predict

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT.parent / "shared" / "data" / "criteo-samples" / "kaggle_dac_train_head900.tsv"
pytestmark = pytest.mark.skipif(not SAMPLE.is_file(), reason=f"Criteo sample not found at {SAMPLE}")


def test_kaggle_config_trains_on_converted_data_with_a_vocabulary(tmp_path, capsys):
    data = tmp_path / "kaggle"
    assert convert([str(SAMPLE), "--out", str(data), "--split", "kaggle", "--vocab-min-count", "2"]) == 0
    sizes = vocab_num_embeddings(data / "vocab")
    assert len(sizes) == 26 and max(sizes) < 900 and min(sizes) >= 1

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "pipeline.launch", "--run-dir", str(run_dir), "--nproc", "2", "--",
           "--config", "kaggle", "--data-dir", str(data), "--epochs", "1",
           "--set", f"data.vocab_dir={data / 'vocab'}", "data.batch_size=32", "data.eval_batch_size=32"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "table sizes from the vocabulary" in proc.stderr

    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["num_embeddings"] == sizes
    test = summary["epochs"][0]["test"]
    assert test["rows"] > 0 and 0 < test["logloss"] < 5
    exported = summary["export"]
    assert exported["bits"] == 4 and exported["max_abs_logit_diff_vs_fake_quant"] < 1e-5

    artifact = Path(exported["path"])
    manifest = json.loads(artifact.with_name(artifact.name + ".json").read_text())
    assert manifest["vocab_dir"] == str((data / "vocab").resolve())
    capsys.readouterr()
    test_files = sorted(str(p) for p in [data / "test.parquet"] if p.is_file()) or \
        sorted(str(p) for p in (data / "test").rglob("*.parquet"))
    assert predict(["--model", str(artifact), "--data", *test_files, "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    # predict maps ids through the manifest's vocabulary: the same model on the same rows gives the same metrics
    assert scored["rows"] == exported["test"]["rows"], "the job's test evaluation and predict scored other rows"
    assert np.isclose(scored["auc"], exported["test"]["auc"], atol=1e-6)

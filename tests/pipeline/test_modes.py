"""The quantization modes of a job: ``ptq`` trains exactly as ``fp32`` does, evaluates on the integer grid after each
epoch, and exports the model it evaluated."""

from __future__ import annotations

import json

from dqrm.pipeline import train

TINY = ["--config", "tiny", "--epochs", "1", "--limit-train-batches", "8", "--limit-eval-batches", "1"]


def test_ptq_trains_in_float_and_exports_what_it_evaluated(tmp_path):
    for mode in ("fp32", "ptq"):
        assert train.main([*TINY, "--run-dir", str(tmp_path / mode), "--set", f"quant_mode={mode}"]) == 0
    fp32, ptq = (json.loads((tmp_path / m / "summary.json").read_text()) for m in ("fp32", "ptq"))
    a, b = fp32["epochs"][0], ptq["epochs"][0]
    # fake-quant stays off while training: the same losses and float metrics, bit for bit
    assert a["train_loss"] == b["train_loss"] and a["val"] == b["val"] and a["test"] == b["test"]
    assert "ptq_val" not in a and not fp32["export"] and not (tmp_path / "fp32" / "model_int4.pt").exists()
    # the integer grid changes what evaluation sees, and the artifact is that model
    assert b["ptq_val"]["logloss"] != b["val"]["logloss"]
    assert ptq["export"]["max_abs_logit_diff_vs_fake_quant"] <= 1e-5
    assert ptq["export"]["test"] == b["ptq_test"]
    assert (tmp_path / "ptq" / "model_int4.pt").is_file()

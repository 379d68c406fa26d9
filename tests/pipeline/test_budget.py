"""A byte budget end to end: the search chooses mixed bits and shared rows, the artifact fits the budget and serves
exactly the evaluated model (its own row map included), at world size 1 and 2; a resume reuses the choice."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dqrm.datasets.row_map import load_row_map
from dqrm.pipeline import predict, train
from dqrm.pipeline.configs import TINY_CARDINALITIES, tiny
from dqrm.pipeline.model import build_dlrm
from dqrm.quant.budget import ARTIFACT_OVERHEAD, PRIOR_LOSS
from dqrm.quant.export import load_with_manifest

ROOT = Path(__file__).resolve().parents[2]
RATIO = 0.15
BUDGET = ["--config", "tiny", "--epochs", "1", "--limit-eval-batches", "2",
          "--set", f"quant.budget_ratio={RATIO}", "quant.budget_warmup_steps=30", "quant.budget_eval_rows=2048"]


def _check_budgeted_run(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    plan = json.loads((run_dir / "budget.json").read_text())
    export, budget = summary["export"], summary["budget"]
    sizes = export["sizes"]
    # the budget is a fraction of the float model as configured (every row), tables and MLPs at 4 bytes a value
    model = build_dlrm(tiny().model, torch.device("cpu"))
    mlp_values = sum(p.numel() for arch in (model.model.dense_arch, model.model.over_arch) for p in arch.parameters())
    assert plan["fp32_bytes"] == 4 * (16 * sum(TINY_CARDINALITIES) + mlp_values)
    assert plan["budget_bytes"] == int(RATIO * plan["fp32_bytes"])
    assert sizes["fp32_bytes"] < plan["fp32_bytes"]  # the trained float model: shared rows instead of rare ones
    assert plan["fixed_bytes"] == sizes["mlp_bytes"] + ARTIFACT_OVERHEAD
    # what is served fits, row map included, and is the evaluated model
    assert "model_int4.rowmap.npz" in sizes["files"] and sizes["artifact_bytes"] == sum(sizes["files"].values())
    assert sizes["artifact_bytes"] <= plan["predicted_bytes"] <= plan["budget_bytes"]
    assert budget["fits"] and budget["artifact_bytes"] == sizes["artifact_bytes"]
    assert export["max_abs_logit_diff_vs_fake_quant"] <= 1e-5
    assert export["test"] == summary["epochs"][-1]["test"]
    # a real mix: this budget needs both fewer bits and shared rows, and the job trained what was chosen
    tables = plan["tables"]
    assert len({t["bits"] for t in tables}) >= 2 and plan["mapped_tables"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["quant"]["table_bits"] == {t["table"]: t["bits"] for t in tables}
    assert config["model"]["num_embeddings"] == [t["kept_rows"] for t in tables]
    row_map = load_row_map(run_dir / "model_int4.rowmap.npz")
    assert row_map.num_embeddings() == config["model"]["num_embeddings"]
    for t in tables:  # every measured option is on record, and the choice's damage is the one measured for it
        damage = plan["damage"]
        assert set(damage["bits"][t["table"]]) == {"8", "4", "2"}
        expected = damage["bits"][t["table"]][str(t["bits"])]
        if t["min_count"]:
            expected += damage["min_count"][t["table"]][str(t["min_count"])][1]
            assert t["kept_rows"] == damage["min_count"][t["table"]][str(t["min_count"])][0] + 1
        assert t["sensitivity"] == pytest.approx(expected)
        # the noise is the largest measured gain; the cost adds the share of lookups lost
        counted = expected if expected > plan["noise_floor"] else 0.0
        assert t["cost"] == pytest.approx(counted + PRIOR_LOSS * t["prior"])
    measured = [v for m in plan["damage"]["bits"].values() for v in m.values()]
    measured += [v for m in plan["damage"]["min_count"].values() for _, v in m.values()]
    assert plan["noise_floor"] == max(0.0, -min(measured))
    return summary


def test_budget_at_world_size_1_fits_serves_exactly_and_resumes(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    assert train.main([*BUDGET, "--run-dir", str(run_dir)]) == 0
    summary = _check_budgeted_run(run_dir)
    assert summary["budget"]["search_seconds"] > 0 and summary["budget"]["evaluations"] > 26
    # the size line compares the artifact with the FP32 model the user configured, not the budget's smaller one
    configured, artifact = summary["budget"]["fp32_bytes"], summary["export"]["sizes"]["artifact_bytes"]
    sizes_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("sizes: "))
    assert sizes_line.startswith(f"sizes: FP32 {configured / 1e6:.1f} MB as configured"), sizes_line
    assert f"({configured / artifact:.1f}x smaller than FP32)" in sizes_line, sizes_line
    # predict's reading of the artifact (its manifest names the row map beside it) gives the QAT model's logits
    test_file = summary["test_files"][0]
    module, manifest = load_with_manifest(run_dir / "model_int4.pt")
    assert manifest["row_map"] == "model_int4.rowmap.npz"
    logits, _ = predict.score(module, [Path(test_file)], manifest["num_embeddings"], 1024, limit_rows=2048,
                              row_map=str(run_dir / manifest["row_map"]))
    reference = torch.load(run_dir / "export_check.pt")["logits"]
    assert reference.numel() == 2048 and float((logits - reference).abs().max()) <= 1e-5
    capsys.readouterr()
    assert predict.main(["--model", str(run_dir / "model_int4.pt"), "--data", test_file, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 4096
    # a second run in the same dir (one more epoch) reuses the choice and resumes the checkpoint, also with the run
    # dir spelled relative this time (the saved row map's path is absolute) and another evaluation batch size
    plan_before = (run_dir / "budget.json").read_text()
    monkeypatch.chdir(tmp_path)
    assert train.main([*BUDGET, "--run-dir", "run", "--epochs", "2", "--set", "data.eval_batch_size=512"]) == 0
    assert (run_dir / "budget.json").read_text() == plan_before
    resumed = _check_budgeted_run(run_dir)
    assert [e["epoch"] for e in resumed["epochs"]] == [1, 2]
    # the run dir copied elsewhere resumes too: its config names the row map inside it, which moved with it
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    capsys.readouterr()
    assert train.main([*BUDGET, "--run-dir", str(moved), "--epochs", "3"]) == 0, capsys.readouterr().err[-2000:]
    assert [e["epoch"] for e in _check_budgeted_run(moved)["epochs"]] == [1, 2, 3]
    # a damaged row map is refused before anything starts: the checkpoints were trained with the recorded one
    data = bytearray((moved / "row_map.npz").read_bytes())
    data[len(data) // 2] ^= 0x01
    (moved / "row_map.npz").write_bytes(bytes(data))
    capsys.readouterr()
    assert train.main([*BUDGET, "--run-dir", str(moved), "--epochs", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {moved / 'row_map.npz'}: checksum does not match budget.json's record"), err


def test_budget_at_world_size_2_serves_exactly(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "DQRM_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "dqrm.pipeline.launch", "--run-dir", str(run_dir), "--nproc", "2", "--", *BUDGET]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = _check_budgeted_run(run_dir)
    assert summary["world_size"] == 2


def test_budget_refuses_table_bits_and_fp32(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    assert train.main([*BUDGET, "--run-dir", run_dir, "--set", "quant.table_bits=t_cat_3:8"]) == 2
    assert "quant.table_bits and a byte budget both set" in capsys.readouterr().err
    assert train.main([*BUDGET, "--run-dir", run_dir, "--set", "quant_mode=fp32"]) == 2
    assert "use quant_mode qat or ptq" in capsys.readouterr().err
    assert train.main([*BUDGET, "--run-dir", run_dir, "--set", "quant.budget_bytes=1000"]) == 2
    assert "set one of budget_bytes and budget_ratio" in capsys.readouterr().err
    assert not np.any([p.name == "budget.json" for p in Path(run_dir).glob("*")])

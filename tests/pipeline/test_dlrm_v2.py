"""The ``dlrm_v2`` configs: MLPerf DLRMv2's model (TorchRec's DLRM_DCN) as the job builds it, and the tiny variant's
job run end to end through the launcher (two workers): trained, its cross layers served as integers, the
artifact's logits the fake-quant model's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from dqrm.pipeline.configs import DLRMV2_CAP, DLRMV2_CARDINALITIES, get_config
from dqrm.pipeline.model import build_dlrm
from dqrm.quant.export import load_with_manifest

ROOT = Path(__file__).resolve().parents[2]


def test_dlrm_v2_has_mlperf_dlrmv2_layer_sizes_with_capped_tables():
    cfg = get_config("dlrm_v2")
    dlrm = build_dlrm(cfg.model, torch.device("meta")).model
    assert type(dlrm).__name__ == "DLRM_DCN"
    assert cfg.model.num_embeddings == tuple(min(n, DLRMV2_CAP) for n in DLRMV2_CARDINALITIES)
    tables = sum(p.numel() for p in dlrm.sparse_arch.parameters())
    assert tables * 4 / 1e9 < 1.0  # FP32 tables of both ranks together: about 0.88 GB
    linears = [(m.in_features, m.out_features) for m in dlrm.modules() if isinstance(m, torch.nn.Linear)]
    assert linears == [(13, 512), (512, 256), (256, 128), (3456, 1024), (1024, 1024), (1024, 512), (512, 256),
                       (256, 1)]
    cross = sum(p.numel() for p in dlrm.inter_arch.crossnet.parameters())
    assert cross == 3 * (2 * 3456 * 512 + 3456)  # the 10.6M weights quantized as the MLPs are


def test_dlrm_v2_tiny_job_trains_and_serves_its_cross_layers_as_integers(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "DQRM_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "dqrm.pipeline.launch", "--run-dir", str(run_dir), "--nproc", "2", "--",
           "--config", "dlrm_v2_tiny", "--epochs", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    export = summary["export"]
    assert export["max_abs_logit_diff_vs_fake_quant"] <= 1e-5
    assert export["test"] == summary["epochs"][0]["test"] and export["test"]["auc"] > 0.55
    assert export["program"] is None  # no torch.export program for DLRM_DCN (quant.export)
    module, manifest = load_with_manifest(Path(export["path"]))
    assert manifest["arch"] == "dcn"
    codes = [name for name, b in module.named_buffers() if name.endswith("codes") and b.dtype == torch.int8]
    assert len(codes) == 2 + 2 * 2 + 2  # bottom MLP, two cross layers of two kernels, top MLP
    assert sum("crossnet" in name for name in codes) == 4

"""The scripts in ``examples/`` run as a user runs them (a subprocess, from another folder) and print what they
promise: the own-loop example's artifact serves its fake-quant logits; the serving example, importing only torch and
fbgemm_gpu, turns raw Criteo lines into the click probabilities the training job evaluated for the same rows."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(args: list[str], cwd: Path) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_own_training_loop_exports_an_artifact_that_serves_the_fake_quant_logits(tmp_path):
    out = _run([str(EXAMPLES / "own_training_loop.py"), "--out", str(tmp_path / "art"), "--steps", "12"], tmp_path)
    losses = [float(x) for x in re.findall(r"^step +\d+ +loss (\S+)$", out, re.M)]
    assert len(losses) == 4 and all(0 < x < 2 for x in losses), out
    diffs = dict(re.findall(r"^(model_int4\.pt2?): max \|artifact - fake-quant\| logit difference (\S+) over 512 "
                            r"rows$", out, re.M))
    assert set(diffs) == {"model_int4.pt", "model_int4.pt2"}, out
    assert all(float(d) <= 1e-5 for d in diffs.values()), diffs
    assert {p.name for p in (tmp_path / "art").iterdir()} >= {"model_int4.pt", "model_int4.rows", "model_int4.pt2"}


def criteo_lines(parquet: Path, rows: int) -> list[str]:
    """The first ``rows`` rows of a dqrm Parquet file as raw Criteo lines (label, counts, 8-hex-digit hashes)."""
    table = pq.read_table(parquet).slice(0, rows).to_pydict()
    columns = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
    lines = []
    for r in range(rows):
        fields = []
        for c in columns:
            v = table[c][r]
            fields.append("" if v is None else f"{v:08x}" if c.startswith("C") else str(v))
        lines.append("\t".join(fields))
    return lines


SERVE_ONLY_TORCH = """
import runpy, sys
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"dqrm", "torchrec", "pyarrow", "pandas"})
assert not loaded, f"the serving example imported {loaded}"
"""


def test_serve_artifact_prints_the_jobs_evaluated_probabilities_for_raw_rows(tiny_run, tmp_path):
    reference = torch.load(tiny_run / "export_check.pt")["logits"]  # the QAT model's logits, first 1024 test rows
    test_file = Path(json.loads((tiny_run / "summary.json").read_text())["test_files"][0])
    rows = tmp_path / "rows.tsv"
    lines = criteo_lines(test_file, reference.numel())
    assert any("\t\t" in line for line in lines)  # missing counts and categoricals are part of the check
    rows.write_text("\n".join(lines) + "\n")
    expected = torch.sigmoid(reference)
    for model in ("model_int4.pt", "model_int4.pt2"):  # run from another folder: the rows file is found beside it
        out = _run(["-c", SERVE_ONLY_TORCH, str(EXAMPLES / "serve_artifact.py"), str(tiny_run / model), str(rows)],
                   tmp_path)
        served = torch.tensor([float(x) for x in out.split()], dtype=torch.float64)
        assert served.shape == expected.shape, (model, served.shape)
        assert float((served - expected.double()).abs().max()) <= 1e-5, (model, (served - expected).abs().max())
        assert served.unique().numel() > 100  # probabilities of the rows, not a constant


def test_serve_artifact_scores_its_sample_lines_and_refuses_a_modified_model(tiny_run, tmp_path):
    out = _run([str(EXAMPLES / "serve_artifact.py"), str(tiny_run / "model_int4.pt")], tmp_path)
    probabilities = [float(x) for x in out.split()]
    assert len(probabilities) == 3 and all(0 < p < 1 for p in probabilities), out
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("model_int4.pt", "model_int4.pt.json", "model_int4.rows"):
        (copy / name).write_bytes((tiny_run / name).read_bytes())
    with open(copy / "model_int4.rows", "r+b") as f:  # one flipped bit in the table rows
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    proc = subprocess.run([sys.executable, str(EXAMPLES / "serve_artifact.py"), str(copy / "model_int4.pt")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "SHA-256 differs from the manifest" in proc.stderr, proc.stderr[-2000:]

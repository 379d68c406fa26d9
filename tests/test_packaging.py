"""dqrm as a library: its wheel installs one top-level name, ``dqrm`` (the source folders become ``dqrm.datasets``,
``dqrm.pipeline``, ...), with every package and the license; installed into a fresh environment beside another
distribution named ``datasets`` (Hugging Face's name), that one still imports as itself and a dqrm job runs from a
folder outside the repository, through the documented install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("datasets", "pipeline", "quant", "sharding", "torchx_components")


def _pip(python: Path | str, *args: str, cwd: Path | None = None) -> None:
    proc = subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", "install", "--quiet", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return next(out.glob("dqrm-*.whl"))


def test_the_wheel_installs_dqrm_only_with_every_package_and_the_license(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"dqrm", wheel.name.split("-py3")[0] + ".dist-info"}
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(("dqrm", *p.parent.relative_to(ROOT).parts))
               for s in SOURCES for p in (ROOT / s).rglob("__init__.py")}
    assert set(declared["packages"]) == on_disk  # a new sub-package must be listed, or it would not be installed
    for package in on_disk:
        assert f"{package.replace('.', '/')}/__init__.py" in names, package
    assert any(n.endswith("licenses/LICENSE") for n in names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "License-Expression: BSD-3-Clause" in metadata


def test_installed_beside_a_datasets_distribution_both_work(wheel, tmp_path):
    """The documented install (README, "Install") into a fresh venv, plus a stand-in distribution named
    ``datasets``; then, from a folder outside the repository, ``import datasets`` is the stand-in and the tiny job runs
    through dqrm's launcher (2 workers) to its exported artifact."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    _pip(python, f"{wheel}[cpu]")
    torchrec = subprocess.run([sys.executable, str(ROOT / "scripts" / "requirements.py"), "torchrec"],
                              capture_output=True, text=True, check=True).stdout.strip()
    _pip(python, "--no-deps", torchrec)
    standin = tmp_path / "standin"
    (standin / "datasets").mkdir(parents=True)
    (standin / "datasets" / "__init__.py").write_text('WHO = "the other datasets"\n')
    (standin / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools>=77"]\n'
                                            'build-backend = "setuptools.build_meta"\n'
                                            '[project]\nname = "datasets"\nversion = "99.0"\n'
                                            '[tool.setuptools]\npackages = ["datasets"]\n')
    _pip(python, str(standin))

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["DQRM_CACHE_DIR"] = str(tmp_path / "cache")
    probe = ("import datasets, dqrm.datasets.schema as s, dqrm.quant.api; "
             "print(datasets.WHO); print(s.__file__)")
    out = subprocess.run([str(python), "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    who, where = out.stdout.split("\n")[:2]
    assert who == "the other datasets" and where.startswith(str(venv)), out.stdout
    run = tmp_path / "run"
    job = subprocess.run([str(python), "-m", "dqrm.pipeline.launch", "--run-dir", str(run), "--nproc", "2", "--",
                          "--config", "tiny", "--epochs", "1"], cwd=elsewhere, env=env, capture_output=True,
                         text=True, timeout=900)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["export"]["max_abs_logit_diff_vs_fake_quant"] <= 1e-5 and (run / "model_int4.pt").is_file()

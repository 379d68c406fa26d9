"""Print the pip requirement lines of one install step, read from pyproject.toml (used by the Makefile)."""

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path


def has_nvidia_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    return bool(smi) and subprocess.run([smi, "-L"], capture_output=True).returncode == 0


def main(step: str) -> None:
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    pins = project["tool"]["dqrm"]
    if step == "deps":
        lines = project["project"]["dependencies"] + project["project"]["optional-dependencies"]["test"]
        lines.append(pins["fbgemm_cuda"] if has_nvidia_gpu() else pins["fbgemm_cpu"])
    elif step == "nodeps":
        lines = [pins["torchrec"]]
    else:
        raise SystemExit(f"unknown step {step!r}: use deps or nodeps")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1])

"""Print one install step's pip requirement lines, read from pyproject.toml (used by the Makefile and Dockerfile)."""

import argparse
import shutil
import subprocess
import tomllib
from pathlib import Path


def has_nvidia_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    return bool(smi) and subprocess.run([smi, "-L"], capture_output=True).returncode == 0


def requirements(step: str, fbgemm: str | None = None) -> list[str]:
    """The requirement lines of ``step``; ``fbgemm`` ("cpu" or "cuda") picks the FBGEMM wheel, else the machine does."""
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    pins = project["tool"]["dqrm"]
    if step == "nodeps":
        return [pins["torchrec"]]
    if fbgemm is None:
        fbgemm = "cuda" if has_nvidia_gpu() else "cpu"
    return [*project["project"]["dependencies"], *project["project"]["optional-dependencies"]["test"],
            pins[f"fbgemm_{fbgemm}"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("step", choices=["deps", "nodeps"],
                        help="deps: installed with their dependencies; nodeps: installed with --no-deps")
    # A container build has no GPU to look at, so the image's flavor is named explicitly.
    parser.add_argument("--fbgemm", choices=["cpu", "cuda"],
                        help="FBGEMM wheel (default: cuda where nvidia-smi lists a GPU, else cpu)")
    args = parser.parse_args()
    print("\n".join(requirements(args.step, args.fbgemm)))


if __name__ == "__main__":
    main()

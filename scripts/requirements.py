"""Print what one install step needs, read from pyproject.toml (used by the Makefile and the Dockerfile).

    python3 scripts/requirements.py flavor              # cpu or cuda: the extra that brings this machine's FBGEMM
    python3 scripts/requirements.py deps --fbgemm cpu   # what `pip install ".[cpu]"` installs besides dqrm itself
    python3 scripts/requirements.py torchrec            # TorchRec's pin, installed with --no-deps (its wheel names
                                                        # the CUDA fbgemm-gpu; on CPU fbgemm-gpu-cpu stands in)
"""

import argparse
import shutil
import subprocess
import tomllib
from pathlib import Path


def has_nvidia_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    return bool(smi) and subprocess.run([smi, "-L"], capture_output=True).returncode == 0


def project() -> dict:
    return tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]


def requirements(what: str, fbgemm: str | None = None) -> list[str]:
    """The requirement lines of ``what``; ``fbgemm`` ("cpu" or "cuda") picks the extra, else the machine does."""
    extras = project()["optional-dependencies"]
    if what == "torchrec":
        return [next(r for r in extras["cuda"] if r.startswith("torchrec"))]
    flavor = fbgemm or ("cuda" if has_nvidia_gpu() else "cpu")
    if what == "flavor":
        return [flavor]
    return [*project()["dependencies"], *extras[flavor]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["flavor", "deps", "torchrec"])
    # A container build has no GPU to look at, so the image's flavor is named explicitly.
    parser.add_argument("--fbgemm", choices=["cpu", "cuda"],
                        help="FBGEMM flavor (default: cuda where nvidia-smi lists a GPU, else cpu)")
    args = parser.parse_args()
    print("\n".join(requirements(args.what, args.fbgemm)))


if __name__ == "__main__":
    main()

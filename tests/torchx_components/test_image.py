"""The Dockerfile behind the component's ``image`` installs what ``make env`` installs (the README's install:
``.[FLAVOR]``, then TorchRec with --no-deps), pinned in one place (pyproject.toml)."""

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = ROOT / "scripts" / "requirements.py"


def requirement_lines(*args: str) -> list[str]:
    proc = subprocess.run([sys.executable, str(REQUIREMENTS), *args], capture_output=True, text=True, check=True)
    return proc.stdout.splitlines()


def requirement_name(line: str) -> str:
    return re.split(r"[<>=!~\[;\s]", line, maxsplit=1)[0].lower().replace("_", "-")


def pip_installs(commands: list[str]) -> list[tuple[tuple[str, ...], bool]]:
    """Each ``pip install`` in ``commands`` as (what it installs, whether it runs with --no-deps): a requirements file
    as the arguments of the requirements.py call that wrote it (``deps --fbgemm cpu``), an inline ``$(...)`` call as
    the same, and the project itself as ``("dqrm", EXTRAS)``; installing anything else, bar upgrading pip, is an
    error."""
    written, installs = {}, []
    for command in commands:
        for words in (shlex.split(part) for part in command.split("&&")):
            script = next((i for i, word in enumerate(words) if word.endswith("scripts/requirements.py")), None)
            if script is not None and ">" in words:
                arrow = words.index(">")
                written[words[arrow + 1]] = tuple(words[script + 1:arrow])
            elif "install" in words and any(Path(word).name in ("pip", "pip3") for word in words):
                if words[-2:] == ["--upgrade", "pip"]:
                    continue
                no_deps = "--no-deps" in words
                if "-r" in words:
                    installs.append((written[words[words.index("-r") + 1]], no_deps))
                    continue
                target = words[-1]
                inline = re.fullmatch(r"\$\((?:\$\(PYTHON\)|\S*python3?) scripts/requirements.py (\w+)\)", target)
                project = re.fullmatch(r"\.(?:\[(.*)\])?", target)
                assert inline or project, f"installs something other than requirements.py's lines: {shlex.join(words)}"
                installs.append(((inline.group(1),) if inline else ("dqrm", project.group(1) or ""), no_deps))
    return installs


def dockerfile_runs() -> list[str]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [line.removeprefix("RUN ") for line in text.splitlines() if line.startswith("RUN ")]


def makefile_env_recipe() -> list[str]:
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("$(STAMP):")) + 1
    recipe = []
    for line in lines[start:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip().replace("$$", "$"))  # make's escape of the shell's $
    return recipe


def dockerfile_args() -> dict[str, str | None]:
    args = {}
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("ARG "):
            name, _, default = line.removeprefix("ARG ").partition("=")
            args[name] = default or None
    return args


@pytest.mark.parametrize("fbgemm", ["cpu", "cuda"])
def test_requirements_are_what_the_extra_installs(fbgemm):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    other = {"cpu": "cuda", "cuda": "cpu"}[fbgemm]
    lines = requirement_lines("deps", "--fbgemm", fbgemm)
    assert lines == [*project["dependencies"], *project["optional-dependencies"][fbgemm]]  # = pip install ".[fbgemm]"
    fbgemm_pin = next(r for r in project["optional-dependencies"][fbgemm] if r.startswith("fbgemm"))
    assert fbgemm_pin not in project["optional-dependencies"][other]
    assert requirement_lines("torchrec") == [r for r in project["optional-dependencies"]["cuda"]
                                             if r.startswith("torchrec")]
    # Hugging Face's `datasets` is not a requirement (and dqrm's own installs as dqrm.datasets)
    assert "datasets" not in {requirement_name(line) for line in lines}


def test_dockerfile_installs_what_make_env_installs():
    make, docker = pip_installs(makefile_env_recipe()), pip_installs(dockerfile_runs())
    # make env: the README's install, editable, with the test extra
    assert make == [(("dqrm", "$($(PYTHON) scripts/requirements.py flavor),test"), False), (("torchrec",), True)]
    # the image: the same requirements as ".[FLAVOR]" first (a layer that survives code changes), then dqrm itself
    assert docker == [(("deps", "--fbgemm", "$FLAVOR"), False), (("torchrec",), True), (("dqrm", ""), True)]
    # The image's flavor is named, not detected: a build has no GPU for requirements.py to look at.
    assert dockerfile_args()["FLAVOR"] in ("cpu", "cuda")


def test_dockerfile_pins_nothing_itself():
    text = (ROOT / "Dockerfile").read_text()
    lines = [*requirement_lines("deps", "--fbgemm", "cpu"), *requirement_lines("deps", "--fbgemm", "cuda"),
             *requirement_lines("torchrec")]
    names = {requirement_name(line) for line in lines}
    for name in names:
        assert not re.search(rf"\b{re.escape(name)}\s*[=<>~]=", text, re.IGNORECASE), f"the Dockerfile pins {name}"


def test_documented_build_commands_use_the_dockerfile_args():
    builds = [shlex.split(line) for line in (ROOT / "docs" / "launching.md").read_text().splitlines()
              if line.startswith("docker build ")]
    flavors = set()
    for words in builds:
        assert words[-1] == ".", shlex.join(words)
        for i, word in enumerate(words):
            if word == "--build-arg":
                name, _, value = words[i + 1].partition("=")
                assert name in dockerfile_args(), f"the Dockerfile has no ARG {name}"
                if name == "FLAVOR":
                    flavors.add(value)
    assert flavors == {"cpu", "cuda"}

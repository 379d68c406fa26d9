"""The Dockerfile behind the component's ``image`` installs what ``make env`` installs, pinned in one place."""

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
    """Each ``pip install -r FILE`` in ``commands`` as (arguments of the requirements.py call that wrote FILE,
    whether it runs with --no-deps); installing anything else, bar upgrading pip itself, is an error."""
    written, installs = {}, []
    for command in commands:
        for words in (shlex.split(part) for part in command.split("&&")):
            script = next((i for i, word in enumerate(words) if word.endswith("scripts/requirements.py")), None)
            if script is not None:
                arrow = words.index(">")
                written[words[arrow + 1]] = tuple(words[script + 1:arrow])
            elif "install" in words and any(Path(word).name in ("pip", "pip3") for word in words):
                if words[-2:] == ["--upgrade", "pip"]:
                    continue
                assert "-r" in words, f"installs something other than requirements.py's lines: {shlex.join(words)}"
                installs.append((written[words[words.index("-r") + 1]], "--no-deps" in words))
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
        recipe.append(line.strip())
    return recipe


def dockerfile_args() -> dict[str, str | None]:
    args = {}
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("ARG "):
            name, _, default = line.removeprefix("ARG ").partition("=")
            args[name] = default or None
    return args


@pytest.mark.parametrize("fbgemm", ["cpu", "cuda"])
def test_requirements_name_the_pinned_fbgemm_of_each_flavor(fbgemm):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = project["tool"]["dqrm"]
    other = {"cpu": "cuda", "cuda": "cpu"}[fbgemm]
    lines = requirement_lines("deps", "--fbgemm", fbgemm)
    assert pins[f"fbgemm_{fbgemm}"] in lines and pins[f"fbgemm_{other}"] not in lines
    assert set(project["project"]["dependencies"]) <= set(lines)
    assert requirement_lines("nodeps") == [pins["torchrec"]]
    # The repository's top-level `datasets/` would shadow (or be shadowed by) Hugging Face's package.
    assert "datasets" not in {requirement_name(line) for line in lines}


def test_dockerfile_installs_what_make_env_installs():
    make, docker = pip_installs(makefile_env_recipe()), pip_installs(dockerfile_runs())
    assert [(step[0], no_deps) for step, no_deps in make] == [("deps", False), ("nodeps", True)]
    assert [(step[0], no_deps) for step, no_deps in docker] == [(step[0], no_deps) for step, no_deps in make]
    # The image's flavor is named, not detected: a build has no GPU for requirements.py to look at.
    assert docker[0][0] == ("deps", "--fbgemm", "$FLAVOR")
    assert dockerfile_args()["FLAVOR"] in ("cpu", "cuda")


def test_dockerfile_pins_nothing_itself():
    text = (ROOT / "Dockerfile").read_text()
    lines = [*requirement_lines("deps", "--fbgemm", "cpu"), *requirement_lines("deps", "--fbgemm", "cuda"),
             *requirement_lines("nodeps")]
    names = {requirement_name(line) for line in lines}
    for name in names:
        assert not re.search(rf"\b{re.escape(name)}\s*[=<>~]=", text, re.IGNORECASE), f"the Dockerfile pins {name}"


def test_readme_build_commands_use_the_dockerfile_args():
    builds = [shlex.split(line) for line in (ROOT / "README.md").read_text().splitlines()
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

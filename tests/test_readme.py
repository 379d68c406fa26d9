"""The README a user reads: every ```python block of it (and of docs/) runs as written, each in a fresh interpreter
in an empty folder (the serving blocks beside a tiny job's run dir at ``runs/tiny``, as the README says), so a snippet
that fails fails the tests; the README stays a first screen plus pointers (under 350 lines), and every relative link
of the README and docs/ points at a file, and at a heading that exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONTINUES = "# continues the block above"
# a block that imports neither must run with neither imported (what a serving box has)
NOT_IMPORTED = """
import sys as _sys
_loaded = sorted({m.split(".")[0] for m in _sys.modules} & {"dqrm", "torchrec"})
assert not _loaded, f"the block imported {_loaded}"
"""


def python_blocks() -> list[tuple[str, str]]:
    """(``page:line``, source) of every ```python block; a block starting with ``CONTINUES`` gets its predecessor's
    source in front (explicitly: the README says so in the block)."""
    blocks = []
    for page in PAGES:
        text = page.read_text()
        previous = ""
        for m in re.finditer(r"^```python\n(.*?)^```$", text, re.M | re.S):
            source = m.group(1)
            if source.startswith(CONTINUES):
                assert previous, f"{page.name}: a block continues nothing"
                source = previous + source
            line = text[:m.start()].count("\n") + 1
            blocks.append((f"{page.relative_to(ROOT)}:{line}", source))
            previous = source
    return blocks


BLOCKS = python_blocks()


def test_the_readme_has_python_blocks_to_run():
    assert sum(where.startswith("README.md") for where, _ in BLOCKS) >= 3, [where for where, _ in BLOCKS]


@pytest.mark.parametrize("where,source", BLOCKS, ids=[where for where, _ in BLOCKS])
def test_python_block_runs_as_written(where, source, tiny_run, tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tiny").symlink_to(tiny_run, target_is_directory=True)
    check = NOT_IMPORTED if not re.search(r"^\s*(from|import) (dqrm|torchrec)\b", source, re.M) else ""
    proc = subprocess.run([sys.executable, "-c", source + check], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{where}:\n{proc.stderr[-3000:]}"


def test_readme_is_a_first_screen_plus_pointers():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 350, len(lines)
    first_screen = "\n".join(lines[:40])
    for needed in ("make train", "make test", "minutes", "GB", "**Contents**"):
        assert needed in first_screen, needed


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but hyphens dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_point_at_files_and_headings():
    for page in PAGES:
        text = re.sub(r"^```.*?^```$", "", page.read_text(), flags=re.M | re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            assert path.exists(), f"{page.name}: link to {target}: no such file"
            if anchor and path.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", re.sub(r"^```.*?^```$", "", path.read_text(), flags=re.M | re.S),
                                      re.M)
                assert anchor in {_anchor(h) for h in headings}, f"{page.name}: link to {target}: no such heading"

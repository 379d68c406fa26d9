"""The benches as documented: `make bench` runs exactly the list docs/benchmarks.md gives, with the same time estimate;
each bench writes result files named after it; every committed result says what produced it (command, commit,
machine), so a figure in the docs can be traced to the code and machine behind it."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"


def _readme_make_bench() -> tuple[str, list[str]]:
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    intro = re.search(r"`make bench` runs the (\d+) benchmarks.*?\n```\n(.*?)\n```", text, re.S)
    assert intro, "docs/benchmarks.md: no `make bench` paragraph followed by its list"
    names = re.findall(r"^\.venv/bin/python -m bench\.(\w+)", intro.group(2), re.M)
    assert len(names) == int(intro.group(1)), (intro.group(1), names)
    return intro.group(0), names


def test_make_bench_runs_the_readme_list_with_the_same_estimate():
    paragraph, readme = _readme_make_bench()
    makefile = (ROOT / "Makefile").read_text()
    benches = re.search(r"^BENCHES \?=(.*?)(?<!\\)\n", makefile, re.M | re.S).group(1)
    assert benches.replace("\\\n", " ").split() == readme
    estimate = re.compile(r"about\s+([\d-]+)\s+minutes")
    assert estimate.search(makefile).group(1) == estimate.search(paragraph).group(1)


def _benches() -> dict[str, list[Path]]:
    """Each bench by name (``python -m bench.NAME``): a module, or a package and its modules."""
    out = {p.stem: [p] for p in (ROOT / "bench").glob("*.py")}
    out.update({p.parent.name: sorted(p.parent.glob("*.py")) for p in (ROOT / "bench").glob("*/__main__.py")})
    return out


def test_each_bench_writes_files_named_after_it():
    for bench, files in sorted(_benches().items()):
        for module in files:
            for name in re.findall(r"\bsave\(\s*['\"](\w+)['\"]", module.read_text()):
                assert name == bench or name.startswith(bench + "_"), (module.name, name)


# Written before results recorded what produced them in their text, and not rerun yet: the reason, and what reruns it.
# The test fails once such a file has its header, so the list only shrinks.
NOT_RERUN: dict[str, str] = {}


def test_every_committed_result_says_what_produced_it():
    for path in sorted(RESULTS.glob("*.txt")):
        head = path.read_text().splitlines()[:3]
        has_header = [line.split(":")[0] for line in head] == ["command", "commit", "machine"]
        assert has_header != (path.name in NOT_RERUN), (path.name, head, NOT_RERUN.get(path.name))
    for path in sorted(RESULTS.glob("*.json")):
        record = json.loads(path.read_text())
        missing = [k for k in ("command", "commit", "machine") if k not in record]
        assert not missing, (path.name, missing)
        assert path.stem.startswith(tuple(_benches())), path.name

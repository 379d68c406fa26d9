"""Converter mistakes caught before or while converting, on generated lines (no Criteo sample needed): each is one
``error:`` line naming the input, and nothing is half-written in its place."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import pytest

from dqrm.datasets.convert import main as convert


def _lines(n: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        counts = [str(rng.randint(0, 50)) for _ in range(13)]
        hashes = [f"{rng.getrandbits(32):08x}" for _ in range(26)]
        out.append("\t".join([str(rng.randint(0, 1)), *counts, *hashes]))
    return ("\n".join(out) + "\n").encode()


def test_truncated_gzip_names_the_file(tmp_path, capsys):
    whole = gzip.compress(_lines(3000))
    bad = tmp_path / "day_1.gz"
    bad.write_bytes(whole[: len(whole) // 2])
    assert convert([str(bad), "--out", str(tmp_path / "out"), "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert f"error: {bad}: the gzip stream is damaged or ends early" in err
    assert not (tmp_path / "out" / "day_1.parquet").exists()
    assert not list((tmp_path / "out").rglob("*.partial")), "the half-written output was left behind"


def test_truncated_gzip_is_named_when_counting_lines_for_the_kaggle_split(tmp_path, capsys):
    whole = gzip.compress(_lines(3000))
    bad = tmp_path / "train.txt.gz"
    bad.write_bytes(whole[: len(whole) // 2])
    assert convert([str(bad), "--split", "kaggle", "--out", str(tmp_path / "out"), "--workers", "1"]) == 1
    assert f"error: {bad}: the gzip stream is damaged or ends early" in capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("same-stem", "would all be written to day_0.parquet"),
    ("folder-input", "inputs must be files, not folders"),
    ("out-is-a-file", "exists and is not a folder"),
    ("workers", "--workers must be at least 1"),
    ("kaggle-two-inputs", "--split kaggle takes one train.txt"),
])
def test_refused_before_anything_is_written(case, message, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = tmp_path / "a" / "day_0", tmp_path / "b" / "day_0"
    a.write_bytes(_lines(10, seed=1))
    b.write_bytes(_lines(20, seed=2))
    out = tmp_path / "out"
    args = {"same-stem": [str(a), str(b), "--out", str(out)],
            "folder-input": [str(tmp_path / "a"), "--out", str(out)],
            "out-is-a-file": [str(a), "--out", str(b)],
            "workers": [str(a), "--out", str(out), "--workers", "-3"],
            "kaggle-two-inputs": [str(a), str(b), "--split", "kaggle", "--out", str(out)]}[case]
    with pytest.raises(SystemExit) as exit_info:
        convert(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and b.read_bytes() == _lines(20, seed=2)


def test_an_empty_line_is_called_empty(tmp_path, capsys):
    lines = _lines(10).split(b"\n")
    src = tmp_path / "day_0"
    src.write_bytes(b"\n".join(lines[:4] + [b""] + lines[4:]))
    assert convert([str(src), "--out", str(tmp_path / "out"), "--workers", "1"]) == 1
    assert f"error: {src}: line 5 is empty" in capsys.readouterr().err


def test_a_first_line_without_its_label_is_suspected(tmp_path, capsys):
    lines = _lines(10).split(b"\n")
    src = tmp_path / "day_0"
    src.write_bytes(b"\n".join([lines[0].split(b"\t", 1)[1]] + lines[1:]))
    assert convert([str(src), "--out", str(tmp_path / "out"), "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert f"error: {src}: line 2: has 40 fields, expected 39" in err and "is line 1 missing its label?" in err

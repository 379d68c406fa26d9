"""Every real Criteo sample converts and reads back equal to an independent plain-Python parse."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from datasets.convert import main as convert
from datasets.schema import DENSE_COLUMNS, SPARSE_COLUMNS

SAMPLES = Path(__file__).resolve().parents[3] / "shared" / "data" / "criteo-samples"
pytestmark = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"Criteo samples not found at {SAMPLES}")

FILES = {
    "kaggle_dac_train_head900.tsv": ("\t", False, True),
    "kaggle_dac_test_head100_unlabeled.tsv": ("\t", False, False),
    "kaggle_orig_train.tiny.csv": (",", True, True),
    "kaggle_orig_test.tiny.csv": (",", True, True),
    "terabyte_day0_0.001sample_head1000.tsv": ("\t", False, True),
    "terabyte_day0_0.001sample_test_head10.tsv": ("\t", False, True),
}


def plain_parse(path: Path, sep: str, csv: bool, labeled: bool) -> list[dict]:
    """The reference: split each line by hand."""
    rows = []
    lines = path.read_text().splitlines()
    for line in lines[1:] if csv else lines:
        fields = line.split(sep)
        if csv:
            fields = fields[1:]  # drop Id
        if not labeled:
            fields = ["0"] + fields
        assert len(fields) == 40, line
        row = {"label": int(fields[0])}
        for name, v in zip(DENSE_COLUMNS, fields[1:14]):
            row[name] = int(v) if v else None
        for name, v in zip(SPARSE_COLUMNS, fields[14:]):
            row[name] = int(v, 16) if v else None
        rows.append(row)
    return rows


def _stem(name: str) -> str:
    for ext in (".tsv", ".csv"):
        name = name.removesuffix(ext)
    return name


@pytest.mark.parametrize("name", sorted(FILES))
def test_sample_converts_and_matches_plain_parse(name, tmp_path):
    sep, csv, labeled = FILES[name]
    assert convert([str(SAMPLES / name), "--out", str(tmp_path), "--workers", "1"]) == 0
    got = pq.read_table(tmp_path / f"{_stem(name)}.parquet").to_pylist()
    expected = plain_parse(SAMPLES / name, sep, csv, labeled)
    assert len(got) == len(expected) > 0
    assert got == expected
    manifest = json.loads((tmp_path / "_manifest.json").read_text())
    assert manifest["rows"] == len(expected) and manifest["skipped"] == {}


def test_kaggle_csv_and_tsv_agree_on_shared_rows(tmp_path):
    assert convert([str(SAMPLES / "kaggle_dac_train_head900.tsv"), str(SAMPLES / "kaggle_orig_train.tiny.csv"),
                    "--out", str(tmp_path), "--workers", "2"]) == 0
    tsv = pq.read_table(tmp_path / "kaggle_dac_train_head900.parquet")
    csv = pq.read_table(tmp_path / "kaggle_orig_train.tiny.parquet")
    assert tsv.num_rows == 900 and csv.num_rows == 1999
    assert tsv.equals(csv.slice(0, 900))


def test_gzip_input_and_kaggle_split(tmp_path):
    src = tmp_path / "train.txt.gz"
    with gzip.open(src, "wb") as f:
        f.write((SAMPLES / "kaggle_dac_train_head900.tsv").read_bytes())
    out = tmp_path / "out"
    assert convert([str(src), "--out", str(out), "--split", "kaggle", "--workers", "1"]) == 0
    parts = {s: pq.read_table(out / f"{s}.parquet") for s in ("train", "val", "test")}
    day = 900 // 7
    assert [parts[s].num_rows for s in ("train", "val", "test")] == [900 - day, day // 2, day - day // 2]
    whole = pq.read_table(tmp_path.parent / tmp_path.name / "out" / "train.parquet")
    direct = plain_parse(SAMPLES / "kaggle_dac_train_head900.tsv", "\t", False, True)
    assert whole.to_pylist() == direct[: 900 - day]
    assert parts["test"].to_pylist() == direct[900 - day + day // 2:]


def _corrupt(tmp_path: Path, line_no: int, fix) -> Path:
    lines = (SAMPLES / "kaggle_dac_train_head900.tsv").read_text().splitlines()
    lines[line_no - 1] = fix(lines[line_no - 1])
    path = tmp_path / "bad.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("fix, message, reason", [
    (lambda l: l.rsplit("\t", 1)[0], "line 7: has 39 fields, expected 40", "wrong field count"),
    (lambda l: l.replace("\t", "\tzz", 1), "line 7: field I1 = 'zz", "bad I1"),
    (lambda l: "\t".join(l.split("\t")[:20] + ["xyz12345"] + l.split("\t")[21:]), "line 7: field C7 = 'xyz12345'",
     "bad C7"),
    (lambda l: "\t".join(l.split("\t")[:20] + ["abc"] + l.split("\t")[21:]), "line 7: field C7 = 'abc'", "bad C7"),
    (lambda l: "\t".join(l.split("\t")[:3] + ["99999999999"] + l.split("\t")[4:]), "line 7: field I3 = '99999999999'",
     "bad I3"),
    (lambda l: "2" + l[1:], "line 7: field label = '2'", "bad label"),
])
def test_bad_rows_stop_or_are_skipped_and_counted(fix, message, reason, tmp_path, capsys):
    bad = _corrupt(tmp_path, 7, fix)
    assert convert([str(bad), "--out", str(tmp_path / "o"), "--workers", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err and "bad.tsv" in err
    assert not (tmp_path / "o" / "bad.parquet").exists()  # no half-written output
    assert convert([str(bad), "--out", str(tmp_path / "o"), "--workers", "1", "--skip-bad-rows"]) == 0
    assert pq.read_table(tmp_path / "o" / "bad.parquet").num_rows == 899
    manifest = json.loads((tmp_path / "o" / "_manifest.json").read_text())
    assert manifest["skipped"] == {reason: 1}
    assert f"{reason}: 1" in capsys.readouterr().out


def test_not_a_criteo_file(tmp_path, capsys):
    junk = tmp_path / "notes.txt"
    junk.write_text("hello world\nsecond line\n")
    assert convert([str(junk), "--out", str(tmp_path / "o")]) == 1
    assert "line 1 has 1 tab-separated fields" in capsys.readouterr().err
    assert convert([str(tmp_path / "nope.tsv"), "--out", str(tmp_path / "o")]) == 1
    assert "no such input file" in capsys.readouterr().err

"""Every real Criteo sample converts and reads back equal to an independent plain-Python parse. Tests that read the
samples skip where they are absent; the rest always run."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dqrm.datasets import criteo_text
from dqrm.datasets.convert import main as convert
from dqrm.datasets.schema import DENSE_COLUMNS, SPARSE_COLUMNS, parquet_files

SAMPLES = Path(__file__).resolve().parents[3] / "shared" / "data" / "criteo-samples"
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"Criteo samples not found at {SAMPLES}")

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


@needs_samples
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


@needs_samples
def test_kaggle_csv_and_tsv_agree_on_shared_rows(tmp_path):
    assert convert([str(SAMPLES / "kaggle_dac_train_head900.tsv"), str(SAMPLES / "kaggle_orig_train.tiny.csv"),
                    "--out", str(tmp_path), "--workers", "2"]) == 0
    tsv = pq.read_table(tmp_path / "kaggle_dac_train_head900.parquet")
    csv = pq.read_table(tmp_path / "kaggle_orig_train.tiny.parquet")
    assert tsv.num_rows == 900 and csv.num_rows == 1999
    assert tsv.equals(csv.slice(0, 900))


@needs_samples
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


@needs_samples
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
@pytest.mark.parametrize("line_no, block", [(7, None), (7, 20000), (450, 20000)])  # small blocks: fast ones around
def test_bad_rows_stop_or_are_skipped_and_counted(fix, message, reason, line_no, block, tmp_path, capsys):
    bad = _corrupt(tmp_path, line_no, fix)
    message = message.replace("line 7:", f"line {line_no}:")
    opts = ["--workers", "1"] + ([] if block is None else ["--block-bytes", str(block)])
    assert convert([str(bad), "--out", str(tmp_path / "o"), *opts]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err and "bad.tsv" in err
    assert not (tmp_path / "o" / "bad.parquet").exists()  # no half-written output
    assert convert([str(bad), "--out", str(tmp_path / "o"), *opts, "--skip-bad-rows"]) == 0
    got = pq.read_table(tmp_path / "o" / "bad.parquet").to_pylist()
    direct = plain_parse(SAMPLES / "kaggle_dac_train_head900.tsv", "\t", False, True)
    assert got == direct[:line_no - 1] + direct[line_no:]
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


# ---- one input in several byte ranges ----------------------------------------------------------------------------
def _read(root: Path, name: str) -> list[dict]:
    return [row for f in parquet_files(root, name) for row in pq.read_table(f).to_pylist()]


@needs_samples
@pytest.mark.parametrize("name, split, outputs", [
    ("kaggle_dac_train_head900.tsv", "kaggle", ["train", "val", "test"]),
    ("kaggle_orig_train.tiny.csv", "files", ["kaggle_orig_train.tiny"]),
    ("terabyte_day0_0.001sample_head1000.tsv", "terabyte", ["val/day_23", "test/day_23"]),
])
def test_ranges_in_several_processes_give_the_rows_of_one_stream(name, split, outputs, tmp_path):
    src = SAMPLES / name
    if split == "terabyte":  # day_23 is the day halved into val and test
        src = tmp_path / "day_23"
        src.write_bytes((SAMPLES / name).read_bytes())
    args = [str(src), "--split", split]
    assert convert([*args, "--out", str(tmp_path / "one"), "--workers", "1"]) == 0
    assert convert([*args, "--out", str(tmp_path / "w1"), "--workers", "1", "--chunk-bytes", "40000"]) == 0
    assert convert([*args, "--out", str(tmp_path / "w3"), "--workers", "3", "--chunk-bytes", "40000"]) == 0
    sep, csv, labeled = FILES[name]
    expected = plain_parse(SAMPLES / name, sep, csv, labeled)
    got = {run: [_read(tmp_path / run, o) for o in outputs] for run in ("one", "w1", "w3")}
    assert sum(map(len, got["one"])) == len(expected) and [r for part in got["one"] for r in part] == expected
    assert got["w1"] == got["one"] and got["w3"] == got["one"]  # same rows, same order, same split boundaries
    for o in outputs:
        assert (tmp_path / "one" / f"{o}.parquet").is_file()
        assert len(parquet_files(tmp_path / "w3", o)) > 1 or o in ("val", "test")
    parts = sorted((tmp_path / "w3").rglob("*.parquet"))
    assert len(parts) >= 5 and all(p.name.startswith("part-") for p in parts)
    assert not list((tmp_path / "w3").rglob("*.partial"))
    manifest = json.loads((tmp_path / "w3" / "_manifest.json").read_text())
    listed = manifest["files"][0]["outputs"]
    assert sorted(map(Path, listed)) == parts  # every part listed, with its own row count
    assert all(pq.read_metadata(p).num_rows == n for p, n in listed.items())
    assert manifest["rows"] == len(expected) and manifest["files"][0]["chunks"] >= 5


@needs_samples
@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux's /proc/self/maps")
def test_ranges_are_read_not_memory_mapped(tmp_path, monkeypatch):
    # Every page of a mapped range stays resident until the range is done: a worker's peak memory grew by up to
    # --chunk-bytes (bench.ingest measured ~300 MB of 760 at the default 512 MiB).
    src = tmp_path / "day_0.tsv"
    src.write_bytes((SAMPLES / "terabyte_day0_0.001sample_head1000.tsv").read_bytes())
    mapped = []

    def parse(buf, labeled):
        mapped.append(str(src) in Path("/proc/self/maps").read_text())
        return parse_tsv_block(buf, labeled)

    parse_tsv_block = criteo_text.parse_tsv_block
    monkeypatch.setattr(criteo_text, "parse_tsv_block", parse)
    args = ["--out", str(tmp_path / "o"), "--workers", "1", "--chunk-bytes", "40000", "--block-bytes", "20000"]
    assert convert([str(src), *args]) == 0
    assert len(mapped) >= 10 and not any(mapped)
    assert len(_read(tmp_path / "o", "day_0")) == 1000


def _corrupt_lines(tmp_path: Path, fixes: dict) -> Path:
    lines = (SAMPLES / "kaggle_dac_train_head900.tsv").read_text().splitlines()
    for line_no, fix in fixes.items():
        lines[line_no - 1] = fix(lines[line_no - 1])
    path = tmp_path / "bad.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _drop_field(line: str) -> str:
    return line.rsplit("\t", 1)[0]


def _bad_c7(line: str) -> str:
    return "\t".join(line.split("\t")[:20] + ["xyz12345"] + line.split("\t")[21:])


@needs_samples
@pytest.mark.parametrize("workers, block", [(1, None), (3, None), (1, 7000)])
def test_errors_in_later_ranges_name_the_true_line(workers, block, tmp_path, capsys):
    common = ["--out", str(tmp_path / "o"), "--workers", str(workers), "--chunk-bytes", "30000"]
    common += [] if block is None else ["--block-bytes", str(block)]
    # line 850 is in the last of 8 ranges; line 300 in the third
    for fixes, message in [({850: _drop_field}, "line 850: has 39 fields, expected 40"),
                           ({850: _bad_c7}, "line 850: field C7 = 'xyz12345'"),
                           ({300: _bad_c7, 850: _drop_field}, "line 300: field C7"),
                           ({301: _drop_field, 302: _bad_c7}, "line 301: has 39 fields"),
                           ({300: lambda line: ""}, "line 300 is empty")]:  # an empty line is a row
        bad = _corrupt_lines(tmp_path, fixes)
        assert convert([str(bad), *common]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {bad}: {message}"), (fixes, err)
        assert not (tmp_path / "o" / "bad").exists() and not list(tmp_path.rglob("*.partial"))


@needs_samples
@pytest.mark.parametrize("workers, block", [(1, None), (3, None), (1, 5000)])
def test_skipped_rows_add_up_across_ranges_and_keep_split_positions(workers, block, tmp_path, capsys):
    # rows 100 and 500 (train), 800 (val: rows 773-836) and 880 (test) are bad; the split stays by input position
    fixes = {100: _drop_field, 500: _bad_c7, 800: _bad_c7, 880: lambda line: "2" + line[1:]}
    bad = _corrupt_lines(tmp_path, fixes)
    common = [str(bad), "--split", "kaggle", "--skip-bad-rows", "--workers", str(workers)]
    common += [] if block is None else ["--block-bytes", str(block)]
    assert convert([*common, "--out", str(tmp_path / "parts"), "--chunk-bytes", "30000"]) == 0
    assert convert([*common, "--out", str(tmp_path / "one")]) == 0
    direct = plain_parse(SAMPLES / "kaggle_dac_train_head900.tsv", "\t", False, True)
    keep = lambda lo, hi: [r for i, r in enumerate(direct[lo:hi], start=lo + 1) if i not in fixes]  # noqa: E731
    expected = {"train": keep(0, 772), "val": keep(772, 836), "test": keep(836, 900)}
    for run in ("parts", "one"):
        assert {s: _read(tmp_path / run, s) for s in expected} == expected
        manifest = json.loads((tmp_path / run / "_manifest.json").read_text())
        assert manifest["skipped"] == {"wrong field count": 1, "bad C7": 2, "bad label": 1}
        assert manifest["rows"] == 896
    assert "bad C7: 2" in capsys.readouterr().out


@needs_samples
def test_reconverting_replaces_the_other_layout(tmp_path):
    src = SAMPLES / "kaggle_dac_train_head900.tsv"
    out = tmp_path / "o"
    assert convert([str(src), "--out", str(out), "--workers", "2", "--chunk-bytes", "40000"]) == 0
    assert len(parquet_files(out, "kaggle_dac_train_head900")) == 6
    assert convert([str(src), "--out", str(out), "--workers", "1", "--chunk-bytes", "100000"]) == 0
    assert len(parquet_files(out, "kaggle_dac_train_head900")) == 3  # old parts 3..5 are gone
    assert convert([str(src), "--out", str(out), "--workers", "1"]) == 0
    assert parquet_files(out, "kaggle_dac_train_head900") == [out / "kaggle_dac_train_head900.parquet"]
    assert not (out / "kaggle_dac_train_head900").exists()
    manifest = json.loads((out / "_manifest.json").read_text())
    assert len(manifest["files"]) == 1 and manifest["rows"] == 900


@pytest.mark.parametrize("sliced", [False, True])
def test_fast_field_parsers_agree_with_the_general_ones(sliced):
    # The fast paths (whole-column hex decode, Arrow's int cast) must accept, reject and decode exactly as the
    # general, per-field-checked paths do, on the odd inputs too, and on sliced arrays (a non-zero offset).
    import numpy as np
    import pyarrow as pa

    from dqrm.datasets import criteo_text as ct

    def column(values):
        return pa.array(["9"] * 3 + values)[3:] if sliced else pa.array(values)

    ints = [["1", "", "-3", "2147483647", "-2147483648", "2147483648", "0x10", "+5", " 5", "000000000005", "5.0", "-"],
            ["", "", ""], ["7", "8", "0", "-0", "05"], ["12", "", "abc"],
            ["0x10", "3"], ["0X1F", ""], ["000000000005", "1"]]  # what Arrow's cast alone would accept
    for values in ints:
        fast, general = ct._int_column(column(values)), ct._int_column_general(column(values))
        for a, b in zip(fast, general):
            assert np.array_equal(a, b), values
    hexes = [["0000000a", "", "ffffffff", "zzzzzzzz", "123", "DEADBEEF", "0000000g"], ["", ""],
             ["abcdef01", "7fffffff"]]
    for values in hexes:
        (v, ok, bad), (v2, ok2, bad2) = ct._hex_to_uint32(column(values)), ct._hex_to_uint32_general(column(values))
        assert np.array_equal(ok, ok2) and np.array_equal(bad, bad2) and np.array_equal(v[ok], v2[ok2]), values
    v, ok, _ = ct._hex_to_uint32(column(["abcdef01", "", "7fffffff"]))
    assert v[ok].tolist() == [0xABCDEF01, 0x7FFFFFFF]

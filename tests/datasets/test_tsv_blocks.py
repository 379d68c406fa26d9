"""The fast TSV block parser: it parses clean Criteo lines exactly as the checking path does, and hands every
irregular block back (None) instead of deciding anything about it."""

from __future__ import annotations

import random
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from dqrm.datasets import criteo_text as ct
from dqrm.datasets.schema import SCHEMA
from dqrm.datasets.tsv_blocks import PAD, parse_tsv_block

SAMPLES = Path(__file__).resolve().parents[3] / "shared" / "data" / "criteo-samples"
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"Criteo samples not found at {SAMPLES}")


def block(text: bytes) -> np.ndarray:
    return ct._padded(b"", text)


def checked(path: Path, labeled: bool) -> pa.Table:
    """The rows as Arrow's reader and the general checks give them (the reference)."""
    invalid: list = []
    tables = [ct.parse_batch(b, labeled)[0] for b in ct.open_rows(path, "tsv", labeled, None, False, 1 << 20, invalid)]
    assert not invalid
    return pa.concat_tables(tables)


def line(label="1", dense=None, sparse=None) -> str:
    dense = dense if dense is not None else [str(i) for i in range(13)]
    sparse = sparse if sparse is not None else ["0123abcd"] * 26
    return "\t".join(([label] if label is not None else []) + dense + sparse)


@needs_samples
@pytest.mark.parametrize("name, labeled", [("kaggle_dac_train_head900.tsv", True),
                                           ("kaggle_dac_test_head100_unlabeled.tsv", False),
                                           ("terabyte_day0_0.001sample_head1000.tsv", True)])
def test_real_samples_take_the_fast_path_and_equal_the_checked_parse(name, labeled):
    fast = parse_tsv_block(block((SAMPLES / name).read_bytes()), labeled)
    assert fast is not None and fast.schema == SCHEMA
    assert fast.equals(checked(SAMPLES / name, labeled))


def test_edge_values_take_the_fast_path(tmp_path):
    dense = ["-1", "", "0", "-0", "007", "2147483647", "-2147483648", "2147", "", "9", "0000000005", "-99", "5"]
    sparse = ["DEADBEEF", "", "ffffffff", "00000000", "DeadBeef", "7fffffff"] + ["0a1b2c3d"] * 20
    lines = [line(dense=dense, sparse=sparse), line("0", [""] * 13, [""] * 26), line()]
    text = ("\n".join(lines) + "\n").encode()
    (tmp_path / "x.tsv").write_bytes(text)
    fast = parse_tsv_block(block(text), True)
    assert fast is not None
    assert fast.equals(checked(tmp_path / "x.tsv", True))
    first = fast.slice(0, 1).to_pylist()[0]
    assert [first[f"I{i}"] for i in range(1, 14)] == [-1, None, 0, 0, 7, 2**31 - 1, -2**31, 2147, None, 9, 5, -99, 5]
    assert [first[f"C{i}"] for i in range(1, 7)] == [0xDEADBEEF, None, 0xFFFFFFFF, 0, 0xDEADBEEF, 0x7FFFFFFF]
    assert fast.column("label").to_pylist() == [1, 0, 1]
    unlabeled = parse_tsv_block(block((line(None) + "\n").encode()), False)
    assert unlabeled is not None and unlabeled.column("label").to_pylist() == [0]


def _with_field(k: int, value: str) -> str:
    fields = line().split("\t")
    fields[k] = value
    return "\t".join(fields)


@pytest.mark.parametrize("text", [
    _with_field(1, "00000000005"),  # 11 digits: legal, but for the checking path
    _with_field(1, "2147483648"), _with_field(1, "-2147483649"), _with_field(1, "99999999999"),
    _with_field(1, "+5"), _with_field(1, "-"), _with_field(1, "1a"), _with_field(1, " 5"), _with_field(1, "--1"),
    _with_field(1, "1-"), _with_field(1, "0x10"),
    _with_field(14, "g0000000"), _with_field(14, "0123abc"), _with_field(14, "0123abcde"), _with_field(14, "0123abc "),
    _with_field(14, "0123abc\u00e9"), _with_field(14, '"0123abc'), _with_field(39, "0123abc/"),
    _with_field(0, "2"), _with_field(0, ""), _with_field(0, "00"), _with_field(0, "-1"),
    line() + "\r", line() + "\tffffffff", line().rsplit("\t", 1)[0], "",
])
def test_irregular_lines_send_the_block_to_the_checking_path(text):
    good = line()
    assert parse_tsv_block(block(f"{good}\n{good}\n".encode()), True) is not None
    assert parse_tsv_block(block(f"{good}\n{text}\n{good}\n".encode()), True) is None


def test_field_checks_agree_with_python_on_random_fields():
    # Every printable byte and one beyond ASCII, mostly near the legal alphabet, in every position: a field is
    # parsed only if Python calls it legal, to Python's value; a legal one within the fast path's limits is parsed.
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(32, 127)] + ["\u00e9"]
    hexdigits = "0123456789abcdefABCDEF"
    for _ in range(3000):
        f = [rng.choice(hexdigits) for _ in range(8)]
        f[rng.randrange(8)] = rng.choice(alphabet) if rng.random() < 0.5 else f[0]
        f = "".join(f)
        got = parse_tsv_block(block((_with_field(14, f) + "\n").encode()), True)
        legal = re.fullmatch(r"[0-9a-fA-F]{8}", f) is not None
        assert (got is not None) == legal, f
        if legal:
            assert got.column("C1")[0].as_py() == int(f, 16)
    for _ in range(3000):
        n = rng.randint(1, 11)
        c = [rng.choice("0123456789") for _ in range(n)]
        if rng.random() < 0.3:
            c[0] = "-"
        if rng.random() < 0.3:
            c[rng.randrange(n)] = rng.choice(alphabet)
        c = "".join(c)
        got = parse_tsv_block(block((_with_field(1, c) + "\n").encode()), True)
        legal = re.fullmatch(r"-?[0-9]+", c) is not None and -2**31 <= int(c) < 2**31
        if got is not None:
            assert legal and got.column("I1")[0].as_py() == int(c), c
        else:
            assert not legal or len(c.lstrip("-")) > 10, c


def test_blocks_end_on_line_ends_and_count_lines():
    text = (line() + "\n") * 5 + line()  # no final newline
    stream = pa.BufferReader(text.encode())
    blocks = list(ct._line_blocks(stream, 300))  # shorter than a line: lines get joined until one ends
    assert len(blocks) == 6
    joined = b"".join(bytes(b[PAD:len(b) - PAD]) for b in blocks)
    assert joined == (text + "\n").encode()
    assert all(bytes(b[PAD:len(b) - PAD]).endswith(b"\n") and not b[:PAD].any() and not b[-PAD:].any()
               for b in blocks)
    assert sum(parse_tsv_block(b, True).num_rows for b in blocks) == 6


@needs_samples
def test_mixed_blocks_give_what_the_checking_path_gives(tmp_path):
    lines = (SAMPLES / "kaggle_dac_train_head900.tsv").read_text().splitlines()
    lines[300] = lines[300].rsplit("\t", 1)[0]  # line 301: wrong field count
    lines[600] = "2" + lines[600][1:]  # line 601: bad label
    path = tmp_path / "bad.tsv"
    path.write_text("\n".join(lines) + "\n")
    fast_invalid: list = []
    parts = list(ct.parsed_batches(path, "tsv", True, None, False, 20000, fast_invalid))
    assert any(b is None for b, _, _ in parts) and any(b is not None for b, _, _ in parts)
    ref_invalid: list = []
    ref = [ct.parse_batch(b, True) for b in ct.open_rows(path, "tsv", True, None, False, 1 << 20, ref_invalid)]
    assert fast_invalid == ref_invalid and [r[0] for r in fast_invalid] == [301]
    assert pa.concat_tables(t for _, t, _ in parts).equals(pa.concat_tables(t for t, _ in ref))
    bad_fast = np.concatenate([np.zeros(t.num_rows, bool) if not p else np.any([b for b, _ in p], axis=0)
                               for _, t, p in parts])
    bad_ref = np.concatenate([np.any([b for b, _ in p], axis=0) for _, p in ref])
    assert np.array_equal(bad_fast, bad_ref) and bad_ref.sum() == 1


@needs_samples
def test_a_parsed_block_holds_about_its_own_size():
    # Its columns stay referenced until their row group is written (~60 blocks): sized for the shortest possible
    # line they held 6x what real lines fill, and the converter's peak crept up over the first gigabytes.
    buf = block((SAMPLES / "terabyte_day0_0.001sample_head1000.tsv").read_bytes())
    parse_tsv_block(buf, True)  # compiled and warm
    tracemalloc.start()
    try:
        table = parse_tsv_block(buf, True)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert table.num_rows == 1000 and held < 1.5 * table.nbytes, (held, table.nbytes)

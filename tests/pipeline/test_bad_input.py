"""A table of bad inputs: each fails with a one-line error naming what is wrong, a non-zero exit, and nothing
earlier destroyed. (The raw-TSV converter's bad inputs belong to issue 4, which has no converter yet.)"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dqrm.pipeline import cli, predict, train
from dqrm.pipeline.checkpoint import Checkpointer
from dqrm.quant.convert import FileSink

TINY = ["--config", "tiny", "--epochs", "1", "--limit-train-batches", "4", "--limit-eval-batches", "1"]


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    """One finished tiny run (checkpoint + exported artifact) to damage copies of."""
    base = tmp_path_factory.mktemp("bad-input")
    run_dir = base / "run"
    assert train.main([*TINY, "--run-dir", str(run_dir)]) == 0
    return run_dir


def _data_dir(done_run):
    return Path(json.loads((done_run / "config.json").read_text())["data"]["data_dir"] or "")


def _synthetic_test_file(done_run) -> Path:
    from dqrm.datasets.synthetic import ensure_synthetic
    from dqrm.pipeline.configs import get_config

    return ensure_synthetic(get_config("tiny").data.synthetic) / "test.parquet"


def _check(rc, capsys, *needles, code=None):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and (code is None or rc == code)
    assert err and err[-1].startswith("error: "), err
    for n in needles:
        assert n in err[-1], (n, err[-1])
    return err[-1]


def test_a_run_dir_is_not_resumed_as_another_job(done_run, capsys):
    """Its checkpoints belong to the job in its config.json: other settings are refused (nothing written), naming each
    differing field; how long the job runs may change."""
    before = sorted(p.name for p in done_run.rglob("*"))
    err = _check(train.main([*TINY, "--run-dir", str(done_run), "--set", "quant_mode=fp32",
                             "data.synthetic.num_train=8192"]), capsys, "holds checkpoints of another job",
                 "quant_mode: 'qat' in the run dir, 'fp32' now", "data.synthetic.num_train: 16384 in the run dir, "
                 "8192 now", "Use a new --run-dir", code=2)
    assert "epochs" not in err.split("settings:")[1].split(". Use")[0]
    assert sorted(p.name for p in done_run.rglob("*")) == before
    cfg = cli.build_config(cli.parse_args([*TINY, "--run-dir", str(done_run), "--epochs", "3"]))
    assert cfg.epochs == 3  # a longer run of the same job is a resume


# ---- CLI and configs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, needles", [
    (["--set", "nosuch=1"], ["has no field 'nosuch'"]),
    (["--set", "model.embedding_dim=abc"], ["cannot parse 'abc' as int"]),
    (["--epochs", "0"], ["epochs must be at least 1"]),
    (["--set", "quant.embedding_bits=3"], ["3 bits unsupported"]),
    (["--set", "quant_mode=int3"], ["quant_mode must be one of"]),
    (["--set", "quant.granularity=channel"], ["granularity must be 'table' or 'row'"]),
    (["--set", "model.over_arch=32,2"], ["over_arch must end with 1"]),
    (["--set", "epochs"], ["must look like field.path=value"]),
])
def test_bad_config(args, needles, capsys, tmp_path):
    _check(train.main([*TINY, "--run-dir", str(tmp_path / "r"), *args]), capsys, *needles, code=2)
    assert not (tmp_path / "r").exists()


def test_unknown_config_name(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--config", "nosuch"])
    assert e.value.code == 2 and "invalid choice: 'nosuch'" in capsys.readouterr().err


def test_missing_data_dir(capsys, tmp_path):
    _check(train.main([*TINY, "--run-dir", str(tmp_path / "r"), "--data-dir", str(tmp_path / "none")]), capsys,
           "no such folder", "dqrm.datasets.convert", code=2)


def test_run_dir_is_a_file(capsys, tmp_path):
    (tmp_path / "f").write_text("keep me")
    _check(train.main([*TINY, "--run-dir", str(tmp_path / "f")]), capsys, "a file is in the way")
    _check(train.main([*TINY, "--run-dir", str(tmp_path / "f" / "run")]), capsys, "a file is in the way")
    assert (tmp_path / "f").read_text() == "keep me"


# ---- data ------------------------------------------------------------------------------------------------------
def _bad_data_dir(tmp_path, good: Path, kind: str) -> Path:
    d = tmp_path / kind
    d.mkdir()
    for split in ("train", "val", "test"):
        shutil.copy(good, d / f"{split}.parquet")
    target = d / "val.parquet"
    table = pq.read_table(good)
    if kind == "not-parquet":
        target.write_bytes(b"label,I1\n1,2\n")
    elif kind == "missing-column":
        pq.write_table(table.drop(["C7"]), target)
    elif kind == "wrong-type":
        pq.write_table(table.set_column(table.schema.get_field_index("C3"), "C3",
                                        table.column("C3").cast(pa.string())), target)
    elif kind in ("label-2", "label-null"):
        labels = table.column("label").to_pylist()
        labels[5] = 2 if kind == "label-2" else None
        pq.write_table(table.set_column(0, "label", pa.array(labels, table.schema.field("label").type)), target)
    elif kind == "no-rows":
        pq.write_table(table.slice(0, 0), target)
    return d


@pytest.mark.parametrize("kind, needles", [
    ("not-parquet", ["val.parquet: not a readable Parquet file"]),
    ("missing-column", ["val.parquet: column 'C7' is missing"]),
    ("wrong-type", ["val.parquet: column 'C3' has type string, expected uint32"]),
    ("label-2", ["val.parquet: row group 0, row 5: label is 2, expected 0 or 1"]),
    ("label-null", ["val.parquet: row group 0, row 5: label is missing"]),
    ("no-rows", ["val.parquet: no rows to read"]),
])
def test_bad_parquet(kind, needles, done_run, capsys, tmp_path):
    d = _bad_data_dir(tmp_path, _synthetic_test_file(done_run), kind)
    _check(train.main([*TINY, "--run-dir", str(tmp_path / "r"), "--data-dir", str(d)]), capsys, *needles)


# ---- checkpoints -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncate", "corrupt", "delete-file"])
def test_damaged_checkpoint_falls_back_with_a_warning(damage, done_run, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(done_run, run)
    good = sorted((run / "checkpoints").glob("step_*"))[-1]
    newer = good.with_name("step_99999999")
    shutil.copytree(good, newer)
    victim = next(f for f in sorted(newer.iterdir()) if f.suffix == ".distcp")
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:10])
    elif damage == "corrupt":
        raw = bytearray(victim.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        victim.write_bytes(bytes(raw))
    else:
        victim.unlink()
    with caplog.at_level("WARNING"):
        assert Checkpointer(run / "checkpoints").latest_valid() == good
    assert "step_99999999 is unusable" in caplog.text and victim.name in caplog.text
    assert newer.exists()  # reported, not deleted


def test_incomplete_checkpoint_is_ignored_and_reported(done_run, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(done_run, run)
    good = sorted((run / "checkpoints").glob("step_*"))[-1]
    partial = good.with_name(".tmp_step_99999999")
    shutil.copytree(good, partial)
    (partial / "manifest.json").unlink()
    with caplog.at_level("WARNING"):
        assert Checkpointer(run / "checkpoints").latest_valid() == good
    assert ".tmp_step_99999999: a checkpoint write that did not finish" in caplog.text
    assert partial.exists()


# ---- exported artifacts ----------------------------------------------------------------------------------------
def _artifact_copy(done_run, tmp_path):
    src = done_run / "model_int4.pt"
    dst = tmp_path / "model.pt"
    shutil.copy(src, dst)
    shutil.copy(str(src) + ".json", str(dst) + ".json")
    shutil.copy(done_run / "model_int4.rows", tmp_path / "model_int4.rows")  # the name its manifest gives
    return dst


@pytest.mark.parametrize("damage, needles", [
    ("missing", ["no such model file"]),
    ("truncate", ["checksum does not match"]),
    ("tamper", ["checksum does not match"]),
    ("garbage-no-sidecar", ["not a loadable dqrm model artifact"]),
    ("foreign-torchscript", ["has no dqrm_manifest.json"]),
    ("bad-sidecar", ["model.pt.json: not the JSON export writes"]),
    ("folder", ["is a folder, not a model file"]),
    ("rows-missing", ["model_int4.rows: the table rows of model.pt are missing"]),
    ("rows-truncated", ["model_int4.rows:", "bytes, the manifest says", "truncated"]),
    ("rows-tampered", ["model_int4.rows: checksum does not match model.pt's manifest"]),
])
def test_bad_artifact(damage, needles, done_run, tmp_path, capsys):
    path = _artifact_copy(done_run, tmp_path)
    sidecar = Path(str(path) + ".json")
    if damage == "missing":
        path.unlink()
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "tamper":
        raw = bytearray(path.read_bytes())
        raw[-100] ^= 0x01
        path.write_bytes(bytes(raw))
    elif damage == "bad-sidecar":
        sidecar.write_text("{truncated")
    elif damage == "folder":
        path.unlink()
        path.mkdir()
    elif damage.startswith("rows-"):
        rows = path.parent / "model_int4.rows"
        raw = bytearray(rows.read_bytes())
        if damage == "rows-missing":
            rows.unlink()
        elif damage == "rows-truncated":
            rows.write_bytes(bytes(raw[:-7]))
        else:
            raw[len(raw) // 2] ^= 0x10
            rows.write_bytes(bytes(raw))
    elif damage == "garbage-no-sidecar":
        sidecar.unlink()
        path.write_bytes(b"\x00" * 100)
    else:
        sidecar.unlink()
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    rc = predict.main(["--model", str(path), "--data", str(_synthetic_test_file(done_run))])
    _check(rc, capsys, *needles)


def test_predict_on_wrong_schema(done_run, tmp_path, capsys):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"label": pa.array([1], pa.int8())}), bad)
    _check(predict.main(["--model", str(done_run / "model_int4.pt"), "--data", str(bad)]), capsys,
           "bad.parquet: column 'I1' is missing")


def test_predict_refuses_a_vocabulary_for_a_hashing_model_and_a_folder(done_run, tmp_path, capsys):
    model, data = str(done_run / "model_int4.pt"), str(_synthetic_test_file(done_run))
    _check(predict.main(["--model", model, "--data", data, "--vocab-dir", str(tmp_path)]), capsys,
           "trained with hashed ids")
    _check(predict.main(["--model", model, "--data", str(tmp_path)]), capsys, "is a folder; pass its Parquet files")


def test_predict_on_unlabeled_data_says_auc_is_undefined(done_run, tmp_path, capsys):
    table = pq.read_table(_synthetic_test_file(done_run))
    zeros = tmp_path / "unlabeled.parquet"
    pq.write_table(table.set_column(0, "label", pa.array([0] * table.num_rows, table.schema.field("label").type)),
                   zeros)
    assert predict.main(["--model", str(done_run / "model_int4.pt"), "--data", str(zeros)]) == 0
    out = capsys.readouterr()
    assert "AUC n/a" in out.out and "every label is 0, so AUC is undefined" in out.err
    assert predict.main(["--model", str(done_run / "model_int4.pt"), "--data", str(zeros), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["auc"] is None  # strict JSON: null, not NaN


def test_predict_works_on_the_good_artifact(done_run, capsys):
    assert predict.main(["--model", str(done_run / "model_int4.pt"), "--data",
                         str(_synthetic_test_file(done_run)), "--json"]) == 0
    m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert m["rows"] == 4096 and 0.5 < m["auc"] <= 1


# ---- training numerics -----------------------------------------------------------------------------------------
def test_non_finite_loss_stops_with_step_rank_and_checkpoint(capsys, tmp_path):
    rc = train.main([*TINY, "--run-dir", str(tmp_path / "r"), "--set", "optim.lr=1e30",
                     "--set", "optim.embedding_lr=1e30", "--set", "quant_mode=fp32"])
    _check(rc, capsys, "rank 0: training loss is", "at step", "last good checkpoint: none")


# ---- the file system refuses a write ---------------------------------------------------------------------------
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a read-only bind or a tmpfs needs root "
                                                          "(chmod does not stop root, so there is no other way)")


@contextlib.contextmanager
def _mounted(*args: str, target: Path):
    subprocess.run(["mount", *args, str(target)], check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


@needs_root
def test_a_read_only_checkpoint_folder_stops_the_job_with_one_line(capsys, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    with _mounted("--bind", "-o", "ro", str(run_dir / "checkpoints"), target=run_dir / "checkpoints"):
        rc = train.main([*TINY, "--run-dir", str(run_dir)])
    line = _check(rc, capsys, str(run_dir / "checkpoints"), "the file system is read-only", "rerun the same command")
    assert "Traceback" not in line
    # writable again, the same command runs to the end
    assert train.main([*TINY, "--run-dir", str(run_dir)]) == 0


@needs_root
def test_a_full_disk_while_writing_rows_names_the_file(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    with _mounted("-t", "tmpfs", "-o", "size=64k", "tmpfs", target=disk):
        sink = FileSink(disk / "model_int4.rows", 1 << 20)  # sparse: the size is not yet written
        with pytest.raises(OSError) as e:
            sink.write(0, torch.ones(1 << 18, dtype=torch.float32).view(torch.uint8))
        assert e.value.errno == errno.ENOSPC and e.value.filename == str(disk / "model_int4.rows")
        assert train.os_error_line(e.value, tmp_path).startswith(f"{disk / 'model_int4.rows'}: the disk is full")
        os.close(sink.fd)

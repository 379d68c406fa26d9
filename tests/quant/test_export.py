"""The TorchScript artifact as served: it leaves its caller's tensors alone, and loading refuses shipped files (a row
map) that are not the ones exported with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dqrm.datasets.row_map import RowMap
from dqrm.datasets.schema import FEATURE_NAMES
from dqrm.pipeline import predict
from dqrm.quant.export import export, load_with_manifest
from dqrm.quant.manifest import sha256
from dqrm.quant.program import program_path
from tests.helpers import CARDS, served_leaving_inputs_alone, tiny_data


def test_artifact_leaves_the_callers_ids_alone(integer_dlrm, exported, out_of_range_batch):
    """FBGEMM's bounds check sets an out-of-range id to 0 in place, and on CPU TorchRec hands it the caller's
    ``values``: the artifact must serve a copy. The logits stay the evaluated model's, the id read as row 0."""
    module, _ = load_with_manifest(exported)
    served = served_leaving_inputs_alone(module, out_of_range_batch)
    dense, values, lengths, i = out_of_range_batch
    zeroed = values.clone()
    zeroed[i] = 0
    with torch.no_grad():
        evaluated = integer_dlrm(dense, KeyedJaggedTensor(keys=FEATURE_NAMES, values=zeroed, lengths=lengths))
    assert torch.equal(served, evaluated.squeeze(-1))


def _row_map(seed: int) -> RowMap:
    """The last table (1000 rows) as 999 kept rows of an id space of 5000 plus the shared row; the others unmapped."""
    kept = np.sort(np.random.default_rng(seed).choice(5000, CARDS[-1] - 1, replace=False)).astype(np.int32)
    return RowMap(id_space=(*CARDS[:-1], 5000), kept=(None,) * (len(CARDS) - 1) + (kept,))


@pytest.fixture
def with_row_map(integer_dlrm, tmp_path) -> Path:
    """An artifact exported as the budgeted job exports one: its row map beside it, named in the manifest."""
    path = tmp_path / "model_int4.pt"
    _row_map(0).save(path.with_suffix(".rowmap.npz"))
    return export(integer_dlrm, FEATURE_NAMES, path, {"num_embeddings": list(CARDS), "vocab_dir": None,
                                                       "row_map": "model_int4.rowmap.npz"},
                  shipped=(path.with_suffix(".rowmap.npz"),))


def test_a_different_row_map_with_the_same_kept_counts_is_refused(with_row_map, tmp_path_factory, capsys):
    path, row_map = with_row_map, with_row_map.with_suffix(".rowmap.npz")
    manifest = json.loads(Path(str(path) + ".json").read_text())
    assert manifest["shipped"] == {row_map.name: sha256(row_map)}
    test_file = str(tiny_data(tmp_path_factory.mktemp("data")) / "test.parquet")
    assert predict.main(["--model", str(path), "--data", test_file, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 512

    other = _row_map(1)  # the same tables (kept counts), other rows: only the checksum tells them apart
    assert other.num_embeddings() == _row_map(0).num_embeddings() == list(CARDS)
    assert not np.array_equal(other.kept[-1], _row_map(0).kept[-1])
    other.save(row_map)
    for model in (path, program_path(path)):
        with pytest.raises(ValueError, match="checksum does not match") as e:
            load_with_manifest(model)
        assert str(e.value).startswith(f"{row_map}: ") and "re-export" in str(e.value)
        assert "\n" not in str(e.value)
    assert predict.main(["--model", str(path), "--data", test_file]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {row_map}: checksum does not match model_int4.pt's manifest") and \
        err.count("\n") == 1, err

    row_map.unlink()
    with pytest.raises(FileNotFoundError, match="model_int4.rowmap.npz: shipped with model_int4.pt"):
        load_with_manifest(path)


def test_predict_refuses_a_row_map_exported_without_its_checksum(integer_dlrm, tmp_path, capsys):
    """An artifact whose manifest names a row map but not its SHA-256 (exported before maps were hashed)."""
    path = tmp_path / "model_int4.pt"
    _row_map(0).save(path.with_suffix(".rowmap.npz"))
    export(integer_dlrm, FEATURE_NAMES, path, {"num_embeddings": list(CARDS), "vocab_dir": None,
                                               "row_map": "model_int4.rowmap.npz"}, program=False)
    assert predict.main(["--model", str(path), "--data", str(tmp_path / "unused.parquet")]) == 1
    err = capsys.readouterr().err
    assert "names the row map model_int4.rowmap.npz but not its SHA-256" in err and "re-export" in err, err


def test_a_shipped_file_must_lie_beside_the_model(integer_dlrm, tmp_path):
    elsewhere = tmp_path / "elsewhere.npz"
    _row_map(0).save(elsewhere)
    with pytest.raises(ValueError, match="a shipped file must be a file beside"):
        export(integer_dlrm, FEATURE_NAMES, tmp_path / "model" / "model_int4.pt", {}, shipped=(elsewhere,))

"""Every shipped config builds its model and runs from the CLI as named; overrides parse by type and reject what
does not exist; ``--set`` reaches every field ``--fields`` lists."""

import contextlib
import dataclasses
import io
import json
import re
from pathlib import Path

import pytest
import torch

from dqrm.pipeline.cli import build_config, fields_table, parse_args
from dqrm.pipeline.config import JobConfig, apply_override, describe_fields, to_dict, validate
from dqrm.pipeline.configs import CONFIGS, get_config
from dqrm.pipeline.model import build_dlrm, embedding_tables
from dqrm.pipeline.train import main
from dqrm.quant.convert import RowLayout

META = torch.device("meta")


def _layers(arch: torch.nn.Module) -> list[tuple[int, int]]:
    """(in, out) of each linear layer, in order."""
    return [(m.in_features, m.out_features) for m in arch.modules() if isinstance(m, torch.nn.Linear)]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_shipped_config_builds_its_model_and_runs_as_named(name, tmp_path):
    cfg = get_config(name)
    # `--config NAME` without other flags is exactly the named config (only the run dir given here differs); a
    # config trained on a vocabulary that has not been built says which file is missing and how to build it
    args = parse_args(["--config", name, "--run-dir", str(tmp_path)])
    if cfg.data.vocab_dir and not Path(cfg.data.vocab_dir).is_dir():
        with pytest.raises(FileNotFoundError, match=f"{cfg.data.vocab_dir}/C1.npy: no vocabulary file.*convert"):
            build_config(args)
    else:
        from_cli = build_config(args)
        assert from_cli == dataclasses.replace(cfg, run_dir=str(tmp_path)) and from_cli.name == name
    json.dumps(to_dict(cfg), allow_nan=False)  # the run dir's config.json, which a resumed job is compared with
    # The model it builds (tables on the meta device): one table per feature with the configured rows and width,
    # a bottom MLP from the 13 dense features, a top MLP over the dot interaction of 27 vectors (or, for DLRM_DCN,
    # over the 27 vectors crossed).
    dlrm = build_dlrm(cfg.model, META).model
    tables = dlrm.sparse_arch.embedding_bag_collection.embedding_bags
    assert [tuple(tables[f"t_cat_{i}"].weight.shape) for i in range(26)] == \
        [(n, cfg.model.embedding_dim) for n in cfg.model.num_embeddings]
    bottom, top = _layers(dlrm.dense_arch), _layers(dlrm.over_arch)
    assert [i for i, _ in bottom] == [13, *cfg.model.dense_arch[:-1]] and [o for _, o in bottom] == \
        list(cfg.model.dense_arch)
    if cfg.model.arch == "dcn":  # DLRM_DCN: the over arch reads the 27 vectors after the low-rank cross layers
        crossnet = dlrm.inter_arch.crossnet
        n, r = 27 * cfg.model.embedding_dim, cfg.model.dcn_low_rank_dim
        assert [tuple(w.shape) for w in crossnet.V_kernels] == [(r, n)] * cfg.model.dcn_num_layers
        assert [tuple(w.shape) for w in crossnet.W_kernels] == [(n, r)] * cfg.model.dcn_num_layers
        assert top[0][0] == n
    else:
        assert top[0][0] == cfg.model.embedding_dim + 27 * 26 // 2
    assert [o for _, o in top] == list(cfg.model.over_arch)


def test_named_configs_keep_their_runs_apart():
    """A run dir with checkpoints is resumed (or refused, for another config): two experiments run without
    --run-dir must not share one."""
    run_dirs = {name: get_config(name).run_dir for name in CONFIGS}
    assert len(set(run_dirs.values())) == len(run_dirs), run_dirs


def test_mlperf_models_have_the_papers_sizes():
    """The Kaggle and Terabyte configs build the DQRM paper's models (arXiv 2410.20046): FP32 tables of 2.161 and
    12.575 GB, and INT4 tables of 0.270 and 1.572 GB counting 4-bit codes only (FBGEMM's row format adds an fp16
    scale and bias per row: about 0.405 GB for Kaggle). The paper's Terabyte FP32 figure is 1.3 MB (0.01 %) under
    these 49.1M rows x 64 x 4 bytes; its INT4 figure matches to the MB."""
    for name, fp32_gb, int4_gb, fbgemm_gb in (("kaggle", 2.161, 0.270, 0.405), ("terabyte", 12.575, 1.572, None)):
        cfg = get_config(name)
        dlrm = build_dlrm(cfg.model, META).model
        table_bytes = sum(p.numel() * 4 for p in dlrm.sparse_arch.parameters())
        assert table_bytes / 1e9 == pytest.approx(fp32_gb, rel=2e-4), name
        layout = RowLayout.of(embedding_tables(cfg.model), cfg.quant)
        assert cfg.quant.embedding_bits == 4
        assert round(sum(t.rows * t.code_bytes for t in layout.tables) / 1e9, 3) == int4_gb, name
        if fbgemm_gb:
            assert round(layout.total_bytes / 1e9, 3) == fbgemm_gb
        # MLPerf DLRM's MLPs: bottom 13-512-256-64[-16], top 512-256-1 (Kaggle), 512-512-256-1
        bottom, top = _layers(dlrm.dense_arch), _layers(dlrm.over_arch)
        assert [o for _, o in bottom] == ([512, 256, 64, 16] if name == "kaggle" else [512, 256, 64])
        assert [o for _, o in top] == ([512, 256, 1] if name == "kaggle" else [512, 512, 256, 1])
        # the paper's batch per trainer and table scale refresh period, pinned
        assert cfg.data.reader(train=True, seed=0).batch_size == (128 if name == "kaggle" else 2048)
        assert cfg.quant.scale_update_every == (200 if name == "kaggle" else 1000)


def test_cli_overrides():
    cfg = build_config(parse_args(["--config", "tiny", "--epochs", "3", "--lr", "0.05", "--set",
                                   "quant.embedding_bits=8", "--set", "quant.table_bits=t_cat_1:2,t_cat_2:8",
                                   "--set", "data.shuffle=false"]))
    assert cfg.epochs == 3 and cfg.optim.lr == 0.05 and cfg.optim.embedding_lr == 0.05
    assert cfg.quant.embedding_bits == 8 and cfg.quant.table_bits == {"t_cat_1": 2, "t_cat_2": 8}
    assert cfg.data.shuffle is False


def test_dict_overrides_parse_by_the_fields_value_type():
    """Placements hold ':' and ',' themselves (``column_wise:0,1``); bit widths are ints."""
    cfg = build_config(parse_args(["--config", "tiny", "--set",
                                   "plan.overrides=t_cat_3:row_wise,t_cat_4:table_wise:1,t_cat_5:column_wise:0,1",
                                   "quant.table_bits=t_cat_1:2,t_cat_2:8,"]))  # a trailing comma is fine
    assert cfg.plan.overrides == {"t_cat_3": "row_wise", "t_cat_4": "table_wise:1", "t_cat_5": "column_wise:0,1"}
    assert cfg.quant.table_bits == {"t_cat_1": 2, "t_cat_2": 8}


def test_fields_that_must_agree_change_together_on_the_command_line():
    cfg = build_config(parse_args(["--config", "tiny", "--set", "model.embedding_dim=32", "model.dense_arch=64,32"]))
    assert cfg.model.embedding_dim == 32 and cfg.model.dense_arch == (64, 32)
    with pytest.raises(ValueError, match="dense_arch must end with embedding_dim=32"):
        build_config(parse_args(["--config", "tiny", "--set", "model.embedding_dim=32"]))


@pytest.mark.parametrize("flag", ["quant.table_bits=t_cat_3:8,cat_4:8", "plan.overrides=t_cat_99:row_wise"])
def test_per_table_settings_must_name_a_table(flag, capsys):
    assert main(["--config", "tiny", "--set", flag]) == 2
    err = capsys.readouterr().err
    assert "no table named" in err and ("cat_4" in err or "t_cat_99" in err) and "t_cat_0 .. t_cat_25" in err


def test_every_config_field_has_a_docstring_and_fields_lists_them():
    """``--fields`` is the reference of what ``--set`` accepts; an undocumented field would print a blank line."""
    fields = describe_fields(get_config("tiny"))
    missing = [path for path, _, doc in fields if not doc]
    assert not missing, f"config fields without a docstring: {missing}"
    listing = fields_table(build_config(parse_args(["--config", "tiny", "--set", "quant.table_bits=t_cat_1:8"])))
    assert "quant.table_bits = t_cat_1:8" in listing and "data.synthetic.seed = " in listing


def _shown(value) -> str:
    """A value as ``--fields`` prints it and ``--set`` takes it."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return ",".join(f"{k}:{v}" for k, v in value.items())
    return str(value)


def _another(value):
    """A value of the same type that differs (validity aside: each override is checked alone, unvalidated)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 3
    if isinstance(value, tuple):
        return (*value, 7)
    if isinstance(value, dict):
        return {**value, "t_cat_9": 2}
    return value + "_x"


def test_set_reaches_every_field_that_fields_lists():
    """Each leaf ``--fields`` lists, set with ``--set PATH=VALUE`` as it prints values, changes that field and no
    other, and ``--fields`` then shows the new value: nothing listed is unreachable or reached by another name."""
    base = describe_fields(get_config("tiny"))
    assert all(not dataclasses.is_dataclass(value) for _, value, _ in base)  # sections are walked, not listed
    for path, value, _ in base:
        new = _shown(_another(value))
        cfg = get_config("tiny")
        apply_override(cfg, f"{path}={new}", check=False)
        after = describe_fields(cfg)
        changed = [p for (p, v, _), (_, v0, _) in zip(after, base) if v != v0]
        assert changed == [path], (path, changed)
        assert f"\n{path} = {new}\n" in fields_table(cfg), path


def test_every_example_in_the_help_is_what_set_accepts():
    """Each field's help shows values as ``--set`` takes them: every ``--set PATH=VALUE`` example in the field
    docstrings and the ``--help`` text applies as written and sets that field, and no help shows a Python literal
    (a dict or list, which ``--set`` would refuse)."""
    examples = []
    for path, _, doc in describe_fields(get_config("tiny")):
        assert not re.search(r"[{}\[\]]", doc), (path, doc)
        examples += re.findall(r"--set (\S+?=\S+?)(?:``|\s|$)", doc)
    with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as out:
        parse_args(["--help"])
    examples += [e for e in re.findall(r"(\S+?=\S+)", " ".join(out.getvalue().split())) if "." in e.split("=")[0]]
    assert {e.split("=")[0] for e in examples} >= {"quant.table_bits", "plan.overrides", "quant.embedding_bits"}
    for example in examples:
        cfg = get_config("tiny")
        apply_override(cfg, example, check=False)
        validate(cfg)
        path, raw = example.split("=", 1)
        assert f"\n{path} = {raw}\n" in fields_table(cfg) + "\n", example


@pytest.mark.parametrize("override, message", [
    ("epochs=0", "epochs must be at least 1"),
    ("nosuch=1", "has no field 'nosuch'"),
    ("model.embedding_dim=abc", "cannot parse 'abc' as int"),
    ("model.embedding_dim=32", "dense_arch must end with embedding_dim=32"),
    ("quant.embedding_bits=3", "3 bits unsupported"),
    ("quant_mode=int3", "quant_mode must be one of"),
    ("quant.granularity=channel", "granularity must be 'table' or 'row'"),
    ("quant.mlp_compute=fp16", "mlp_compute must be one of"),
    ("epochs", "must look like field.path=value"),
])
def test_bad_overrides_fail_clearly(override, message):
    with pytest.raises(ValueError, match=message):
        apply_override(JobConfig(), override)


def test_bfloat16_mlps_are_refused_where_no_mlp_is_fake_quantized():
    """quant_mode fp32 never prepares the model: its MLPs would silently stay float32."""
    cfg = JobConfig()
    apply_override(cfg, "quant.mlp_compute=bfloat16")
    assert cfg.quant.mlp_compute == "bfloat16"
    with pytest.raises(ValueError, match="quant_mode fp32 trains plain float32 MLPs"):
        apply_override(cfg, "quant_mode=fp32")

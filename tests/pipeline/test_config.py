"""Every shipped config builds and validates; overrides parse by type and reject what does not exist."""

import pytest

import dataclasses

from pipeline.config import JobConfig, apply_override, describe_fields
from pipeline.configs import CONFIGS, get_config
from pipeline.train import build_config, fields_table, main, parse_args


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_shipped_config_loads(name):
    cfg = get_config(name)
    assert cfg.name == name
    assert len(cfg.model.num_embeddings) == 26
    assert cfg.model.dense_arch[-1] == cfg.model.embedding_dim
    assert cfg.quant_mode in ("fp32", "qat", "ptq")


def test_mlperf_shapes():
    k, t = get_config("kaggle"), get_config("terabyte")
    assert k.model.num_embeddings[2] == 10131227 and k.model.embedding_dim == 16 and k.data.batch_size == 128
    assert k.model.dense_arch == (512, 256, 64, 16) and k.model.over_arch == (512, 256, 1)
    assert t.model.embedding_dim == 64 and t.model.over_arch == (512, 512, 256, 1) and t.data.batch_size == 2048
    assert k.quant.scale_update_every == 200 and t.quant.scale_update_every == 1000


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
    cfg = get_config("tiny")
    fields = describe_fields(cfg)
    missing = [path for path, _, doc in fields if not doc]
    assert not missing, f"config fields without a docstring: {missing}"
    leaves = len([f for f in dataclasses.fields(cfg) if not dataclasses.is_dataclass(getattr(cfg, f.name))])
    assert len(fields) > leaves  # nested sections were walked
    listing = fields_table(build_config(parse_args(["--config", "tiny", "--set", "quant.table_bits=t_cat_1:8"])))
    assert "quant.table_bits = t_cat_1:8" in listing and "data.synthetic.seed = " in listing


@pytest.mark.parametrize("override, message", [
    ("epochs=0", "epochs must be at least 1"),
    ("nosuch=1", "has no field 'nosuch'"),
    ("model.embedding_dim=abc", "cannot parse 'abc' as int"),
    ("model.embedding_dim=32", "dense_arch must end with embedding_dim=32"),
    ("quant.embedding_bits=3", "3 bits unsupported"),
    ("quant_mode=int3", "quant_mode must be one of"),
    ("quant.granularity=channel", "granularity must be 'table' or 'row'"),
    ("epochs", "must look like field.path=value"),
])
def test_bad_overrides_fail_clearly(override, message):
    with pytest.raises(ValueError, match=message):
        apply_override(JobConfig(), override)

"""Every shipped config builds and validates; overrides parse by type and reject what does not exist."""

import pytest

from pipeline.config import JobConfig, apply_override
from pipeline.configs import CONFIGS, get_config
from pipeline.train import build_config, parse_args


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

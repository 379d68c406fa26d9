"""``model.mlp_init``: 'dlrm' redraws every MLP layer as facebookresearch/dlrm does, from the seeded generator, and
leaves the embedding tables and the default ('torch') initialization alone."""

import dataclasses
import math

import pytest
import torch

from dqrm.pipeline.config import ModelConfig
from dqrm.pipeline.configs import CONFIGS, get_config
from dqrm.pipeline.model import build_dlrm

CPU = torch.device("cpu")
# kaggle's MLPs (13-512-256-64-16, 367-512-256-1) on small tables: the layers are large enough to measure spreads
KAGGLE_MLPS = dataclasses.replace(get_config("kaggle").model, num_embeddings=(50,) * 26)


def _build(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_dlrm(cfg, CPU, table_device=CPU)


def _linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


def test_dlrm_init_draws_weights_and_biases_with_the_reference_spreads():
    model = _build(dataclasses.replace(KAGGLE_MLPS, mlp_init="dlrm"))
    layers = _linears(model)
    assert [(m.in_features, m.out_features) for m in layers] == [
        (13, 512), (512, 256), (256, 64), (64, 16), (367, 512), (512, 256), (256, 1)]
    for layer in layers:
        fan_out, fan_in = layer.weight.shape
        # N(0, 2/(fan_in+fan_out)): nn.Linear's default is U(+-1/sqrt(fan_in)), std 1/sqrt(3 fan_in), which is
        # 0.5x of this for every layer but the first (13 -> 512: 2.6x), so 10% tells them apart
        assert layer.weight.std().item() == pytest.approx(math.sqrt(2 / (fan_in + fan_out)), rel=0.1)
        assert layer.weight.mean().abs().item() < 0.1 * math.sqrt(2 / (fan_in + fan_out))
        if fan_out >= 256:  # N(0, 1/fan_out); the default is U(+-1/sqrt(fan_in)), under a third of it here
            assert layer.bias.std().item() == pytest.approx(math.sqrt(1 / fan_out), rel=0.15)
    # a normal draw exceeds the default's uniform bound 1/sqrt(fan_in); a uniform one never does
    big = layers[1]
    assert big.weight.abs().max().item() > 1.5 / math.sqrt(big.in_features)


def test_default_init_is_torchs_and_only_the_mlps_differ():
    torch_init = _build(KAGGLE_MLPS)
    dlrm_init = _build(dataclasses.replace(KAGGLE_MLPS, mlp_init="dlrm"))
    for layer in _linears(torch_init):  # kaiming-uniform: inside +-1/sqrt(fan_in)
        assert layer.weight.abs().max().item() <= 1 / math.sqrt(layer.in_features)
    tables = lambda m: m.model.sparse_arch.embedding_bag_collection.state_dict()  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(tables(torch_init).values(), tables(dlrm_init).values()))
    assert not any(torch.equal(a.weight, b.weight) for a, b in zip(_linears(torch_init), _linears(dlrm_init)))


def test_dlrm_init_is_reproducible_by_seed():
    cfg = dataclasses.replace(KAGGLE_MLPS, mlp_init="dlrm")
    a, b, c = _build(cfg, seed=1), _build(cfg, seed=1), _build(cfg, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(_linears(a)[0].weight, _linears(c)[0].weight)


def test_dlrm_init_applies_to_dcn_mlps_and_builds_on_meta():
    cfg = dataclasses.replace(get_config("dlrm_v2_tiny").model, mlp_init="dlrm")
    model = _build(cfg)
    last = _linears(model)[-1]
    assert last.out_features == 1 and abs(last.bias.item()) > 0  # N(0, 1): the logit's bias
    meta = build_dlrm(cfg, torch.device("meta"))  # as every shipped config is built in the tests: no memory
    assert all(m.weight.is_meta and m.bias.is_meta for m in _linears(meta))


def test_unknown_mlp_init_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"model.mlp_init must be one of \('torch', 'dlrm'\), got 'xavier'"):
        ModelConfig(mlp_init="xavier")


def test_only_the_configs_compared_with_the_reference_draw_like_it():
    drawn_like_dlrm = sorted(name for name in CONFIGS if get_config(name).model.mlp_init == "dlrm")
    assert drawn_like_dlrm == ["kaggle_sample", "kaggle_sample_fp32"]

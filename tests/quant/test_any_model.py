"""QAT of any TorchRec model with an EmbeddingBagCollection, found by type and filter: TorchRec's DLRM, DLRM_DCN
(DCNv2 cross layers, ``ParameterList`` kernels) and a two-tower model that is neither (its own dense-feature count,
two table widths, a filter that leaves one tower float). Each is sharded by DMP at world size 2 (gloo), prepared,
trained a few steps, converted and exported; the artifact, loaded in a fresh process with torch and fbgemm_gpu only,
serves the fake-quant model's evaluation logits within 1e-5."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.models.dlrm import DLRMTrain
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mlp import MLP

from dqrm.datasets.schema import FEATURE_NAMES
from dqrm.pipeline.config import ModelConfig, OptimConfig
from dqrm.pipeline.model import build_dlrm
from dqrm.pipeline.optimizer import build_optimizer, fuse_embedding_optimizer
from dqrm.quant.api import QATConfig, QuantSpec, quantize_
from dqrm.quant.crossnet_qat import FakeQuantLowRankCrossNet, QuantizedLowRankCrossNet
from dqrm.quant.export import STANDALONE_LOAD, export
from dqrm.quant.mlp_qat import FakeQuantLinear, QuantizedLinear
from dqrm.sharding.plan import plan_sharding, shard_model
from tests.dist_utils import run_distributed
from tests.helpers import CARDS, batches, tiny_data

STEPS, LOCAL_BATCH, EVAL_BATCH = 4, 64, 256
TWO_TOWER_DENSE = 5
QUERY, ITEM = FEATURE_NAMES[:13], FEATURE_NAMES[13:]


class TwoTower(nn.Module):
    """Neither DLRM nor DCN: a query tower over 5 dense features and the query tables (dim 8), an item tower over the
    item tables (dim 16), the logit their dot product. Its forward is TorchRec's ``(dense_features, KJT)``."""

    def __init__(self, ebc: EmbeddingBagCollection, sizes: tuple[int, ...] = (32, 8)) -> None:
        super().__init__()
        self.ebc = ebc
        self.query_tower = MLP(TWO_TOWER_DENSE + 8 * len(QUERY), list(sizes))
        self.item_tower = MLP(16 * len(ITEM), list(sizes))

    def forward(self, dense_features: torch.Tensor, sparse_features) -> torch.Tensor:
        pooled = self.ebc(sparse_features).to_dict()
        query = torch.cat([dense_features] + [pooled[f] for f in QUERY], dim=1)
        item = torch.cat([pooled[f] for f in ITEM], dim=1)
        return (self.query_tower(query) * self.item_tower(item)).sum(dim=1, keepdim=True)


def two_tower() -> DLRMTrain:
    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=8 if f in QUERY else 16, num_embeddings=n,
                                 feature_names=[f]) for f, n in zip(FEATURE_NAMES, CARDS)]
    return DLRMTrain(TwoTower(EmbeddingBagCollection(tables=tables, device=torch.device("meta"))))


def not_the_item_tower(module: nn.Module, fqn: str) -> bool:
    return "item_tower" not in fqn


MODELS = {
    "dlrm": lambda: build_dlrm(ModelConfig(num_embeddings=CARDS, dense_arch=(32, 16), over_arch=(32, 1)),
                               torch.device("cpu")),
    "dcn": lambda: build_dlrm(ModelConfig(arch="dcn", num_embeddings=CARDS, dense_arch=(32, 16), over_arch=(32, 1),
                                          dcn_num_layers=2, dcn_low_rank_dim=8), torch.device("cpu")),
    "two_tower": two_tower,
}
FILTERS = {"two_tower": not_the_item_tower}
DENSE = {"two_tower": TWO_TOWER_DENSE}


def _batch(batch, kind) -> Batch:
    """The reader's batch with the model's dense features (the two-tower reads the first 5)."""
    return Batch(dense_features=batch.dense_features[:, :DENSE.get(kind, 13)].contiguous(),
                 sparse_features=batch.sparse_features, labels=batch.labels)


def _run(rank, world_size, data_dir, out_dir, kind):
    torch.manual_seed(3)
    model = MODELS[kind]()
    ebc = next(m for m in model.modules() if isinstance(m, EmbeddingBagCollection))
    fuse_embedding_optimizer(ebc.parameters(), OptimConfig(embedding_lr=1.0))
    plan = plan_sharding(model, world_size=world_size, device=torch.device("cpu"), pg=dist.group.WORLD)
    model = shard_model(model, plan, torch.device("cpu"))
    spec = QuantSpec(embedding_bits=4, granularity="table", scale_update_every=2, mlp_bits=4)
    filter_fn = FILTERS.get(kind)
    kwargs = {"filter_fn": filter_fn} if filter_fn else {}
    quantize_(model, QATConfig(spec=spec, step="prepare", **kwargs), pg=dist.group.WORLD)
    prepared = [type(m).__name__ for m in model.module.modules() if isinstance(m, (FakeQuantLinear,
                                                                                   FakeQuantLowRankCrossNet))]
    optimizer = build_optimizer(model, OptimConfig(lr=0.1, embedding_lr=1.0))
    model.train()
    for batch in batches(data_dir / "train.parquet", LOCAL_BATCH, rank=rank, world_size=world_size, limit=STEPS):
        loss, _ = model(_batch(batch, kind))  # through DMP: DDP reduces the dense gradients, QAT counts the step
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(_batch(b, kind))[1][1]
                            for b in batches(data_dir / "val.parquet", EVAL_BATCH, rank=rank, world_size=world_size)])
    gathered = [torch.empty_like(logits) for _ in range(world_size)]
    dist.all_gather(gathered, logits)
    int_model = quantize_(model, QATConfig(spec=spec, step="convert", **kwargs))
    if rank != 0:
        return None
    names = {name: type(m).__name__ for name, m in int_model.named_modules()
             if isinstance(m, (nn.Linear, QuantizedLinear, LowRankCrossNet, QuantizedLowRankCrossNet))
             and ".crossnet.layers." not in name}  # a cross layer's kernels are QuantizedLinears too
    path = export(int_model, list(FEATURE_NAMES), out_dir / kind / "model.pt", {"model": kind})
    inputs = []
    for r in range(world_size):
        for b in batches(data_dir / "val.parquet", EVAL_BATCH, rank=r, world_size=world_size):
            b = _batch(b, kind)
            inputs.append((b.dense_features, b.sparse_features.values(), b.sparse_features.lengths()))
    torch.save(inputs, out_dir / kind / "inputs.pt")
    return {"logits": torch.cat(gathered), "path": str(path), "prepared": prepared, "layers": names,
            "int_model": type(int_model).__name__}


SERVE = STANDALONE_LOAD + """
inputs = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(torch.cat([model(*x) for x in inputs]), sys.argv[3])
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("any-model-data"))


@pytest.mark.parametrize("kind", list(MODELS))
def test_sharded_model_trains_converts_and_serves_its_fake_quant_logits(kind, data_dir, tmp_path):
    out = run_distributed(_run, data_dir, tmp_path, kind, world_size=2)[0]
    served = tmp_path / "served.pt"
    # a fresh interpreter with torch and fbgemm_gpu only (no dqrm, no torchrec)
    subprocess.run([sys.executable, "-c", SERVE + "\nassert 'torchrec' not in sys.modules and 'dqrm' not in "
                    "sys.modules\n", out["path"], str(tmp_path / kind / "inputs.pt"), str(served)],
                   check=True, cwd=tmp_path)
    logits = torch.load(served)
    assert logits.shape == out["logits"].shape and logits.numel() == 1024
    assert torch.allclose(logits, out["logits"], rtol=0, atol=1e-5), (logits - out["logits"]).abs().max()
    assert logits.unique().numel() > 512  # logits of the inputs, not a constant
    layers = out["layers"]
    if kind == "two_tower":  # the filter kept the item tower float, in training and in serving
        assert out["prepared"] == ["FakeQuantLinear"] * 2
        assert {n: t for n, t in layers.items() if "query_tower" in n} == {
            "query_tower._mlp.0._linear": "QuantizedLinear", "query_tower._mlp.1._linear": "QuantizedLinear"}
        assert {n: t for n, t in layers.items() if "item_tower" in n} == {
            "item_tower._mlp.0._linear": "Linear", "item_tower._mlp.1._linear": "Linear"}
    else:  # every Linear, and DCN's cross net, fake-quantized and served as integers
        assert out["int_model"] == ("DLRM_DCN" if kind == "dcn" else "DLRM")
        assert "Linear" not in layers.values() and "LowRankCrossNet" not in layers.values()
        linears = [t for t in layers.values() if t == "QuantizedLinear"]
        assert len(linears) == 2 + 2 and out["prepared"].count("FakeQuantLinear") == 4
        assert (out["prepared"].count("FakeQuantLowRankCrossNet"), list(layers.values()).count(
            "QuantizedLowRankCrossNet")) == ((1, 1) if kind == "dcn" else (0, 0))


def test_cross_net_fake_quant_is_torchrecs_forward_on_the_grid_and_serves_the_same_values():
    """Unsharded: ``FakeQuantLowRankCrossNet`` switched off is TorchRec's cross net bit for bit; switched on, its
    output is exactly the integer cross net's; the kernels are on a 4-bit per-row grid; the gradient is the STE's."""
    torch.manual_seed(0)
    crossnet = LowRankCrossNet(in_features=24, num_layers=3, low_rank=5)
    with torch.no_grad():
        for b in crossnet.bias:
            b.normal_()
    x = torch.randn(7, 24)
    expected = crossnet(x)
    fq = FakeQuantLowRankCrossNet(crossnet, 4)
    assert fq.state_dict().keys() == crossnet.state_dict().keys()
    fq.fake_quant.enabled = False
    assert torch.equal(fq(x), expected)
    fq.fake_quant.enabled = True
    out = fq(x)
    assert not torch.allclose(out, expected, atol=1e-3)
    served = QuantizedLowRankCrossNet.from_crossnet(fq, 4)
    with torch.no_grad():
        assert torch.equal(served(x), out)
    for layer in served.layers:
        for kernel in (layer.v, layer.w):
            assert kernel.codes.abs().max() == 7 and kernel.codes.dtype == torch.int8
    out.sum().backward()  # straight-through: the kernels get gradients as if unquantized
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in crossnet.parameters())


def test_unsharded_model_prepares_dense_layers_by_type_and_filter():
    """On an unsharded DLRM_DCN, prepare finds the Linears and the cross net by type, the filter's fqn decides; the
    same filter at convert keeps the rejected layers float (tables here: post-training, FBGEMM's row grid)."""
    torch.manual_seed(0)
    model = build_dlrm(ModelConfig(arch="dcn", num_embeddings=CARDS, dense_arch=(32, 16), over_arch=(32, 1),
                                   dcn_num_layers=2, dcn_low_rank_dim=8), torch.device("cpu"),
                       table_device=torch.device("cpu"))
    seen = []

    def no_over_arch(module, fqn):
        seen.append((type(module).__name__, fqn))
        return not fqn.startswith("model.over_arch")

    quantize_(model, QATConfig(spec=QuantSpec(embedding_bits=0, mlp_bits=4), step="prepare", filter_fn=no_over_arch))
    assert ("LowRankCrossNet", "model.inter_arch.crossnet") in seen
    assert [n for n, m in model.named_modules() if isinstance(m, (FakeQuantLinear, FakeQuantLowRankCrossNet))] == [
        "model.dense_arch.model._mlp.0._linear", "model.dense_arch.model._mlp.1._linear", "model.inter_arch.crossnet"]
    int_model = quantize_(model, QATConfig(spec=QuantSpec(granularity="row", mlp_bits=4), step="convert",
                                           filter_fn=no_over_arch))
    kinds = {n: type(m).__name__ for n, m in int_model.named_modules()
             if isinstance(m, (nn.Linear, QuantizedLinear, QuantizedLowRankCrossNet))}
    assert kinds["inter_arch.crossnet"] == "QuantizedLowRankCrossNet"
    assert [t for n, t in kinds.items() if n.startswith("dense_arch")] == ["QuantizedLinear"] * 2
    assert [t for n, t in kinds.items() if n.startswith("over_arch")] == ["Linear"] * 2

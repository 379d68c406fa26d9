"""The touched-rows exchange against DDP's own all-reduce at world size 3 (gloo), where DDP's two ways of scaling a
gradient by 1/W round differently and its backend adds three ranks' values in an order of its own."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dqrm.pipeline.config import OptimConfig
from dqrm.pipeline.optimizer import build_optimizer
from dqrm.quant.convert import gather_full_state
from dqrm.sharding.comm import CommConfig, compress_gradients
from dqrm.sharding.tbe import find_tbes
from tests.dist_utils import run_distributed
from tests.helpers import batches, mixed_placements, sharded_model, tiny_data

STEPS, LOCAL, WORLD = 4, 64, 3
DDP = CommConfig(count_bytes=False)  # no comm hook at all: DDP's reducer scales and all-reduces
TOUCHED = CommConfig(dp_tables="touched", dp_whole_max_rows=0, count_bytes=False)
# every data-parallel kernel small enough to be all-reduced whole by the touched-rows hook
WHOLE = CommConfig(dp_tables="touched", dp_whole_max_rows=10**6, count_bytes=False)


def _dp_weights(model) -> list[torch.Tensor]:
    """The data-parallel kernels' weights (their gradients are what the DDP of the data-parallel tables reduces)."""
    return [lay.tbe.weights for lay in find_tbes(model) if isinstance(getattr(lay.tbe, "weights", None), torch.Tensor)]


def _model(world_size: int, comm: CommConfig):
    model, _ = sharded_model(world_size, mixed_placements(world_size, with_column_wise=False))
    compress_gradients(model, comm, None)
    return model, build_optimizer(model, OptimConfig())


def _clear_grads(model, optimizer, clear: str) -> None:
    if clear == "none":  # the job's optimizer: its torch.optim parts drop the gradients (set_to_none)
        optimizer.zero_grad()
    else:  # as an optimizer zeroing in place would: from the second step autograd accumulates in DDP's bucket
        for p in {id(p): p for p in [*model.parameters(), *_dp_weights(model)]}.values():
            if p.grad is not None:
                p.grad.zero_()


def _against_ddp(rank, world_size, data_dir, clear: str):
    """Per step, the data-parallel kernels' reduced gradients: with plain DDP, with every kernel all-reduced whole
    by the touched-rows hook (each trained by its own optimizer), and with touched rows (given DDP's weights before
    each step, so that every step's gradients differ only by the exchange). For the touched rows also how many ranks
    had a non-zero value at each element and the sum of the ranks' |value| / W."""
    local = batches(data_dir / "train.parquet", LOCAL, rank=rank, world_size=world_size, limit=STEPS)
    models = {name: _model(world_size, comm) for name, comm in (("ddp", DDP), ("whole", WHOLE), ("touched", TOUCHED))}
    mine: dict[int, torch.Tensor] = {}  # this rank's own gradient, before the exchange replaces it
    for w in _dp_weights(models["touched"][0]):
        w.register_post_accumulate_grad_hook(lambda p: mine.__setitem__(id(p), p.grad.clone()))
    out = {name: [] for name in models}
    out["ranks"], out["magnitude"] = [], []
    for model, _ in models.values():
        model.train()
    for batch in local:
        models["touched"][0].load_state_dict(models["ddp"][0].state_dict())
        for name, (model, optimizer) in models.items():
            loss, _ = model(batch)
            _clear_grads(model, optimizer, clear)
            loss.backward()
            out[name].append([w.grad.clone() for w in _dp_weights(model)])
            if name != "touched":
                optimizer.step()
        ranks, magnitude = [], []
        for w in _dp_weights(models["touched"][0]):
            ranks.append((mine[id(w)] != 0).to(torch.int32))
            magnitude.append(mine[id(w)].double().abs() / world_size)
            dist.all_reduce(ranks[-1])
            dist.all_reduce(magnitude[-1])
        out["ranks"].append(ranks)
        out["magnitude"].append(magnitude)
    out["ddp_state"], out["whole_state"] = (gather_full_state(models[name][0]) for name in ("ddp", "whole"))
    return out if rank == 0 else None


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("touched-data"))


# How the gradients reach DDP's bucket, so how DDP scales them: copied (x 1.0 / W) every step, or copied the first
# step and accumulated in the bucket (/ W) from the second on.
CLEAR = ["none", "zero"]


@pytest.fixture(scope="module", params=CLEAR)
def runs(request, data_dir):
    return run_distributed(_against_ddp, data_dir, request.param, world_size=WORLD)[0]


def test_kernels_all_reduced_whole_are_ddp_bit_for_bit_at_three_ranks(runs):
    # DDP multiplies a copied gradient by 1.0 / W and divides one accumulated in its bucket by W; at W = 3 the two
    # differ in the last bit of some values (dividing everything did, multiplying everything does).
    for step, (ddp, whole) in enumerate(zip(runs["ddp"], runs["whole"])):
        assert ddp and len(ddp) == len(whole)
        for a, b in zip(ddp, whole):
            assert (a != 0).sum() > 100 and torch.equal(a, b), step
    for key, value in runs["ddp_state"].items():
        assert torch.equal(runs["whole_state"][key], value), key


def test_touched_rows_are_ddp_bit_for_bit_where_at_most_two_ranks_touched_them(runs):
    # Adding two floats is commutative (and adding zero exact), so a value that at most two ranks sent non-zero is
    # DDP's bit for bit, each rank's scaled as DDP scales it. Where three ranks did, DDP's gloo ring adds them in an
    # order that depends on the value's chunk of the bucket, the exchange in rank order: each order rounds W - 1
    # partial sums, each by at most 2^-24 of itself, none larger than the sum S of the ranks' |value| / W, so the two
    # differ by at most (W - 1) 2^-23 S (measured: one ulp of S, in about a fifth of those values).
    few = many = 0
    for ddp, touched, ranks, magnitude in zip(runs["ddp"], runs["touched"], runs["ranks"], runs["magnitude"]):
        for a, b, n, s in zip(ddp, touched, ranks, magnitude):
            assert torch.equal(a[n <= 2], b[n <= 2])
            assert ((a.double() - b.double()).abs() <= (WORLD - 1) * 2.0 ** -23 * s)[n == WORLD].all()
            few, many = few + int(((n > 0) & (n <= 2)).sum()), many + int((n == WORLD).sum())
    assert few > 100 and many > 1000  # both kinds of value were exchanged (four steps, 1312 values each)

"""The INT8 reduce-scatter + all-gather hook (``sharding.int8_allreduce``) at world sizes 2 and 4 (gloo): within its
INT8 bound of the mean, error feedback that telescopes, about 4x fewer wire bytes than the FP32 ring all-reduce at
any world size, a checkpoint round trip of its error state, and a sharded DLRM that trains with it."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dqrm.sharding.byte_counter import ByteCounter, all_reduce_wire_bytes
from dqrm.sharding.ddp_hooks import int8_step
from dqrm.sharding.int8_allreduce import Int8ReduceScatterHook, _ChunkedBucket
from tests.dist_utils import run_distributed

STEPS = 6


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 1))


def _ddp_with_hook(bucket_cap_mb: float, counter=None):
    from torch.nn.parallel import DistributedDataParallel

    net = _net()
    ddp = DistributedDataParallel(net, bucket_cap_mb=bucket_cap_mb)
    hook = Int8ReduceScatterHook(counter, dict(net.named_parameters()), gather_group=dist.new_group(list(range(
        dist.get_world_size()))))
    ddp.register_comm_hook(None, hook.__call__)
    return net, ddp, hook


def _steps(rank, world_size, bucket_cap_mb):
    """STEPS DDP steps; per step this rank's raw gradient, carried error before the step and applied gradient
    (flat, in parameter order), and the wire bytes counted."""
    net, ddp, hook = _ddp_with_hook(bucket_cap_mb, ByteCounter())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    params = list(net.parameters())
    names = [n for n, _ in net.named_parameters()]
    gen = torch.Generator().manual_seed(rank)
    record = []
    for _ in range(STEPS):
        x, y = torch.randn(64, 13, generator=gen), torch.rand(64, 1, generator=gen)
        raw = torch.autograd.grad(nn.functional.mse_loss(net(x), y), params)
        err = hook.state_dict()
        before = torch.cat([err[f"rank{rank}.{n}"].reshape(-1).clone() for n in names])
        hook.counter.reset()
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        buckets = [(b.slot, b.rank, b.send.numel(), b.ag_in.numel()) for b in hook._buckets.values()]
        record.append({"raw": torch.cat([g.reshape(-1) for g in raw]), "err": before, "buckets": buckets,
                       "out": torch.cat([p.grad.reshape(-1) for p in params]), "bytes": dict(hook.counter.bytes)})
        opt.step()
    err = hook.state_dict()
    return record, torch.cat([err[f"rank{rank}.{n}"].reshape(-1) for n in names])


def _rows() -> list[tuple[int, int]]:
    """(numel, rows) of each parameter of ``_net`` in order: a weight's rows are its output rows, a bias one row."""
    return [(p.numel(), p.shape[0] if p.dim() > 1 else 1) for p in _net().parameters()]


def _per_row(flat: torch.Tensor, reduce) -> torch.Tensor:
    """``reduce`` over each row of a flat gradient, broadcast back to the row's elements."""
    out, o = [], 0
    for k, r in _rows():
        v = flat[o:o + k].view(r, -1)
        out.append(reduce(v).view(r, 1).expand(r, k // r).reshape(-1))
        o += k
    return torch.cat(out)


def _row_max(flat: torch.Tensor) -> torch.Tensor:
    return _per_row(flat.abs(), lambda v: v.amax(dim=1))


def _bound(inputs: list[torch.Tensor]) -> torch.Tensor:
    """The hook's error bound per element, for error-fed inputs x_w: each rank rounds x_w to its row's step
    s_w = max|x_w row| / 127 (error at most s_w / 2; the mean's at most mean_w s_w / 2); the owner rounds the
    reduced mean m, |m| <= max|mean x| + mean_w s_w / 2 per row, to its step (error at most half of it)."""
    half = sum(int8_step(_row_max(x)) for x in inputs) / len(inputs) / 2
    mean = sum(inputs) / len(inputs)
    return half + int8_step(_row_max(mean) + half) / 2


@pytest.fixture(scope="module", params=[(2, 25.0), (2, 0.0005), (4, 25.0), (4, 0.0005)],
                ids=["w2-one-bucket", "w2-buckets", "w4-one-bucket", "w4-buckets"])
def stepped(request):
    world, cap = request.param
    return world, run_distributed(_steps, cap, world_size=world)


def test_each_step_is_the_mean_within_the_int8_bound(stepped):
    world, ranks = stepped
    worst = 0.0
    for t in range(STEPS):
        inputs = [r[0][t]["raw"] + r[0][t]["err"] for r in ranks]  # what each rank fed the hook
        out = ranks[0][0][t]["out"]
        for r in ranks[1:]:
            assert torch.equal(r[0][t]["out"], out)  # every rank applies the same gradient
        mean = sum(inputs) / world
        slack = 1e-6 * mean.abs().max()  # fp32 sums
        assert ((out - mean).abs() <= _bound(inputs) + slack).all(), t
        worst = max(worst, float((out - mean).abs().max() / mean.abs().max()))
    assert worst > 1e-4  # and it is really quantized


def test_error_feedback_telescopes(stepped):
    # Applied gradients summed over steps = the true means summed, minus the mean over ranks of the carried error,
    # which stays within one step's rounding bound: bounded, not growing with the steps.
    world, ranks = stepped
    applied = torch.zeros_like(ranks[0][0][0]["out"])
    true = torch.zeros_like(applied)
    for t in range(STEPS):
        applied += ranks[0][0][t]["out"]
        true += sum(r[0][t]["raw"] for r in ranks) / world
        carried = (sum(r[0][t + 1]["err"] for r in ranks) if t + 1 < STEPS else sum(r[1] for r in ranks)) / world
        slack = 1e-5 * true.abs().max()
        assert ((applied - (true - carried)).abs() <= slack).all(), t
        inputs = [r[0][t]["raw"] + r[0][t]["err"] for r in ranks]
        assert ((applied - true).abs() <= _bound(inputs) + slack).all(), t


def test_wire_bytes_are_the_formula(stepped):
    world, ranks = stepped
    for record, _ in ranks:
        for step in record:  # the buckets of each step (DDP re-buckets after the first)
            buckets = step["buckets"]
            expected = sum((sum(slot) - slot[rank]) + (world - 1) * max(slot) for slot, rank, _, _ in buckets)
            assert all(sent == sum(slot) and gathered == max(slot) for slot, _, sent, gathered in buckets)
            assert sum(step["bytes"].values()) == expected, step["bytes"]


@pytest.mark.parametrize("world", [2, 4, 8])
def test_wire_bytes_stay_a_quarter_of_fp32_at_any_world_size(world):
    # The byte formula of one bucket of a DLRM-sized MLP (no processes needed: a bucket's layout and sizes are
    # arithmetic), next to the FP32 ring all-reduce and the all-gather hook's (W-1)(n + 4 rows).
    shapes = [(512, 13), (512,), (256, 512), (256,), (64, 256), (64,), (512, 415), (512,), (256, 512), (256,),
              (1, 256), (1,)]
    params = [torch.empty(s) for s in shapes]
    n = sum(p.numel() for p in params)
    rows = sum(s[0] if len(s) > 1 else 1 for s in shapes)
    fp32 = all_reduce_wire_bytes(4 * n, world)
    for rank in range(world):
        counter = ByteCounter()
        b = _ChunkedBucket(params, n, world, torch.device("cpu"), rank)
        Int8ReduceScatterHook(counter)._count(b, world)
        sent = sum(counter.bytes.values())
        assert sent == (sum(b.slot) - b.slot[rank]) + (world - 1) * max(b.slot)
        assert sent < 0.3 * fp32
        # 2(W-1)/W of the codes and steps, plus padding to 4 bytes and the largest chunk's excess (under one row,
        # at most 4 + 512 bytes) in the all-gather
        assert sent <= all_reduce_wire_bytes(n + 4 * rows, world) + 3 * world + (world - 1) * (4 + 512 + 3)
        if world > 2:  # at W = 2 both send the other rank everything once
            assert sent < (world - 1) * (n + 4 * rows)  # fewer than the all-gather hook's bytes


def _checkpoint_round_trip(rank, world_size):
    """Two steps, save the error state, then a third step both by the hook that continues and by a fresh hook that
    loaded the state before its first step (as a resumed job does)."""
    gen = torch.Generator().manual_seed(rank)
    data = [(torch.randn(64, 13, generator=gen), torch.rand(64, 1, generator=gen)) for _ in range(3)]
    net, ddp, hook = _ddp_with_hook(25.0)
    for x, y in data[:2]:
        ddp.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
    saved = {k: v.clone() for k, v in hook.state_dict().items()}
    ddp.zero_grad()
    nn.functional.mse_loss(ddp(data[2][0]), data[2][1]).backward()
    continued = [p.grad.clone() for p in net.parameters()]
    net2, ddp2, hook2 = _ddp_with_hook(25.0)
    fresh = hook2.state_dict()
    assert fresh.keys() == saved.keys() and all(fresh[k].shape == saved[k].shape for k in saved)
    assert all((v == 0).all() for v in fresh.values())
    hook2.load_state_dict(saved)
    nn.functional.mse_loss(ddp2(data[2][0]), data[2][1]).backward()
    resumed = [p.grad.clone() for p in net2.parameters()]
    return saved, continued, resumed


def test_checkpoint_round_trip_of_the_error_state():
    for saved, continued, resumed in run_distributed(_checkpoint_round_trip, world_size=2):
        assert any((v != 0).any() for v in saved.values())
        for a, b in zip(continued, resumed):
            assert torch.equal(a, b)


def _train(rank, world_size, data_dir):
    """The tiny sharded DLRM trained with FP32 and with int8_rs_ag MLP gradients from one initial state."""
    from dqrm.pipeline.config import OptimConfig
    from dqrm.pipeline.optimizer import build_optimizer
    from dqrm.quant.convert import gather_full_state
    from dqrm.sharding.comm import CommConfig, compress_gradients
    from tests.helpers import batches, mixed_placements, sharded_model

    local = batches(data_dir / "train.parquet", 64, rank=rank, world_size=world_size, limit=12)
    out = {}
    for dense in ("fp32", "int8_rs_ag"):
        model, _ = sharded_model(world_size, mixed_placements(world_size, with_column_wise=False))
        counter = ByteCounter().install()
        hooks = compress_gradients(model, CommConfig(dense=dense), counter)
        optimizer = build_optimizer(model, OptimConfig())
        model.train()
        losses = []
        for b in local:
            loss, _ = model(b)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
        counter.uninstall()
        out[dense] = {"losses": losses, "state": gather_full_state(model), "bytes": counter.snapshot(len(local)),
                      "hooks": [type(h).__name__ for h in hooks]}
    return out if rank == 0 else None


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_dlrm_trains_with_int8_rs_ag(tmp_path_factory, world):
    from tests.helpers import tiny_data

    runs = run_distributed(_train, tiny_data(tmp_path_factory.mktemp("rs-ag-data")), world_size=world)[0]
    fp32, rs = runs["fp32"], runs["int8_rs_ag"]
    assert rs["hooks"] == ["Int8ReduceScatterHook"]  # what build_sharded_model checkpoints
    assert all(torch.isfinite(torch.tensor(rs["losses"])))
    assert sum(rs["losses"][-4:]) < sum(rs["losses"][:4])  # decreasing
    assert max(abs(a - b) for a, b in zip(rs["losses"], fp32["losses"])) < 1e-2  # as FP32 does
    mlp = [k for k in fp32["bytes"] if "MLP" in k]
    assert sum(rs["bytes"][k] for k in rs["bytes"] if "MLP" in k) < 0.3 * sum(fp32["bytes"][k] for k in mlp)

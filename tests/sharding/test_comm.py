"""Compressed gradient communication at world size 2 (gloo): exact where it claims to be, smaller where it claims
to be, and counted by instrumenting the collectives (which changes no bit of training, at world size 3 too)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dqrm.pipeline.config import OptimConfig
from dqrm.pipeline.optimizer import build_optimizer
from dqrm.quant.api import QATConfig, QuantSpec, quantize_, set_fake_quant
from dqrm.quant.convert import gather_full_state
from dqrm.sharding.byte_counter import ByteCounter
from dqrm.sharding.comm import CommConfig, check_qcomms, compress_gradients, sharders_for
from dqrm.sharding.ddp_hooks import int8_step
from dqrm.sharding.plan import TablePlacement
from dqrm.sharding.touched_rows import TouchedRowsHook, decode_ids, encode_ids, row_steps
from tests.dist_utils import run_distributed
from tests.helpers import TABLES, batches, concat_batches, mixed_placements, sharded_model, tiny_data, train_steps

STEPS, LOCAL = 5, 64


def _table_wise(world_size: int) -> dict:
    """Every table model-parallel and whole on one rank (what TorchRec's INT8 all-to-all codec supports)."""
    return {t: TablePlacement(kind="table_wise", ranks=(i % world_size,)) for i, t in enumerate(TABLES)}


def _train(rank, world_size, data_dir, comm: CommConfig, table_wise: bool = False, qat: bool = False):
    placements = _table_wise(world_size) if table_wise else mixed_placements(world_size, with_column_wise=False)
    model, _ = sharded_model(world_size, placements, sharders=sharders_for(comm, torch.device("cpu")))
    if qat:  # INT4 QAT as the default job has it, the per-table scale refreshed every other step
        quantize_(model, QATConfig(spec=QuantSpec(scale_update_every=2), step="prepare"), pg=dist.group.WORLD)
        set_fake_quant(model, True)
    counter = ByteCounter().install() if world_size > 1 else None
    touched = [h for h in compress_gradients(model, comm, counter) if isinstance(h, TouchedRowsHook)]
    optimizer = build_optimizer(model, OptimConfig())
    init = gather_full_state(model)
    local = batches(data_dir / "train.parquet", LOCAL, limit=2 * STEPS)
    model.train()
    losses = []
    for step in range(STEPS):
        pair = local[2 * step: 2 * step + 2]
        loss, _ = model(pair[rank] if world_size == 2 else concat_batches(pair))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    state = gather_full_state(model)
    if rank != 0:
        return None
    return {"state": state, "init": init, "losses": losses, "bytes": counter.snapshot(STEPS) if counter else None,
            "touched_hooks": len(touched), "full_scans": sum(h.scans for h in touched)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("comm-data"))


@pytest.fixture(scope="module")
def runs(data_dir):
    configs = {
        "dense": CommConfig(),
        "touched": CommConfig(dp_tables="touched", dp_whole_max_rows=0),
        "touched_int8": CommConfig(dp_tables="touched_int8", dp_whole_max_rows=0),
        # INT8 where it is offered for these tables (TorchRec's INT8 qcomms refuse row-wise tables, so fp16 there)
        "all_compressed": CommConfig(dp_tables="touched_int8", dense="int8_ef", qcomms="fp16", dp_whole_max_rows=0),
        "small_whole": CommConfig(dp_tables="touched_int8", dp_whole_max_rows=10**6),
    }
    out = {name: run_distributed(_train, data_dir, cfg, world_size=2)[0] for name, cfg in configs.items()}
    for name, cfg in {"tw_dense": CommConfig(), "tw_qcomms_int8": CommConfig(qcomms="int8")}.items():
        out[name] = run_distributed(_train, data_dir, cfg, True, world_size=2)[0]
    out["single"] = run_distributed(_train, data_dir, CommConfig(count_bytes=False), world_size=1)[0]
    out["dense_qat"] = run_distributed(_train, data_dir, CommConfig(), False, True, world_size=2)[0]
    out["single_qat"] = run_distributed(_train, data_dir, CommConfig(count_bytes=False), False, True, world_size=1)[0]
    return out


@pytest.mark.parametrize("qat", [False, True])
def test_uncompressed_matches_single_process(runs, qat):
    # Two ranks on 64 rows each are one rank on the 128: every table and MLP weight, row for row, with and without
    # QAT (whose per-table scale is the max over every shard of a table, so it too must not depend on the plan).
    two, one = (runs["dense_qat"], runs["single_qat"]) if qat else (runs["dense"], runs["single"])
    for key, value in one["state"].items():  # (the QAT state adds the observers' buffers: bits, scales)
        assert key not in runs["single"]["init"] or (value != one["init"][key]).any(), f"{key} did not train"
        torch.testing.assert_close(two["state"][key], value, atol=1e-6, rtol=0, msg=key)
    if qat:  # and QAT changed the training (the fake-quantized forward is not the float one)
        assert max(abs(a - b) for a, b in zip(runs["dense_qat"]["losses"], runs["dense"]["losses"])) > 1e-4


def _counted_and_not(rank, world_size, data_dir):
    """The sharded DLRM trained by the job's optimizer (it drops gradients, so DDP copies each), without counting and
    with (comm.count_bytes, on by default): the MLP's and data-parallel tables' all-reduces are then counted."""
    local = batches(data_dir / "train.parquet", LOCAL, rank=rank, world_size=world_size, limit=STEPS)
    out = {}
    for count in (False, True):
        model, _ = sharded_model(world_size, mixed_placements(world_size, with_column_wise=False))
        counter = ByteCounter().install() if count else None
        compress_gradients(model, CommConfig(count_bytes=count), counter)
        train_steps(model, build_optimizer(model, OptimConfig()), local)
        if counter is not None:
            counter.uninstall()
        out[count] = {"state": gather_full_state(model), "bytes": dict(counter.bytes) if counter else None}
    return out if rank == 0 else None


def test_counting_bytes_changes_no_bit_of_training_at_three_ranks(data_dir):
    # DDP scales by 1/W in two ways, which round differently at W = 3: counting must leave DDP's all-reduce alone
    # (sharding.ddp_hooks.Fp32AllReduceCount)
    runs = run_distributed(_counted_and_not, data_dir, world_size=3)[0]
    sent = runs[True]["bytes"]
    assert sent["all_reduce fp32 (MLP)"] > 0 and sent["all_reduce fp32 (DP tables)"] > 0
    for key, value in runs[False]["state"].items():
        assert torch.equal(runs[True]["state"][key], value), key


def test_touched_rows_come_from_the_forward_not_a_scan_of_the_table(runs):
    for name in ("touched", "touched_int8", "all_compressed"):
        assert runs[name]["touched_hooks"] > 0 and runs[name]["full_scans"] == 0, name


def test_touched_rows_exchange_is_lossless(runs):
    for key, value in runs["dense"]["state"].items():
        assert torch.equal(runs["touched"]["state"][key], value), key


def test_small_data_parallel_kernels_are_all_reduced_whole_exactly_as_ddp_does(runs):
    # dp_whole_max_rows above the small tables' rows: they skip the touched-row exchange (INT8 asked or not) and
    # are averaged as DDP averages, so the run is the uncompressed one bit for bit.
    for key, value in runs["dense"]["state"].items():
        assert torch.equal(runs["small_whole"]["state"][key], value), key
    sent = runs["small_whole"]["bytes"]
    assert sent["all_reduce fp32 (DP tables, whole)"] == runs["dense"]["bytes"]["all_reduce fp32 (DP tables)"] > 0
    assert not any("DP tables" in k and "all_gather" in k for k in sent), sent


def test_int8_is_close_and_smaller(runs):
    dense, t8, all8 = runs["dense"], runs["touched_int8"], runs["all_compressed"]
    init = dense["init"]
    replicated = [k for k in init if "embedding_bags" in k and k.split(".")[-2] in
                  {t for t, p in mixed_placements(2, with_column_wise=False).items() if p.kind == "data_parallel"}]
    assert replicated
    for key in init:
        # compare what training changed, not the states: the tables move little in 5 steps, so closeness of
        # states would hide a lost or mis-scaled gradient
        update, update8 = dense["state"][key] - init[key], t8["state"][key] - init[key]
        if key in replicated:
            # INT8 touched rows: each exchange rounds a rank's row to a step of at most max|row| / 127 (1 + 2^-8), an
            # error of at most 1/254 of the row's largest gradient (test_int8_touched_rows_move_a_rare_row_...);
            # five steps of that are at most 2 % of the largest update, and 5 % leaves room for the drift the
            # rounding causes in the later steps' gradients.
            assert update.abs().max() > 1e-5, key
            assert (update8 - update).abs().max() <= 0.05 * update.abs().max(), key
        else:  # everything else is exchanged exactly as in the dense run
            torch.testing.assert_close(update8, update, atol=1e-6, rtol=0, msg=key)
    # The forward is not compressed (qcomms_forward off), so the losses differ only through the weights, each within
    # a few per cent of its five updates (above), which move the loss (about 0.5) by far less than 1e-2.
    assert max(abs(a - b) for a, b in zip(all8["losses"], dense["losses"])) < 1e-2
    b_fp32, b_t, b_t8, b_all = dense["bytes"], runs["touched"]["bytes"], t8["bytes"], all8["bytes"]
    rows = "all_gather rows (DP tables)"
    steps = "all_gather row steps (DP tables)"  # a 2-byte step per 16-wide INT8 row: 18 bytes a row for FP32's 64
    assert b_t[rows] > 0 and b_t8[rows] * 4 == b_t[rows] and b_t8[steps] * 8 == b_t8[rows]
    ids = "all_gather ids (DP tables)"  # delta-coded: 2 bytes per touched row (plus padding to the largest rank)
    assert b_t8[ids] == b_t[ids] and b_t[ids] <= 2.2 * b_t[rows] / (4 * 16)
    assert b_t[rows] + b_t["all_gather ids (DP tables)"] < b_fp32["all_reduce fp32 (DP tables)"]
    assert b_all["all_gather int8 (MLP)"] * 3.9 <= b_fp32["all_reduce fp32 (MLP)"]
    assert b_all["all_to_all (model-parallel)"] < b_fp32["all_to_all (model-parallel)"]


def test_int8_qcomms_quantize_the_embedding_all_to_all(runs):
    """TorchRec's INT8 codec on the backward all-to-all of embedding gradients: 4x fewer bytes (plus scales), and
    the tables' updates within a few per cent of the uncompressed run's."""
    dense, q8 = runs["tw_dense"], runs["tw_qcomms_int8"]
    a2a = "all_to_all (model-parallel)"
    # the forward's pooled values stay FP32 (half the uncompressed bytes), the backward's INT8 rows carry
    # scales: 0.69 measured, 0.625 at best
    assert 0 < q8["bytes"][a2a] < 0.75 * dense["bytes"][a2a]
    # FBGEMM's row-wise INT8 codec steps each row by (max - min) / 255, an error of at most 1/255 of the row's largest
    # |gradient| per exchange: at most 2 % of the largest update over five steps; 5 % leaves room for the drift.
    for key, init in dense["init"].items():
        if "embedding_bags" in key:
            update, update8 = dense["state"][key] - init, q8["state"][key] - init
            assert update.abs().max() > 1e-5, key
            assert (update8 - update).abs().max() <= 0.05 * update.abs().max(), key


def test_int8_qcomms_with_row_wise_tables_are_refused_up_front():
    rows = [{"table": "t_cat_3", "sharding": "row_wise"}, {"table": "t_cat_4", "sharding": "table_wise"}]
    with pytest.raises(NotImplementedError, match="int8 is unsupported with row-wise tables"):
        check_qcomms(CommConfig(qcomms="int8"), rows)
    check_qcomms(CommConfig(qcomms="fp16"), rows)  # FP16 is fine
    check_qcomms(CommConfig(qcomms="int8"), rows[1:])


def test_touched_ids_round_trip_in_about_two_bytes_each():
    gen = torch.Generator().manual_seed(0)
    dense = torch.unique(torch.randint(0, 10**6, (5000,), generator=gen))
    spread = torch.tensor([0, 1, 65535, 65536, 70000, 2**31 + 5, 2**33])
    for ids in (dense, spread, torch.tensor([], dtype=torch.long)):
        words, n_big = encode_ids(ids)
        assert torch.equal(decode_ids(words, ids.numel(), n_big), ids)
    words, n_big = encode_ids(dense)
    assert n_big == 0 and words.dtype == torch.int16 and words.numel() == dense.numel()
    assert encode_ids(spread)[1] == 2  # two gaps of 2^16 or more travel as extra (position, high bits) pairs


def test_int8_step_never_divides_by_zero():
    # A row whose largest gradient is subnormal (error feedback leaves such residues) made max/127 underflow to 0,
    # so round(x / step) was NaN and the MLP weights became NaN a few dozen steps into the default job.
    maxabs = torch.tensor([0.0, 1e-44, 3e-39, 1.0])
    step = int8_step(maxabs)
    assert (step > 0).all()
    codes = torch.round(maxabs / step)
    assert torch.isfinite(codes).all() and codes.abs().max() <= 127
    # No clamp is applied after rounding: codes stay within 127 at every magnitude, subnormal ones included.
    gen = torch.Generator().manual_seed(0)
    rows = torch.cat([torch.randn(64, 97, generator=gen) * 10.0 ** e for e in range(-45, 30, 2)])
    rows[::7, 3] = rows[::7].abs().amax(dim=1)  # rows whose max is hit exactly, either sign
    rows[1::7, 5] = -rows[1::7].abs().amax(dim=1)
    codes = torch.round(rows / int8_step(rows.abs().amax(dim=1)).unsqueeze(1))
    assert torch.isfinite(codes).all() and codes.abs().max() == 127


class _FlatTable:
    """The one thing the touched-rows exchange reads from a kernel's layout: the row width."""
    local_dims = [16]


def _exchange_rare_row(rank, world_size):
    """One touched-rows exchange of a 10-row table: row 2 is frequent with gradients near 1 on both ranks, row 7 is
    rare (rank 0 touched it once) with gradients near 1e-4, far below a table-wide step of max|grad| / 127."""
    gen = torch.Generator().manual_seed(rank)
    grad = torch.zeros(10, 16)
    grad[2] = torch.randn(16, generator=gen)
    if rank == 0:
        grad[7] = 1e-4 * torch.randn(16, generator=gen)
    sent = grad.clone()
    out = {}
    for int8 in (False, True):
        g = sent.clone().view(-1)
        TouchedRowsHook({}, int8, None)._exchange(g, _FlatTable(), [torch.tensor([2, 7] if rank == 0 else [2])],
                                                   None)
        out[int8] = g.view(10, 16)
    return sent, out


def test_int8_touched_rows_move_a_rare_row_as_fp32_does():
    (g0, out0), (g1, out1) = run_distributed(_exchange_rare_row, world_size=2)
    exact = (g0 + g1) / 2
    assert torch.equal(out0[False], exact) and torch.equal(out1[False], exact)  # lossless without INT8
    got = out0[True]
    assert torch.equal(got, out1[True])  # every rank decodes the same average
    # The codec's bound: each rank rounds its row to a step of at most max|row| / 127 * (1 + 2^-8) (bfloat16,
    # rounded up), so the error is at most half of that, and the average's at most the mean of the ranks' halves.
    half_steps = sum(row_steps(g.abs().amax(dim=1)).float() / 2 for g in (g0, g1)) / 2
    assert ((got - exact).abs() <= half_steps.unsqueeze(1) + 1e-12).all()
    assert (half_steps[7] <= exact[7].abs().max() / 254 * (1 + 2 ** -8) + 1e-12)
    # So the rare row moves as in FP32 within 0.4 % of its own largest entry, not by zero under the table's step.
    assert (got[7] - exact[7]).abs().max() <= exact[7].abs().max() / 250
    assert (got[7] != 0).sum() >= 12
    assert torch.equal(got[[0, 1, 3, 4, 5, 6, 8, 9]], torch.zeros(8, 16))


def test_row_steps_are_bfloat16_never_below_the_fp32_step():
    gen = torch.Generator().manual_seed(0)
    maxabs = torch.cat([torch.rand(4000, generator=gen) * 10.0 ** e for e in range(-40, 30, 3)] +
                       [torch.tensor([0.0, 1e-44, 1.0, 127.0])])
    steps = row_steps(maxabs)
    assert steps.dtype == torch.bfloat16
    fp32 = int8_step(maxabs)
    assert (steps.float() >= fp32).all() and (steps.float() <= fp32 * (1 + 2 ** -7)).all()
    x = torch.stack([maxabs, -maxabs], dim=1)
    codes = torch.round(x / steps.float().unsqueeze(1))
    assert torch.isfinite(codes).all() and codes.abs().max() <= 127


def _int8_hook_vs_reference(rank, world_size, bucket_cap_mb):
    """Three DDP steps of a small MLP with the INT8 error-feedback hook; each step's averaged gradient is compared
    with a plain per-parameter reimplementation fed every rank's gradient plus carried error."""
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from dqrm.sharding.ddp_hooks import Int8ErrorFeedbackHook

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 1))
    ddp = DistributedDataParallel(net, bucket_cap_mb=bucket_cap_mb)
    ddp.register_comm_hook(None, Int8ErrorFeedbackHook(None).__call__)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    params = list(net.parameters())
    rows = [(p.shape[0] if p.dim() > 1 else 1, -1) for p in params]
    errors = [torch.zeros(p.numel()) for p in params]  # this rank's carried error, per parameter
    gen = torch.Generator().manual_seed(rank)
    worst, lossy = 0.0, 0.0
    for _ in range(3):
        x, y = torch.randn(64, 13, generator=gen), torch.rand(64, 1, generator=gen)
        raw = torch.autograd.grad(nn.functional.mse_loss(net(x), y), params)
        mine = torch.cat([g.reshape(-1) + e for g, e in zip(raw, errors)])
        everyone = [torch.zeros_like(mine) for _ in range(world_size)]
        dist.all_gather(everyone, mine)
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        offset = 0
        for i, p in enumerate(params):
            mean = torch.zeros(p.numel()).view(rows[i])
            for r in range(world_size):
                g = everyone[r][offset:offset + p.numel()].view(rows[i])
                step = g.abs().amax(dim=1, keepdim=True) / 127
                step = torch.where(step > 0, step, torch.ones_like(step))
                q = torch.round(g / step).clamp(-127, 127)
                if r == rank:
                    errors[i] = (g - q * step).reshape(-1)
                mean += q * step / world_size
            exact = sum(e[offset:offset + p.numel()] for e in everyone).view(rows[i]) / world_size
            worst = max(worst, float((p.grad.view(rows[i]) - mean).abs().max() / mean.abs().max()))
            lossy = max(lossy, float((mean - exact).abs().max() / exact.abs().max()))
            offset += p.numel()
        opt.step()
    return worst, lossy


@pytest.mark.parametrize("world_size,bucket_cap_mb", [(2, 25.0), (2, 0.0005), (1, 25.0)])
def test_int8_error_feedback_hook_matches_a_plain_reimplementation(world_size, bucket_cap_mb):
    # one bucket, several buckets (DDP also re-buckets after its first step), and world size 1 (a job on one rank)
    for worst, lossy in run_distributed(_int8_hook_vs_reference, bucket_cap_mb, world_size=world_size):
        assert worst < 1e-5, worst  # the hook's average equals the reference's
        assert lossy > 1e-4  # and it is really quantized (INT8 is not the exact mean)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_compiled_int8_codec_is_bit_for_bit_the_torch_one(world):
    # The CPU hook encodes and decodes with compiled loops; other devices use the torch ops. Same inputs, same bits:
    # codes, steps and carried error after encoding; the averaged gradient after decoding.

    from dqrm.sharding.ddp_hooks import Int8ErrorFeedbackHook, _Int8Bucket

    gen = torch.Generator().manual_seed(world)
    shapes = [(32, 13), (32,), (0,), (8, 32), (8,), (1, 8), (1,), (5, 3, 7)]
    params = [torch.empty(s) for s in shapes]
    n = sum(p.numel() for p in params)
    buckets = []
    for name in ("torch", "compiled"):
        b = _Int8Bucket(params, n, world, torch.device("cpu"))
        b.err.copy_(torch.randn(n, generator=torch.Generator().manual_seed(7)) * 1e-3)
        buckets.append(b)
    payloads = []
    for w in range(world):
        grad = torch.randn(n, generator=gen) * 10.0 ** torch.randint(-30, 3, (n,), generator=gen)
        grad[:13] = 0.0  # an all-zero row: the smallest step, codes 0
        for b, encode in zip(buckets, (Int8ErrorFeedbackHook._encode, Int8ErrorFeedbackHook._encode_cpu)):
            encode(b, grad.clone())
        (bt, bc) = buckets
        assert torch.equal(bt.payload, bc.payload), "codes or steps differ"
        assert torch.equal(bt.err, bc.err), "carried error differs"
        assert bc.payload[4 * bc.rows:].view(torch.int8).abs().max() == 127
        payloads.append(bt.payload.clone())
    for b in buckets:
        b.gathered.copy_(torch.stack(payloads))
    torch_out, compiled_out = torch.empty(n), torch.full((n,), float("nan"))
    Int8ErrorFeedbackHook._decode(buckets[0], torch_out, world)
    Int8ErrorFeedbackHook._decode_cpu(buckets[1], compiled_out)
    assert torch.equal(torch_out, compiled_out)
    for value in (float("nan"), float("inf"), -float("inf")):
        bad = torch.zeros(n)
        bad[40] = value
        with pytest.raises(FloatingPointError, match="NaN or Inf"):
            Int8ErrorFeedbackHook._encode_cpu(buckets[1], bad)

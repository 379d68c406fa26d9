"""The compiled CPU QAT kernels give the bits of the torch ops they replace (which other devices still run)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dqrm.quant.api import QATConfig, QuantSpec, embedding_quantizer, quantize_
from dqrm.quant.mlp_qat import RowwiseWeightFakeQuant, row_codes, row_scales
from tests.dist_utils import run_distributed
from tests.helpers import batches, mixed_placements, sharded_model, tiny_data


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_compiled_mlp_fake_quant_is_the_torch_arithmetic(bits):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(67, 37, generator=gen) * 10.0 ** torch.randint(-6, 3, (67, 1), generator=gen)
    w[3] = 0.0  # all-zero row: the smallest scale, codes 0
    w[4, :5] = torch.tensor([1e-40, -3e-39, 0.0, 1e-45, 2e-44])  # subnormal row maxima
    w[4, 5:] = 0.0
    s = row_scales(w, bits, keepdim=True)
    w[5] = (torch.arange(37) - 18.5) * s[5]  # exact halves: round half to even
    w[6, 0] = float("inf")  # an infinite weight: codes of inf * 0, as torch computes them
    expected = row_codes(w, row_scales(w, bits, keepdim=True), bits).mul_(row_scales(w, bits, keepdim=True))
    got = RowwiseWeightFakeQuant(bits)(w)
    assert torch.equal(got[~torch.isnan(expected)], expected[~torch.isnan(expected)])
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    strided = RowwiseWeightFakeQuant(bits)(w.t().contiguous().t())  # not contiguous: the torch path
    assert torch.equal(strided[~torch.isnan(expected)], got[~torch.isnan(expected)])


def _correction_both_ways(rank, world_size, data_dir):
    model, _ = sharded_model(world_size, mixed_placements(world_size, with_column_wise=False))
    quantize_(model, QATConfig(spec=QuantSpec(embedding_bits=4, granularity="table", scale_update_every=3),
                               step="prepare"), pg=dist.group.WORLD)
    quantizer = embedding_quantizer(model)
    from dqrm.pipeline.config import OptimConfig
    from dqrm.pipeline.optimizer import build_optimizer
    optimizer = build_optimizer(model, OptimConfig(embedding_lr=0.5))
    checked = 0
    for batch in batches(data_dir / "train.parquet", 64, limit=5):
        model.eval()  # a training forward would also count a step (and refresh the scales) each time
        outs = {}
        for compiled in (False, True):
            quantizer.compiled = compiled
            seen_before = {i: s.clone() for i, s in quantizer._seen.items()}
            with torch.no_grad():
                outs[compiled] = model(batch)[1][1]
            outs[(compiled, "seen")] = {i: quantizer.seen_rows(i) for i in quantizer._seen}
            outs[(compiled, "state")] = {i: s.clone() for i, s in quantizer._seen.items()}
            for i, s in seen_before.items():
                quantizer._seen[i].copy_(s)  # both ways mark from the same start
        assert torch.equal(outs[True], outs[False])
        assert outs[(True, "seen")].keys() == outs[(False, "seen")].keys()
        for i in outs[(True, "seen")]:
            assert torch.equal(outs[(True, "seen")][i], outs[(False, "seen")][i])
            quantizer._seen[i].copy_(outs[(True, "state")][i])
        if checked:  # the scales (and the seen rows) exist from the first training step on
            assert outs[(True, "seen")] and all(m.numel() > 0 for m in outs[(True, "seen")].values())
        model.train()
        loss, _ = model(batch)  # a step moves the rows and, every 3 steps, the scales
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        checked += 1
    # Weighted bags, straight through the hook's entry point.
    lay = quantizer._layouts[0]
    features, batch_size, d = lay.feature_table_map.numel(), 8, lay.local_dims[0]
    gen = torch.Generator().manual_seed(rank)
    lengths = torch.randint(0, 4, (features * batch_size,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    table = lay.feature_table_map.repeat_interleave(batch_size).repeat_interleave(lengths)
    rows = torch.tensor(lay.local_rows)[table]
    indices = (torch.rand(int(offsets[-1]), generator=gen) * rows).long()
    kwargs = {"indices": indices, "offsets": offsets,
              "per_sample_weights": torch.rand(indices.numel(), generator=gen) * 3}
    output = torch.randn(batch_size, features * d, generator=gen)  # the pooled rows the correction is added to
    got = {}
    for compiled in (False, True):
        quantizer.compiled = compiled
        got[compiled] = quantizer.corrected(0, kwargs, output.clone())
    assert torch.equal(got[True], got[False]) and not torch.equal(got[True], output)
    return checked


def test_compiled_embedding_correction_is_the_torch_arithmetic(tmp_path_factory):
    data_dir = tiny_data(tmp_path_factory.mktemp("qat-kernel-data"))
    assert run_distributed(_correction_both_ways, data_dir, world_size=1) == [5]


def test_compiled_row_maxima_refresh_reads_exactly_the_marked_rows():
    import numpy as np

    from dqrm.quant import qat_kernels
    from dqrm.quant.row_maxima import _row_absmax

    gen = torch.Generator().manual_seed(0)
    n = 1003  # not a whole number of 64-row blocks
    rows = torch.randn(n, 16, generator=gen) * 10.0 ** torch.randint(-40, 30, (n, 1), generator=gen)
    rows[5] = -0.0
    rows[6, 3] = float("-inf")
    expected = _row_absmax(rows)
    blocks_of = lambda m: torch.stack([m[b:b + 64].max() for b in range(0, n, 64)])  # noqa: E731
    full, blocks = torch.full((n,), -1.0), torch.full((16,), -1.0)
    qat_kernels.refresh_row_maxima(rows.numpy(), full.numpy(), np.zeros(0, dtype=np.uint8), blocks.numpy())
    assert torch.equal(full, expected) and torch.equal(blocks, blocks_of(expected))
    marked = torch.tensor([0, 5, 6, 7, 8, 63, 64, 500, 1002])
    seen = np.zeros(16 * 8, dtype=np.uint8)
    qat_kernels.mark_rows(seen, marked.numpy())
    some = full.clone()
    some[marked] = -1.0
    rows[marked] *= 2  # the marked rows changed since the full scan
    qat_kernels.refresh_row_maxima(rows.numpy(), some.numpy(), seen, blocks.numpy())
    now = _row_absmax(rows)
    assert torch.equal(some, now) and torch.equal(blocks, blocks_of(now)) and not seen.any()
    rows[1] *= 4  # unmarked: neither its row maximum nor its block is reread
    qat_kernels.refresh_row_maxima(rows.numpy(), some.numpy(), seen, blocks.numpy())
    assert torch.equal(some, now) and torch.equal(blocks, blocks_of(now))


def test_compiled_table_maxima_from_blocks_and_ends_equal_plain_maxima():
    import numpy as np

    from dqrm.quant import qat_kernels

    gen = torch.Generator().manual_seed(1)
    n = 1000
    known = torch.rand(n, generator=gen) * 10.0 ** torch.randint(-30, 30, (n,), generator=gen)
    blocks = torch.stack([known[b:b + 64].max() for b in range(0, n, 64)])
    tables = [(0, 1), (1, 62), (63, 2), (65, 300), (365, 0), (365, 635)]  # ends inside, at and across blocks
    starts = np.array([a for a, _ in tables], dtype=np.int64)
    counts = np.array([c for _, c in tables], dtype=np.int64)
    out = np.full(len(tables), -1.0, dtype=np.float32)
    qat_kernels.table_maxima(known.numpy(), blocks.numpy(), starts, counts, out)
    for t, (a, c) in enumerate(tables):
        assert out[t] == (known[a:a + c].max().item() if c else 0.0), (a, c)
    known[700] = float("nan")  # a NaN row maximum wins, as in torch's max
    blocks[700 // 64] = float("nan")
    qat_kernels.table_maxima(known.numpy(), blocks.numpy(), starts, counts, out)
    assert np.isnan(out[-1]) and not np.isnan(out[:-1]).any()


@pytest.mark.parametrize("bits", [4, 8])
def test_grouped_mlp_fake_quant_is_per_layer_fake_quant_and_follows_weight_updates(bits):
    import copy

    from dqrm.quant.mlp_qat import FakeQuantLinear, fake_quant_weight, fake_quantize_linears

    torch.manual_seed(bits)
    mlp = torch.nn.Sequential(torch.nn.Linear(13, 24), torch.nn.ReLU(), torch.nn.Linear(24, 16), torch.nn.ReLU(),
                              torch.nn.Linear(16, 1))
    plain = copy.deepcopy(mlp)
    assert fake_quantize_linears(mlp, bits) == 3
    layers = [m for m in mlp if isinstance(m, FakeQuantLinear)]
    assert layers[0]._group is layers[2]._group and len(layers[0]._group.layers) == 3
    opt = torch.optim.SGD(mlp.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(plain.parameters(), lr=0.5)
    for step in range(3):
        x = torch.randn(32, 13)
        # The reference: each layer fake-quantized on its own (the per-layer compiled call, clone's identity grad).
        ref = x
        for m in plain:
            ref = torch.nn.functional.linear(ref, fake_quant_weight(m.weight, bits), m.bias) \
                if isinstance(m, torch.nn.Linear) else m(ref)
        out = mlp(x)
        assert torch.equal(out, ref)
        for layer, m in zip(layers, [m for m in plain if isinstance(m, torch.nn.Linear)]):
            assert torch.equal(layer._group.weight(layer._index), fake_quant_weight(m.weight.detach(), bits))
        opt.zero_grad(), ref_opt.zero_grad()
        out.square().mean().backward()
        ref.square().mean().backward()
        for a, b in zip(mlp.parameters(), plain.parameters()):
            assert torch.equal(a.grad, b.grad)  # the straight-through gradient, slice by slice
        opt.step(), ref_opt.step()  # new weight versions: the next forward fake-quantizes the new weights
    with torch.no_grad():  # an in-place write to one weight is seen (its version changes)
        layers[1].weight.mul_(-2.0)
        assert torch.equal(layers[1]._group.weight(1), fake_quant_weight(layers[1].weight, bits))
    clone = copy.deepcopy(mlp)  # the cached graph outputs are not copied (a non-leaf tensor cannot be)
    assert torch.equal(clone(x), mlp(x))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("grid", ["table", "row"])
def test_compiled_row_packing_is_the_torch_arithmetic(bits, grid):
    """Export's one-pass quantize-and-pack gives the bytes of quantize_codes + pack_rows, ties and clamping included."""
    from dqrm.quant import qat_kernels
    from dqrm.quant.fake_quant import pack_rows, quantize_codes, rowwise_qparams, symmetric_qparams

    g = torch.Generator().manual_seed(bits)
    w = torch.randn(3000, 16, generator=g) * 0.3
    w[:50] = torch.round(w[:50] * 8) / 8  # values on half steps of the grid: round-half-even decides
    w[50, 3] = 40.0  # beyond the table's range: clamped (alpha below is smaller than it)
    if grid == "table":
        scale, bias = symmetric_qparams(torch.tensor([[1.5]]), bits)
        expand = (scale.expand(len(w), 1), bias.expand(len(w), 1))
    else:
        scale, bias = rowwise_qparams(w, bits)
        expand = (scale, bias)
    expected, _ = pack_rows(quantize_codes(w, *expand, bits), *expand, bits)
    out = torch.empty_like(expected)
    qat_kernels.quantize_pack_rows(w.numpy(), scale.reshape(-1).numpy(), bias.reshape(-1).numpy(), bits, out.numpy())
    assert torch.equal(out, expected)
    assert len(out.unique()) > 4  # the codes are not degenerate
    from dqrm.quant.convert import _codes  # export's two paths: compiled (contiguous CPU rows), torch ops (the rest)
    assert torch.equal(_codes(w, scale, bias, bits), expected)
    assert torch.equal(_codes(w.t().contiguous().t(), scale, bias, bits), expected)


@pytest.mark.parametrize("grid", ["table", "row"])
def test_compiled_kernels_keep_the_grids_of_small_tables(grid):
    """Tables far below fp16's normal range (subnormal scales, a scale held at 2^-24, an all-zero table) at 4 and 8
    bits: export's packing and the QAT correction give the torch ops' bits (the kernels take the qparams as given)."""
    import numpy as np

    from dqrm.quant import qat_kernels
    from dqrm.quant.fake_quant import fake_quantize, pack_rows, quantize_codes, rowwise_qparams, symmetric_qparams

    g = torch.Generator().manual_seed(0)
    tables = [(8, 3e-4), (4, 3e-5), (8, 1e-6), (4, 1e-7), (8, 0.0)]  # (bits, max|W|)
    rows, d = 32, 16
    weights, grids = [], []
    for bits, alpha in tables:
        w = torch.rand(rows, d, generator=g) * 2 - 1
        w = w * (alpha / w.abs().max())
        w[:, :2] += 1e-3 if grid == "row" else 0.0  # row grid: small ranges away from 0 as well
        scale, bias = symmetric_qparams(w.abs().max().reshape(1, 1), bits) if grid == "table" \
            else rowwise_qparams(w, bits)
        expand = (scale.expand(rows, 1), bias.expand(rows, 1))
        expected, _ = pack_rows(quantize_codes(w, *expand, bits), *expand, bits)
        out = torch.empty_like(expected)
        qat_kernels.quantize_pack_rows(w.numpy(), scale.reshape(-1).contiguous().numpy(),
                                       bias.reshape(-1).contiguous().numpy(), bits, out.numpy())
        assert torch.equal(out, expected), (bits, alpha)
        weights.append(w)
        grids.append((scale, bias, bits))
    if grid == "row":
        return
    # The correction: feature f looks up row s of table f in bag (f, s), one id a bag; each bag's correction is
    # FQ(w) - w, added to an output of zeros.
    features = len(tables)
    grid_rows = torch.tensor([[float(b), float(1.0 / s), float(s), float(2 ** bits - 1)]
                              for s, b, bits in grids], dtype=torch.float32)
    out = torch.zeros(rows, features * d)
    qat_kernels.embedding_correction(
        torch.arange(rows).repeat(features).numpy(), torch.arange(features * rows + 1).numpy(),
        torch.cat(weights).numpy(), (torch.arange(features) * rows).numpy(), grid_rows.numpy(),
        np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.uint8), out.numpy())
    expected = torch.cat([fake_quantize(w, s, b, bits) - w for w, (s, b, bits) in zip(weights, grids)], dim=1)
    assert torch.equal(out, expected)

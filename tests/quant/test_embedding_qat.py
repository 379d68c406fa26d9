"""QAT on sharded tables: world size 2 equals world size 1, and the exported integer model equals the QAT model."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from dqrm.datasets.schema import FEATURE_NAMES
from dqrm.pipeline.config import OptimConfig
from dqrm.pipeline.optimizer import build_optimizer
from dqrm.quant.api import QATConfig, QuantSpec, embedding_quantizer, quantize_
from dqrm.quant.convert import gather_full_state
from dqrm.quant.export import STANDALONE_LOAD, export
from dqrm.quant.program import STANDALONE_LOAD as PROGRAM_LOAD
from dqrm.quant.program import program_path
from tests.dist_utils import run_distributed
from tests.helpers import (CARDS, MODEL, batches, concat_batches, initial_state, mixed_placements, sharded_model,
                           tiny_data, train_steps)

STEPS, LOCAL_BATCH = 6, 64


def _qat_run(rank, world_size, data_dir, spec, out_dir):
    """A few QAT steps on rank-local halves of the same global batches; then eval logits, tables, export."""
    placements = mixed_placements(world_size, with_column_wise=spec.granularity == "table")
    model, _ = sharded_model(world_size, placements)
    quantize_(model, QATConfig(spec=spec, step="prepare"), pg=dist.group.WORLD)
    optimizer = build_optimizer(model, OptimConfig())
    local = batches(data_dir / "train.parquet", LOCAL_BATCH, rank=0, world_size=1, limit=STEPS * 2)
    model.train()
    for step in range(STEPS):
        pair = local[2 * step: 2 * step + 2]  # global batch = two halves of LOCAL_BATCH rows
        batch = pair[rank] if world_size == 2 else concat_batches(pair)
        loss, _ = model(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    eval_batches = batches(data_dir / "val.parquet", 256, rank=rank, world_size=world_size)
    with torch.no_grad():
        logits = torch.cat([model(b)[1][1] for b in eval_batches])
    parts = [torch.empty_like(logits) for _ in range(world_size)]
    dist.all_gather(parts, logits)
    state = gather_full_state(model)
    int_model = quantize_(model, QATConfig(spec=spec, step="convert"))
    if rank != 0:
        return None
    tables = {k: v for k, v in state.items() if "embedding_bags" in k}
    dense = {k: v for k, v in state.items() if "_arch" in k and "embedding_bags" not in k}
    quantizer = embedding_quantizer(model)
    result = {"logits": torch.cat(parts), "tables": tables, "dense": dense,
              "alpha": None if quantizer is None else quantizer.alpha.clone()}
    if out_dir is not None:
        path = export(int_model, FEATURE_NAMES, out_dir / "model.pt", {"num_embeddings": []})
        result["artifact"] = str(path)
    return result


SPECS = {
    "table4": QuantSpec(embedding_bits=4, granularity="table", scale_update_every=4, mlp_bits=4),
    "row4": QuantSpec(embedding_bits=4, granularity="row", mlp_bits=4),
    "table8": QuantSpec(embedding_bits=8, granularity="table", scale_update_every=4, mlp_bits=8),
    "row8": QuantSpec(embedding_bits=8, granularity="row", mlp_bits=8),
    # per-table widths, INT2 included, in one model (FBGEMM groups tables of one width into one kernel)
    "mixed": QuantSpec(embedding_bits=4, granularity="table", scale_update_every=4, mlp_bits=8,
                       table_bits={"t_cat_7": 2, "t_cat_12": 2, "t_cat_9": 8, "t_cat_20": 8}),
    # MLPs computing in bfloat16 (quant.mlp_compute), trained for the kernel they are served with
    "bf16": QuantSpec(embedding_bits=4, granularity="table", scale_update_every=4, mlp_bits=4,
                      mlp_compute="bfloat16"),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("qat-data"))


@pytest.mark.parametrize("name", ["table4", "row4"])
def test_sharded_qat_steps_equal_unsharded(name, data_dir):
    spec = SPECS[name]
    sharded = run_distributed(_qat_run, data_dir, spec, None, world_size=2)[0]
    single = run_distributed(_qat_run, data_dir, spec, None, world_size=1)[0]
    torch.testing.assert_close(sharded["alpha"], single["alpha"], atol=1e-5, rtol=0)
    for key, table in single["tables"].items():
        torch.testing.assert_close(sharded["tables"][key], table, atol=1e-5, rtol=0, msg=key)
    torch.testing.assert_close(sharded["logits"], single["logits"], atol=1e-5, rtol=0)
    if spec.granularity == "table":  # the grid was really used: alpha is a max over whole tables
        assert (sharded["alpha"] > 0).all()


def _single_rows(dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, rows: int) -> list[tuple]:
    """The first ``rows`` samples of a batch (key-major lengths) as batches of one."""
    per_key = lengths.view(len(CARDS), -1)
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.long().cumsum(0)]).view(-1)
    out = []
    for i in range(rows):
        ids = [values[starts[k * per_key.shape[1] + i]: starts[k * per_key.shape[1] + i + 1]]
               for k in range(len(CARDS))]
        out.append((dense[i:i + 1], torch.cat(ids), per_key[:, i].contiguous()))
    return out


@pytest.mark.parametrize("name", ["table4", "row4", "table8", "row8", "mixed", "bf16"])
def test_exported_artifact_equals_qat_model(name, data_dir, tmp_path):
    """Prepare equals convert: the artifact, loaded in a fresh process with only torch and fbgemm_gpu, gives the
    QAT model's eval logits (within 1e-5) and the same predicted classes; the torch.export program beside it
    (``quant.program``), loaded the same way, gives the artifact's logits bit for bit, at batch 256 and 1."""
    result = run_distributed(_qat_run, data_dir, SPECS[name], tmp_path, world_size=2)[0]
    eval_batches = batches(data_dir / "val.parquet", 256, world_size=1)
    inputs = [(b.dense_features, b.sparse_features.values(), b.sparse_features.lengths()) for b in eval_batches]
    torch.save((inputs, _single_rows(*inputs[0], rows=3)), tmp_path / "inputs.pt")
    script = STANDALONE_LOAD + "artifact = model\n" + PROGRAM_LOAD.replace("sys.argv[1]", "sys.argv[4]") + (
        "inputs, singles = torch.load(sys.argv[2])\n"  # the documented loads: torch and fbgemm_gpu, nothing else
        "with torch.no_grad():\n"
        "    out = torch.cat([artifact(*x) for x in inputs])\n"
        "    program = torch.cat([model(*x) for x in inputs])\n"
        "    singles = [(artifact(*x), model(*x)) for x in singles]\n"
        "torch.save((out, program, singles), sys.argv[3])\n"
        "print([(n, str(b.dtype), b.numel()) for n, b in artifact.named_buffers()])\n"
        "print(sorted(k for k in sys.modules if k.split('.')[0] in ('torchrec', 'quant', 'pipeline')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, result["artifact"], str(tmp_path / "inputs.pt"),
                           str(tmp_path / "out.pt"), str(program_path(result["artifact"]))],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", "the artifact must not need torchrec or this repo"
    # It stores integers: the tables as FBGEMM rows of dim * bits / 8 code bytes + 4 bytes of fp16 scale and bias
    # (padded to FBGEMM's row alignment), the MLP weights as int8 codes; no float copy of either.
    buffers = eval(proc.stdout.strip().splitlines()[-2])  # noqa: S307 - our own subprocess's repr of a list
    spec, dim = SPECS[name], MODEL.embedding_dim
    widths = [spec.bits_for(f"t_cat_{i}") for i in range(len(CARDS))]
    least = sum(n * (dim * b // 8 + 4) for n, b in zip(CARDS, widths))  # codes + fp16 scale and bias per row
    stored = sum(numel for _, dtype, numel in buffers if dtype == "torch.uint8" and numel >= 1024)  # the rows
    assert least <= stored < least + 16 * sum(CARDS), (least, stored)
    codes = [(n, dtype) for n, dtype, _ in buffers if n.endswith(".codes")]
    assert len(codes) == len(MODEL.dense_arch) + len(MODEL.over_arch) and all(d == "torch.int8" for _, d in codes)
    assert not [n for n, dtype, numel in buffers if dtype == "torch.float32" and numel >= min(sum(CARDS), 32 * 13)
                and not n.endswith((".scale", ".bias"))], "a float copy of a table or an MLP weight was stored"
    served, program, singles = torch.load(tmp_path / "out.pt")
    assert torch.equal(program, served)
    assert all(torch.equal(a, b) for a, b in singles) and len(singles) == 3
    torch.testing.assert_close(torch.cat([a for a, _ in singles]), served[:3], atol=1e-5, rtol=0)
    qat = result["logits"]
    assert served.shape == qat.shape
    torch.testing.assert_close(served, qat, atol=1e-5, rtol=0)
    assert torch.equal(served >= 0, qat >= 0)


def _refresh_run(rank, world_size, data_dir):
    """QAT steps with a scale refresh every 2 steps, then the incremental refresh against a full rescan."""
    model, _ = sharded_model(world_size, mixed_placements(world_size, with_column_wise=True))
    quantize_(model, QATConfig(spec=QuantSpec(scale_update_every=2), step="prepare"), pg=dist.group.WORLD)
    quantizer = embedding_quantizer(model)
    optimizer = build_optimizer(model, OptimConfig(embedding_lr=1.0))
    model.train()
    for batch in batches(data_dir / "train.parquet", LOCAL_BATCH, rank=rank, world_size=world_size, limit=7):
        loss, _ = model(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    quantizer.update_scales(incremental=True)
    incremental = quantizer.alpha.clone()
    quantizer.update_scales()
    return {"incremental": incremental, "full": quantizer.alpha.clone(),
            "incremental_layouts": sum(quantizer._incremental), "layouts": len(quantizer._incremental)}


def test_incremental_scale_refresh_equals_a_full_rescan(data_dir):
    for out in run_distributed(_refresh_run, data_dir, world_size=2):
        assert 0 < out["incremental_layouts"] < out["layouts"]  # sharded TBEs incremental, the others rescanned
        assert torch.equal(out["incremental"], out["full"])


def _refresh_after_load(rank, world_size, data_dir):
    """QAT steps (the row maxima cached), then new tables loaded in process, then an incremental refresh."""
    model, _ = sharded_model(world_size, mixed_placements(world_size, with_column_wise=False))
    quantize_(model, QATConfig(spec=QuantSpec(scale_update_every=2), step="prepare"), pg=dist.group.WORLD)
    quantizer = embedding_quantizer(model)
    optimizer = build_optimizer(model, OptimConfig(embedding_lr=1.0))
    train_steps(model, optimizer, batches(data_dir / "train.parquet", LOCAL_BATCH, limit=5))
    state = gather_full_state(model)
    quantizer.update_scales()
    before = quantizer.alpha.clone()
    tables = {k: v * 3 for k, v in state.items() if "embedding_bags" in k}  # every row changes, none is looked up
    model.load_state_dict(tables, strict=False)
    quantizer.update_scales(incremental=True)
    incremental = quantizer.alpha.clone()
    quantizer.update_scales()
    return {"incremental": incremental, "full": quantizer.alpha.clone(), "before": before,
            "cached_before_load": sum(quantizer._incremental)}


def test_scale_refresh_after_an_in_process_load_sees_the_loaded_rows(data_dir):
    out = run_distributed(_refresh_after_load, data_dir, world_size=1)[0]
    assert out["cached_before_load"] > 0  # some tables are refreshed incrementally from cached row maxima
    assert torch.equal(out["full"], out["before"] * 3)  # the loaded tables are in place
    assert torch.equal(out["incremental"], out["full"])


def _variable_batch_at_the_hook(rank, world_size):
    """The QAT hook of a sharded TBE given what TorchRec passes for a variable-batch KJT: features with different
    batch sizes (offsets of unequal length per feature), with and without TorchRec's per-feature batch sizes."""
    model, _ = sharded_model(world_size, mixed_placements(world_size, with_column_wise=False))
    quantize_(model, QATConfig(spec=QuantSpec(), step="prepare"), pg=dist.group.WORLD)
    quantizer = embedding_quantizer(model)
    i = next(i for i, lay in enumerate(quantizer._layouts) if lay.feature_table_map.numel() > 1)
    features = quantizer._layouts[i].feature_table_map.numel()
    width = int(sum(quantizer._layouts[i].local_dims))
    sizes = [2] * (features - 1) + [3]  # one feature has a larger batch
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.ones(sum(sizes), dtype=torch.long).cumsum(0)])
    kwargs = {"indices": torch.zeros(sum(sizes), dtype=torch.long), "offsets": offsets, "per_sample_weights": None}
    messages = []
    for extra in ({}, {"batch_size_per_feature_per_rank": [[b] for b in sizes]}):
        try:
            quantizer.corrected(i, {**kwargs, **extra}, torch.zeros(3, width))
            messages.append(None)
        except NotImplementedError as e:
            messages.append(str(e))
    uniform = {**kwargs, "offsets": offsets[: 2 * features + 1], "indices": kwargs["indices"][: 2 * features]}
    quantizer.corrected(i, uniform, torch.zeros(2, width))  # one batch size: accepted
    return messages


def test_qat_refuses_a_variable_batch_at_the_hook():
    messages = run_distributed(_variable_batch_at_the_hook, world_size=1)[0]
    for m in messages:
        assert m is not None and "needs one batch size for every feature" in m and "variable-batch" in m


def _fq_table(w: torch.Tensor, bits: int, granularity: str) -> torch.Tensor:
    """FBGEMM's row-wise INT-N value of every row, written out from its definition (not the product's code)."""
    qmax = 2 ** bits - 1
    if granularity == "row":
        bias = w.amin(1, keepdim=True).half().float()
        scale = ((w.amax(1, keepdim=True) - bias) / qmax).half().float()
        scale[scale == 0] = 1.0
    else:  # the paper's grid: alpha = max|W| over the table, symmetric, in FBGEMM's (scale, bias) form
        scale = (w.abs().max() / (2 ** (bits - 1) - 1)).clamp(min=2 ** -24).half().float().reshape(1, 1)
        bias = -(2 ** (bits - 1)) * scale
    return torch.clamp(torch.round((w - bias) * (1.0 / scale)), 0, qmax) * scale + bias


def _fq_mlp(w: torch.Tensor, bits: int) -> torch.Tensor:
    half = 2 ** (bits - 1)
    s = w.abs().amax(1, keepdim=True) * (1.0 / (half - 1))
    return torch.clamp(torch.round(w * (1.0 / s)), -half, half - 1) * s


def _one_qat_step(rank, world_size, data_dir, spec, lr, embedding_lr):
    """One training step of the prepared, sharded model: the state before, the state after, the training logits."""
    model, _ = sharded_model(world_size, mixed_placements(world_size, with_column_wise=False),
                             optim=OptimConfig(lr=lr, embedding_lr=embedding_lr))
    quantize_(model, QATConfig(spec=spec, step="prepare"), pg=dist.group.WORLD)
    optimizer = build_optimizer(model, OptimConfig(lr=lr, embedding_lr=embedding_lr))
    before = gather_full_state(model)
    batch = batches(data_dir / "train.parquet", LOCAL_BATCH, limit=1)[0]
    model.train()
    loss, (_, logits, _) = model(batch)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {"before": before, "after": gather_full_state(model), "logits": logits.detach(), "batch": batch}


@pytest.mark.parametrize("granularity", ["table", "row"])
def test_qat_step_is_the_straight_through_update_of_the_fake_quantized_model(granularity, data_dir):
    """Against a reference built from definitions: a plain (unsharded, unfused) TorchRec DLRM whose tables hold
    FQ(W) and whose MLPs hold FQ(W); its forward gives the QAT model's training logits, and one SGD step on W with
    its gradient (the straight-through estimator) gives the QAT model's new tables and MLP weights."""
    from dqrm.pipeline.model import build_dlrm

    spec = QuantSpec(embedding_bits=4, granularity=granularity, scale_update_every=1000, mlp_bits=4)
    lr, embedding_lr = 0.5, 5.0  # large enough that every touched row moves by far more than the tolerance
    out = run_distributed(_one_qat_step, data_dir, spec, lr, embedding_lr, world_size=1)[0]
    before, after = out["before"], out["after"]
    reference = build_dlrm(MODEL, torch.device("cpu"), table_device=torch.device("cpu"))
    ref_state = reference.state_dict()
    fq = {}
    for key in ref_state:
        w = before[key]
        if "embedding_bags" in key:
            fq[key] = _fq_table(w, 4, granularity)
        elif key.endswith("weight"):
            fq[key] = _fq_mlp(w, 4)
        else:
            fq[key] = w
    reference.load_state_dict(fq)
    reference.train()
    loss, (_, logits, _) = reference(out["batch"])
    loss.backward()
    torch.testing.assert_close(out["logits"], logits.detach(), atol=1e-5, rtol=0)
    params = dict(reference.named_parameters())
    replicated = {f"t_cat_{i}" for i, p in enumerate(mixed_placements(1, with_column_wise=False).values())
                  if p.kind == "data_parallel"}
    assert replicated  # both kinds of table are in the model
    moved = 0
    for key in ref_state:
        table = key.split(".")[-2] if "embedding_bags" in key else None
        # every table steps at embedding_lr: sharded ones in the fused in-backward SGD, data-parallel (replicated)
        # ones, dense parameters to TorchRec, in an SGD of their own (pipeline/optimizer.py); the MLPs at lr
        rate = embedding_lr if table else lr
        expected = before[key] - rate * params[key].grad
        torch.testing.assert_close(after[key], expected, atol=1e-5, rtol=0, msg=key)
        moved += int((after[key] - before[key]).abs().max() > 1e-4)
    assert moved == len(ref_state)  # every table and layer moved by over 10x the tolerance


SMALL_TABLES = {"t_cat_1": (4, 1e-7), "t_cat_6": (8, 3e-4), "t_cat_7": (8, 1e-6), "t_cat_9": (4, 3e-5),
                "t_cat_10": (8, 0.0)}
"""(bits, max|W|) of small-magnitude tables (a data-parallel, a row-wise and table-wise ones): subnormal fp16
scales; exact scales below fp16's smallest step 2^-24; an all-zero table."""


def _small_tables_run(rank, world_size, granularity):
    """Small tables scaled into a prepared model: their training fake-quant values (the grid the hooks use, and
    the hooked lookups) and what FBGEMM's TBE of the converted model returns for each row."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from dqrm.quant.fake_quant import fake_quantize, rowwise_qparams, symmetric_qparams
    from dqrm.sharding.tbe import table_configs

    spec = QuantSpec(embedding_bits=4, granularity=granularity, mlp_bits=8,
                     table_bits={name: bits for name, (bits, _) in SMALL_TABLES.items()})
    model, _ = sharded_model(world_size, mixed_placements(world_size, with_column_wise=granularity == "table"))
    state = initial_state()
    for name, (_, amax) in SMALL_TABLES.items():
        key = f"model.sparse_arch.embedding_bag_collection.embedding_bags.{name}.weight"
        state[key] = state[key] * (amax / state[key].abs().max())
    model.load_state_dict(state, strict=False)
    quantize_(model, QATConfig(spec=spec, step="prepare"), pg=dist.group.WORLD)
    quantizer = embedding_quantizer(model)
    quantizer.update_scales()
    tables = gather_full_state(model)
    configs = table_configs(model)
    batch = max(c.num_embeddings for c in configs)  # bag (f, r) looks up row r of feature f's table
    kjt = KeyedJaggedTensor.from_lengths_sync(
        [c.feature_names[0] for c in configs], torch.cat([torch.arange(c.num_embeddings) for c in configs]),
        torch.cat([(torch.arange(batch) < c.num_embeddings).int() for c in configs]))
    model.eval()
    with torch.no_grad():
        hooked = model.module.model.sparse_arch.embedding_bag_collection(kjt).wait().to_dict()
    served = quantize_(model, QATConfig(spec=spec, step="convert")).sparse_arch.embedding_bag_collection(kjt)
    served = served.to_dict()
    out = {"small": quantizer.small_scale_tables()}
    for c in configs:
        name, bits, n = c.name, spec.bits_for(c.name), c.num_embeddings
        w = tables[f"model.sparse_arch.embedding_bag_collection.embedding_bags.{name}.weight"]
        if granularity == "table":
            scale, bias = symmetric_qparams(quantizer.alpha[quantizer.table_names.index(name)].reshape(1, 1), bits)
        else:
            scale, bias = rowwise_qparams(w, bits)
        out[name] = {"w": w, "scale": scale, "bias": bias, "fq": fake_quantize(w, scale, bias, bits),
                     "hooked": hooked[c.feature_names[0]][:n], "served": served[c.feature_names[0]][:n]}
    return out


@pytest.mark.parametrize("granularity", ["table", "row"])
def test_small_tables_train_and_serve_on_one_fp16_grid(granularity):
    """Tables whose scale falls below fp16's smallest normal (2^-14), at 8 and 4 bits: the fp16 scale FBGEMM
    stores is the training scale, and FBGEMM's TBE returns the training fake-quant values for every exported row;
    a table grid whose exact scale is below 2^-24 uses that step (it used to become 1.0: every weight 0)."""
    out = run_distributed(_small_tables_run, granularity, world_size=1)[0]
    for name in out:
        if name == "small":
            continue
        r = out[name]
        assert torch.equal(r["served"], r["fq"]), name  # export and FBGEMM's TBE: the training grid, exactly
        # the hooks' W + (FQ(W) - W): FQ(W) up to the rounding of the two float adds, far below one grid step
        torch.testing.assert_close(r["hooked"], r["fq"], atol=float(r["w"].abs().max()) * 2 ** -21, rtol=0, msg=name)
        assert torch.equal(r["scale"], r["scale"].half().float()) and torch.equal(r["bias"], r["bias"].half().float())
    for name, (bits, amax) in SMALL_TABLES.items():
        r = out[name]
        assert r["w"].abs().max() == pytest.approx(amax, rel=1e-6)
        if granularity == "table":
            scale = float(r["scale"])
            assert 2 ** -24 <= scale < 2 ** -14, name  # a subnormal fp16, never 0 or 1.0
            assert bool((r["fq"] != 0).any()) == (amax > 0), name
            assert (r["fq"] - r["w"]).abs().max() <= max(scale / 2, amax - (2 ** (bits - 1) - 1) * scale) * 1.000001
    if granularity == "table":
        assert out["small"] == (sorted(SMALL_TABLES, key=lambda n: int(n.split("_")[-1])),
                                ["t_cat_1", "t_cat_7", "t_cat_10"])
    else:
        assert out["small"] == ([], [])


def test_small_table_scales_are_logged_once_per_change(caplog):
    from dqrm.quant.embedding_qat import EmbeddingFakeQuantizer

    q = EmbeddingFakeQuantizer([], ["a", "b", "c"], {"a": 8, "b": 4, "c": 8}, "table", scale_update_every=1)
    with caplog.at_level("INFO", logger="dqrm.quant.embedding_qat"):
        q.update_scales()  # no rows: every max|W| is 0, every scale held at 2^-24
        q.update_scales()  # no change, no second line
        assert [r.levelname for r in caplog.records] == ["WARNING"]
        assert "3 of 3 tables have a subnormal fp16 scale" in caplog.text and "3 of them held" in caplog.text
        q.alpha.copy_(torch.tensor([3e-4, 0.5, 1e-6]))  # as a refresh would write it
        q._report_small_scales()
        assert q.small_scale_tables() == (["a", "c"], ["c"]) and len(caplog.records) == 2

"""Serving speed on CPU: the exported artifacts of one model at FP32, INT8, INT4 weight-only and INT4 with
bfloat16 MLPs (``quant.mlp_compute=bfloat16``), each as TorchScript (``model_int4.pt``) and as a torch.export
program (``model_int4.pt2``); and what the bfloat16 MLPs cost in training.

Every artifact is exported by the same code (TorchRec inference EBC on FBGEMM's IntN TBE, ``quant.export.
ServingDLRM``, TorchScript; ``quant.program.ProgramDLRM``, torch.export), so only the precision differs. The row
"fp32, DLRM.forward" is the FP32 model run through TorchRec's own ``DLRM.forward`` (same modules, scripted the same
way). Reported: samples/s at batch 2048 (same batches, variants alternated, median of repetitions), p50/p99
latency of one call at batch 1 and 64 (calls alternated between variants in chunks), and a profile of a few
batches splitting the time into table lookups, MLPs, interaction and the rest. Then training: one DMP process at
world size 1, the default model, FP32 vs INT4 QAT vs INT4 QAT with bfloat16 MLPs, steps alternated in chunks of 10,
each variant's median step time and its ratio to FP32 (median of the chunk-by-chunk ratios, bootstrap 95 %
interval).

    python -m bench.inference [--batches 20] [--reps 9] [--latency-calls 400] [--train-steps 100] [--threads N]
                              [--out DIR]

The model is built from the `default` config with random weights (sizes and speed do not depend on training).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bench.common import (Report, add_out_argument, median, optimizer_name, paired_ratio, prepared_model, provenance,
                          random_batches, save, sharded_model, table, train_step_seconds)
from dqrm.datasets.reader import ParquetBatches, ReaderConfig
from dqrm.datasets.schema import FEATURE_NAMES
from dqrm.datasets.synthetic import ensure_synthetic
from dqrm.pipeline.configs import get_config
from dqrm.pipeline.quiet import quiet_library_noise
from dqrm.quant.api import QATConfig, QuantSpec, quantize_
from dqrm.quant.export import export, load_with_manifest, rows_path
from dqrm.quant.program import program_path

BATCH = 2048
LATENCY_BATCHES = (1, 64)
INT4, BF16 = "int4", "int4 bf16-MLP"
TORCHREC = "fp32, DLRM.forward"
PROGRAM = " (.pt2)"
TRAIN_VARIANTS = {"fp32": None, "int4 QAT": "float32", "int4 QAT bf16-MLP": "bfloat16"}
TRAIN_CHUNK = 10


def _artifacts(cfg, out: Path) -> tuple[dict[str, Path], torch.nn.Module]:
    """The INT8, INT4 and INT4-with-bfloat16-MLPs artifacts (each with its program) of one model's weights."""
    model = prepared_model(cfg)
    paths = {}
    for name, spec in {INT4: cfg.quant, "int8": QuantSpec(embedding_bits=8, mlp_bits=8)}.items():
        int_model = quantize_(model, QATConfig(spec=spec, step="convert"))
        paths[name] = export(int_model, FEATURE_NAMES, out / f"{name}.pt",
                             {"num_embeddings": list(cfg.model.num_embeddings)})
    bf16 = dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, mlp_compute="bfloat16"))
    bf16_model = prepared_model(bf16)  # the same seed: the same weights, its MLPs computing in bfloat16
    int_model = quantize_(bf16_model, QATConfig(spec=bf16.quant, step="convert"))
    paths[BF16] = export(int_model, FEATURE_NAMES, out / "int4_bf16.pt",
                         {"num_embeddings": list(cfg.model.num_embeddings)})
    del bf16_model, int_model
    return paths, model


def _fp32_artifact(cfg, model, out: Path) -> tuple[torch.nn.Module, Path]:
    """The same export path with FP32 tables and MLPs (TorchRec inference EBC, DataType.FP32): the DLRM and its
    artifact."""
    from torchrec.models.dlrm import DLRM
    from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC
    from dqrm.quant.convert import gather_full_state, integer_mlp
    from dqrm.sharding.tbe import table_configs

    state = gather_full_state(model)
    tables, weights = [], {}
    for c in table_configs(model):
        w = state[f"model.sparse_arch.embedding_bag_collection.embedding_bags.{c.name}.weight"]
        tables.append(EmbeddingBagConfig(name=c.name, embedding_dim=c.embedding_dim, num_embeddings=c.num_embeddings,
                                         feature_names=list(c.feature_names), data_type=DataType.FP32))
        weights[c.name] = (w.contiguous().view(torch.uint8).view(w.shape[0], -1), None)
    ebc = QuantEBC(tables=tables, is_weighted=False, device=torch.device("cpu"),
                   table_name_to_quantized_weights=weights)
    inner = model.module
    dlrm = DLRM(embedding_bag_collection=ebc, dense_in_features=13, dense_arch_layer_sizes=list(cfg.model.dense_arch),
                over_arch_layer_sizes=list(cfg.model.over_arch))
    dlrm.dense_arch = integer_mlp(inner.model.dense_arch, 0)
    dlrm.over_arch = integer_mlp(inner.model.over_arch, 0)
    return dlrm, export(dlrm, FEATURE_NAMES, out / "fp32.pt", {"num_embeddings": list(cfg.model.num_embeddings)})


class _TorchRecForward(torch.nn.Module):
    """The DLRM called as TorchRec defines it (``DLRM.forward``), behind the artifact's plain-tensor signature."""

    def __init__(self, dlrm, feature_names) -> None:
        super().__init__()
        self.dlrm, self.feature_names = dlrm, list(feature_names)

    def forward(self, dense, values, lengths):  # no annotations: this module's are strings, which FX would copy
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        return self.dlrm(dense, KeyedJaggedTensor(keys=self.feature_names, values=values, lengths=lengths)).squeeze(-1)


def _torchrec_forward(dlrm):
    """The FP32 artifact's DLRM, scripted behind ``DLRM.forward`` instead of ``ServingDLRM``."""
    from torchrec.fx import symbolic_trace
    return torch.jit.script(symbolic_trace(_TorchRecForward(dlrm.eval(), FEATURE_NAMES)))


def _inputs(cfg, n):
    root = ensure_synthetic(cfg.data.synthetic)
    data = ParquetBatches([root / "test.parquet"], cfg.model.num_embeddings, ReaderConfig(batch_size=BATCH))
    out = []
    for b in data:
        out.append((b.dense_features, b.sparse_features.values(), b.sparse_features.lengths()))
        if len(out) == n:
            break
    return out


@torch.no_grad()
def _time(module, inputs):
    t0 = time.perf_counter()
    for x in inputs:
        module(*x)
    return (time.perf_counter() - t0) / (len(inputs) * BATCH)


def alternated_times(modules: dict, inputs: list, reps: int) -> dict[str, list[float]]:
    """{name: seconds per sample of each repetition}: every module warmed up on two batches, then ``reps``
    repetitions over ``inputs``, the modules in turn within each (so that drift reaches them alike)."""
    for m in modules.values():
        _time(m, inputs[:2])
    times = {name: [] for name in modules}
    for _ in range(reps):
        for name, m in modules.items():
            times[name].append(_time(m, inputs))
    return times


# Where a serving batch's time goes, by the ops the profiler names (self CPU time, summed over a few batches).
_PARTS = {"embedding lookups (FBGEMM TBE)": ("int_nbit_split_embedding", "bounds_check_indices", "cumsum"),
          "MLPs (addmm, relu)": ("aten::addmm", "aten::linear", "aten::mm", "aten::clamp_min", "aten::relu"),
          "interaction: bmm (27x16 by 16x27 per sample)": ("aten::bmm",),
          "interaction: cat, index_select": ("aten::cat", "aten::index_select"),
          "copies and casts (copy_: addmm's bias, bfloat16 casts)": ("aten::copy_", "aten::_to_copy")}


@torch.no_grad()
def _breakdown(module, inputs) -> dict[str, float]:
    """Share of the profiled op time per part of the model (the rest: copies, fills, reshapes, and the TorchScript
    interpreter's own time)."""
    from torch.profiler import profile

    with profile() as prof:
        for x in inputs:
            module(*x)
    totals = {part: 0.0 for part in _PARTS}
    everything = 0.0
    for event in prof.key_averages():
        everything += event.self_cpu_time_total
        for part, names in _PARTS.items():
            if any(n in event.key for n in names):
                totals[part] += event.self_cpu_time_total
                break
    totals = {part: t / everything for part, t in totals.items()}
    totals["other"] = 1.0 - sum(totals.values())
    return totals


def _slice(x: tuple, rows: int, features: int) -> tuple:
    """The first ``rows`` samples of a serving batch (key-major lengths)."""
    dense, values, lengths = x
    per_key = lengths.view(features, -1)
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.long().cumsum(0)])
    b = per_key.shape[1]
    ids = [values[starts[k * b]: starts[k * b] + per_key[k, :rows].sum()] for k in range(features)]
    return dense[:rows].contiguous(), torch.cat(ids), per_key[:, :rows].contiguous().view(-1)


@torch.no_grad()
def _latency(modules: dict, inputs: list, rows: int, calls: int, chunk: int = 20) -> dict[str, dict]:
    """p50/p99 of one call at batch ``rows``, calls alternated between the variants ``chunk`` at a time."""
    xs = [_slice(x, rows, len(FEATURE_NAMES)) for x in inputs]
    times = {name: [] for name in modules}
    for m in modules.values():
        for x in xs[:3]:
            m(*x)
    for start in range(0, calls, chunk):
        for name, m in modules.items():
            for i in range(start, min(start + chunk, calls)):
                x = xs[i % len(xs)]
                t0 = time.perf_counter()
                m(*x)
                times[name].append(time.perf_counter() - t0)
    out = {}
    for name, t in times.items():
        q = torch.tensor(t, dtype=torch.float64).quantile(torch.tensor([0.5, 0.99], dtype=torch.float64))
        out[name] = {"p50_ms": 1e3 * float(q[0]), "p99_ms": 1e3 * float(q[1])}
    return out


def _train_models(cfg) -> dict:
    """The default model at world size 1 per training variant (same initial weights), with its optimizer."""
    from dqrm.pipeline.optimizer import build_optimizer

    models = {}
    for name, compute in TRAIN_VARIANTS.items():
        model = sharded_model(cfg.model, cfg.optim)
        if compute is not None:
            spec = dataclasses.replace(cfg.quant, mlp_compute=compute)
            quantize_(model, QATConfig(spec=spec), pg=dist.group.WORLD)
        models[name] = (model, build_optimizer(model, cfg.optim))
    return models


def _training(cfg, batch: int, steps: int, reps: int) -> dict:
    """Median step time per variant and each one's ratio to FP32 (chunks of ``TRAIN_CHUNK`` steps alternated)."""
    models = _train_models(cfg)
    batches = random_batches(cfg.model.num_embeddings, batch, steps)
    for m, o in models.values():
        train_step_seconds(m, o, batches[:TRAIN_CHUNK])
    times = {name: [] for name in models}
    for _ in range(reps):
        for start in range(0, steps, TRAIN_CHUNK):
            for name, (m, o) in models.items():
                times[name].append(train_step_seconds(m, o, batches[start:start + TRAIN_CHUNK]))
    out = {}
    for name, t in times.items():
        r = paired_ratio(t, times["fp32"])
        out[name] = {"batch": batch, "ms_per_step": 1e3 * median(t), "vs_fp32": r["median"], "ci95": r["ci95"],
                     "raw_s": t}
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=20, help="batches of 2048 per repetition")
    p.add_argument("--reps", type=int, default=9, help="repetitions (medians reported)")
    p.add_argument("--latency-calls", type=int, default=400, help="timed calls per variant and latency batch size")
    p.add_argument("--train-steps", type=int, default=100, help="timed training steps per variant and repetition")
    p.add_argument("--train-reps", type=int, default=3, help="training repetitions")
    p.add_argument("--train-batch", default="128,2048", help="training batch sizes (the default job's is 128)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads")
    add_out_argument(p)
    args = p.parse_args()
    prov = provenance()
    quiet_library_noise()
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    cfg = get_config("default")
    report = Report()
    with tempfile.TemporaryDirectory() as tmp:
        paths, model = _artifacts(cfg, Path(tmp))
        fp32_dlrm, paths["fp32"] = _fp32_artifact(cfg, model, Path(tmp))
        del model
        paths = {name: paths[name] for name in ("fp32", "int8", INT4, BF16)}
        modules = {name: load_with_manifest(path)[0] for name, path in paths.items()}
        sizes = {name: path.stat().st_size + rows_path(path).stat().st_size for name, path in paths.items()}
        modules[TORCHREC] = _torchrec_forward(fp32_dlrm)
        sizes[TORCHREC] = sizes["fp32"]
        del fp32_dlrm
        for name in ("fp32", INT4, BF16):
            modules[name + PROGRAM] = load_with_manifest(program_path(paths[name]))[0]
            sizes[name + PROGRAM] = program_path(paths[name]).stat().st_size + rows_path(paths[name]).stat().st_size
        inputs = _inputs(cfg, args.batches)
        with torch.no_grad():  # the two FP32 forwards agree; each program serves its artifact's logits
            a, b = modules["fp32"](*inputs[0]), modules[TORCHREC](*inputs[0])
            if not torch.equal(a, b):
                raise AssertionError(f"ServingDLRM and DLRM.forward differ by {(a - b).abs().max().item():.3g}")
            for name in ("fp32", INT4, BF16):
                a, b = modules[name](*inputs[0]), modules[name + PROGRAM](*inputs[0])
                if not torch.equal(a, b):
                    raise AssertionError(f"{name}: the program differs from the artifact by "
                                         f"{(a - b).abs().max().item():.3g}")
            bf16_shift = float((modules[BF16](*inputs[0]) - modules[INT4](*inputs[0])).abs().max())
        times = alternated_times(modules, inputs, args.reps)
        latency = {rows: _latency(modules, inputs, rows, args.latency_calls) for rows in LATENCY_BATCHES}
        shares = {name: _breakdown(modules[name], inputs[:5]) for name in ("fp32", INT4, BF16)}
        del modules
    rows = []
    for name in times:
        t = median(times[name])
        # speed-up over FP32: the median of the repetitions' ratios (each pair timed seconds apart), 95% bootstrap
        paired = paired_ratio(times["fp32"], times[name])
        rows.append({"model": name, "samples_per_s": 1 / t, "speedup_vs_fp32": paired["median"],
                     "speedup_lo": paired["ci95"][0], "speedup_hi": paired["ci95"][1],
                     **{f"p{q}_b{r}_ms": latency[r][name][f"p{q}_ms"] for r in LATENCY_BATCHES for q in (50, 99)},
                     "artifact_mb": sizes[name] / 1e6, "size_vs_fp32": sizes[name] / sizes["fp32"]})
    report(f"default model, random weights; {args.threads} torch threads. samples/s at batch {BATCH}: median of "
           f"{args.reps} repetitions of {args.batches} batches, variants alternated; latency of one call at batch "
           f"1 and 64: p50/p99 of {args.latency_calls} calls per variant, alternated in chunks of 20. {PROGRAM.strip()}: "
           f"the same model as a torch.export program (same rows file). x FP32: median over the repetitions of "
           f"FP32's time / the variant's, [95% bootstrap interval]")
    columns = [("model", "model", "s"), ("samples_per_s", "samples/s", ".0f"), ("speedup_vs_fp32", "x FP32", ".2f"),
               ("speedup_lo", "95% lo", ".2f"), ("speedup_hi", "95% hi", ".2f")]
    columns += [(f"p{q}_b{r}_ms", f"p{q} ms b{r}", ".3f") for r in LATENCY_BATCHES for q in (50, 99)]
    columns += [("artifact_mb", "file MB", ".1f"), ("size_vs_fp32", "size/FP32", ".3f")]
    report(table(rows, columns))
    by = {r["model"]: r for r in rows}
    goal = by[BF16]["speedup_vs_fp32"] >= 1.3
    verdict = "met" if by[BF16]["speedup_lo"] >= 1.3 else "met by the median, not by the interval" if goal else \
        "MISSED"
    report(f"INT4 weight-only artifact / FP32 artifact (same serving path): {by[INT4]['speedup_vs_fp32']:.2f}x "
           f"[{by[INT4]['speedup_lo']:.2f}, {by[INT4]['speedup_hi']:.2f}]; INT4 with bfloat16 MLPs / FP32 artifact: "
           f"{by[BF16]['speedup_vs_fp32']:.2f}x [{by[BF16]['speedup_lo']:.2f}, {by[BF16]['speedup_hi']:.2f}] (goal >= "
           f"1.3x: {verdict}); its logits differ from weight-only INT4's on the same weights by up to "
           f"{bf16_shift:.2e} (the model is trained for them: the artifact equals what its QAT evaluated)")
    report(f"torch.export programs / their TorchScript artifacts, samples/s: " + ", ".join(
        f"{name} {by[name + PROGRAM]['samples_per_s'] / by[name]['samples_per_s']:.2f}x" for name in ("fp32", INT4, BF16)))
    names = ("fp32", INT4, BF16)
    parts = [{"part": part, **{name: shares[name][part] for name in names}} for part in shares["fp32"]]
    report(table(parts, [("part", "share of the profiled batch time", "s"),
                         *((name, name, ".1%") for name in names)]))
    report("MLPs: the GEMMs and relu; addmm first copies the bias into its output, and a bfloat16 layer casts its "
           "input (and the dense arch's last layer its output): those count as copies and casts")
    train = {}
    for batch in [int(b) for b in args.train_batch.split(",") if b]:
        train[batch] = _training(cfg, batch, args.train_steps, args.train_reps)
    train_rows = [{"batch": batch, "variant": name, **{k: v for k, v in r.items() if k != "raw_s"},
                   "ci_lo": r["ci95"][0], "ci_hi": r["ci95"][1]} for batch, by_v in train.items()
                  for name, r in by_v.items()]
    report(f"training step, world size 1, default model, optimizer: {optimizer_name(cfg.optim)}: median of "
           f"{args.train_reps} x {args.train_steps} steps ({args.train_reps * (args.train_steps // TRAIN_CHUNK)} chunk "
           f"ratios), "
           f"variants alternated every {TRAIN_CHUNK} steps; x FP32 = median of the chunk ratios [95% bootstrap]")
    report(table(train_rows, [("batch", "batch", "d"), ("variant", "variant", "s"), ("ms_per_step", "ms/step", ".2f"),
                              ("vs_fp32", "x FP32 time", ".3f"), ("ci_lo", "95% lo", ".3f"),
                              ("ci_hi", "95% hi", ".3f")]))
    payload = {**prov, "batch": BATCH, "threads": args.threads, "batches": args.batches, "reps": args.reps,
               "latency_calls": args.latency_calls, "rows": rows, "raw_s": times, "latency": latency,
               "shares": shares, "bf16_max_abs_logit_shift_vs_int4": bf16_shift, "goal_1.3x_met": goal,
               "training": {str(b): v for b, v in train.items()}}
    path = save("inference", payload, report.text, out=args.out)
    print(f"json: {path}")


if __name__ == "__main__":
    main()

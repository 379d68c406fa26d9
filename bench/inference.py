"""Serving throughput on CPU: the exported INT4 artifact against the same model with FP32 tables, at batch 2048.

The INT8, INT4 and FP32 rows are exported by the same code path (TorchRec inference EBC on FBGEMM's IntN TBE,
``quant.export.ServingDLRM``, TorchScript), so only the precision differs. The last row is the FP32 model run
through TorchRec's own ``DLRM.forward`` (same modules, scripted the same way), the forward the exported artifacts
used before ``ServingDLRM`` composed the modules with fewer copies. Same batches, variants alternated, medians over
repetitions. Then a profile of a few batches splits the FP32 and INT4 artifacts' time into table lookups, MLPs,
interaction and the rest: precision changes only the lookups' cost, which bounds what INT4 can gain here.

    python -m bench.inference [--batches 20] [--reps 9] [--threads N] [--out DIR]

The model is built from the `default` config with random weights (sizes and speed do not depend on training).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bench.common import Report, add_out_argument, median, prepared_model, provenance, save, table
from datasets.reader import ParquetBatches, ReaderConfig
from datasets.schema import FEATURE_NAMES
from datasets.synthetic import ensure_synthetic
from pipeline.configs import get_config
from pipeline.quiet import quiet_library_noise
from quant.api import QATConfig, QuantSpec, quantize_
from quant.export import export, load_with_manifest, rows_path

BATCH = 2048
TORCHREC = "fp32, DLRM.forward"


def _artifacts(cfg, out: Path) -> dict[str, Path]:
    model = prepared_model(cfg)
    paths = {}
    for name, spec in {"int4": cfg.quant, "int8": QuantSpec(embedding_bits=8, mlp_bits=8)}.items():
        int_model = quantize_(model, QATConfig(spec=spec, step="convert"))
        paths[name] = export(int_model, FEATURE_NAMES, out / f"{name}.pt",
                             {"num_embeddings": list(cfg.model.num_embeddings)})
    return paths, model


def _fp32_artifact(cfg, model, out: Path) -> tuple[torch.nn.Module, Path]:
    """The same export path with FP32 tables and MLPs (TorchRec inference EBC, DataType.FP32): the DLRM and its
    artifact."""
    from torchrec.models.dlrm import DLRM
    from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC
    from quant.convert import gather_full_state, integer_mlp
    from sharding.tbe import table_configs

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


# Where a serving batch's time goes, by the ops the profiler names (self CPU time, summed over a few batches).
_PARTS = {"embedding lookups (FBGEMM TBE)": ("int_nbit_split_embedding", "bounds_check_indices", "cumsum"),
          "MLPs (addmm, relu)": ("aten::addmm", "aten::clamp_min", "aten::relu"),
          "interaction (bmm, cat, index_select)": ("aten::bmm", "aten::cat", "aten::index_select")}


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


def main() -> None:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=20, help="batches of 2048 per repetition")
    p.add_argument("--reps", type=int, default=9, help="repetitions (medians reported)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads")
    add_out_argument(p)
    args = p.parse_args()
    prov = provenance()
    quiet_library_noise()
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    cfg = get_config("default")
    with tempfile.TemporaryDirectory() as tmp:
        paths, model = _artifacts(cfg, Path(tmp))
        fp32_dlrm, paths["fp32"] = _fp32_artifact(cfg, model, Path(tmp))
        modules = {name: load_with_manifest(path)[0] for name, path in paths.items()}
        sizes = {name: path.stat().st_size + rows_path(path).stat().st_size for name, path in paths.items()}
        modules[TORCHREC] = _torchrec_forward(fp32_dlrm)
        sizes[TORCHREC] = sizes["fp32"]
        inputs = _inputs(cfg, args.batches)
        with torch.no_grad():  # the two FP32 forwards give the same logits
            a, b = modules["fp32"](*inputs[0]), modules[TORCHREC](*inputs[0])
        if not torch.equal(a, b):
            raise AssertionError(f"ServingDLRM and DLRM.forward differ by {(a - b).abs().max().item():.3g}")
        for m in modules.values():
            _time(m, inputs[:2])
        times = {name: [] for name in modules}
        for _ in range(args.reps):
            for name, m in modules.items():
                times[name].append(_time(m, inputs))
        shares = {name: _breakdown(modules[name], inputs[:5]) for name in ("fp32", "int4")}
    rows = []
    fp32 = median(times["fp32"])
    for name in ("fp32", "int8", "int4", TORCHREC):
        t = median(times[name])
        rows.append({"model": name, "samples_per_s": 1 / t, "speedup_vs_fp32": fp32 / t,
                     "artifact_mb": sizes[name] / 1e6, "size_vs_fp32": sizes[name] / sizes["fp32"]})
    report = Report()
    report(f"default model, random weights; batch {BATCH}, {args.threads} torch threads; samples/s from the median of "
           f"{args.reps} repetitions of {args.batches} batches, variants alternated")
    report(table(rows, [("model", "model", "s"), ("samples_per_s", "samples/s", ".0f"),
                        ("speedup_vs_fp32", "x FP32", ".2f"), ("artifact_mb", "file MB", ".1f"),
                        ("size_vs_fp32", "size/FP32", ".3f")]))
    by = {r["model"]: r for r in rows}
    report(f"INT4 artifact / FP32 artifact (same serving path): {by['int4']['speedup_vs_fp32']:.2f}x; "
           f"INT4 artifact / FP32 model through TorchRec's DLRM.forward: "
           f"{by['int4']['samples_per_s'] / by[TORCHREC]['samples_per_s']:.2f}x; size {by['int4']['size_vs_fp32']:.3f}")
    parts = [{"part": part, "fp32": shares["fp32"][part], "int4": shares["int4"][part]} for part in shares["fp32"]]
    report(table(parts, [("part", "share of the profiled batch time", "s"), ("fp32", "fp32", ".1%"),
                         ("int4", "int4", ".1%")]))
    lookups = shares["fp32"]["embedding lookups (FBGEMM TBE)"]
    report(f"Precision changes only the table lookups (the MLPs run in float from dequantized weights): with lookups "
           f"{lookups:.0%} of the FP32 batch, even free lookups would make the artifact at most "
           f"{1 / (1 - lookups):.2f}x faster than FP32 through the same serving path.")
    payload = {**prov, "batch": BATCH, "threads": args.threads, "batches": args.batches, "reps": args.reps,
               "rows": rows, "raw_s": times, "shares": shares}
    path = save("inference", payload, report.text, out=args.out)
    print(f"json: {path}")


if __name__ == "__main__":
    main()

"""Quality on real Criteo rows: the 137k-row Kaggle sample (``make kaggle-sample``), FP32 against every quantized
variant, each tuned the same way on the validation split and scored on the test split over 3 seeds.

Protocol (issue 31, points 4 and 5):

1. **Tuning, on validation only.** Every variant trains once (seed 0) with each optimizer setting of ``GRID`` for
   at most ``--epochs`` epochs, stopping once validation AUC has not improved for ``PATIENCE`` epochs
   (``early_stop_epochs``); the setting and the epoch with the highest validation AUC are the variant's pick. Every
   variant gets the same grid and epochs: the same tuning budget as FP32.
2. **Seeds.** The picked setting trains with seeds 1 and 2 as well (seed 0's tuning run is reused).
3. **Scores.** Per variant and seed, the test AUC and log loss at the epoch its validation AUC picks (in that seed's
   run) and at the last epoch trained; the difference to FP32 *of the same seed*, as mean and a 95 % t-interval over the
   seeds (3 seeds: mean ± 4.30 x std / sqrt(3)), and min/max.
4. **The artifact.** Every quantized run exports its INT4/INT8/INT2 model at the last epoch and scores it on the test
   split; the job refuses an artifact whose logits differ from the evaluated model's, and this bench records the
   largest difference. Table bytes are as served: FBGEMM's rows (codes, fp16 scale and bias, padding) plus a row map;
   the MLPs are reported apart.
5. **Budgets.** ``1/N`` is a byte budget for the tables of ``1/N`` of the FP32 tables with a row for every id seen
   in training (the job's budget covers the whole artifact, so the INT4 MLPs and the file overhead are added to it).

Runs go through the real launcher (2 workers) and are cached by config, arguments, seed and commit
(``bench/run_cache.py``): a stopped bench resumes, and only runs of the committed code are reused. A full run is
11 variants x 3 grid settings + 11 x 2 seeds = 55 jobs of at most ``--epochs`` epochs (about 20 s per epoch on 2
cores; row-wise Adagrad peaks within 1-2 epochs and stops early: about 2.5 hours at 12 epochs). Writes
``real_quality.{json,txt}`` and ``real_quality.png`` (test AUC against table bytes as served).

    python -m bench.real_quality [--variants FP32,INT4] [--grid sgd,adagrad_adam] [--seeds 0,1,2] [--epochs 12]
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

from bench.common import ROOT as REPO, Report, add_out_argument, provenance, result_dir, save, spread
from bench.compare_quant import parse_seeds
from bench.run_cache import DEFAULT_ROOT, RUN_DEPENDS, DirtyTree, head_commit, run
from dqrm.pipeline.budget import mlp_layers
from dqrm.pipeline.configs import get_config
from dqrm.quant.budget import ARTIFACT_OVERHEAD, mlp_bytes

DATA = ("real data: the 137,139-row random sample of Criteo Kaggle (../shared/data/criteo-real), converted with "
        "--split kaggle (117,548 train / 9,795 val / 9,796 test rows, in the file's random order)")
GRID = {
    "sgd": ["optim.embedding_lr=0.1", "optim.lr=0.1"],
    "adagrad_adam": ["optim.embedding=rowwise_adagrad", "optim.embedding_lr=0.05", "optim.dense=adam",
                     "optim.lr=0.001"],
    "adagrad_adagrad": ["optim.embedding=rowwise_adagrad", "optim.embedding_lr=0.02", "optim.dense=adagrad",
                        "optim.lr=0.01"],
}
"""The optimizer settings every variant is tuned over: the paper's SGD, and row-wise Adagrad on the tables with Adam
or Adagrad on the MLPs (MLPerf's DLRM and TorchRec's examples)."""
BUDGETS = (8, 16, 32, 64, 128)
VARIANTS = {
    "FP32": ("kaggle_sample_fp32", []),
    "INT8": ("kaggle_sample", ["quant.embedding_bits=8", "quant.mlp_bits=8"]),
    "INT4 table": ("kaggle_sample", []),
    "INT4 row": ("kaggle_sample", ["quant.granularity=row"]),
    "INT4 bf16 MLPs": ("kaggle_sample", ["quant.mlp_compute=bfloat16"]),
    "INT2": ("kaggle_sample", ["quant.embedding_bits=2"]),
    **{f"budget 1/{n}": ("kaggle_sample", [f"budget:{n}"]) for n in BUDGETS},
}
SEEDS = (0, 1, 2)
PATIENCE = 2
T95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78}


def fp32_table_bytes() -> int:
    cfg = get_config("kaggle_sample")
    return sum(n * cfg.model.embedding_dim * 4 for n in cfg.model.num_embeddings)


def job_args(variant_args: list[str], grid_args: list[str], epochs: int) -> list[str]:
    """The training arguments of one run: a ``budget:N`` item becomes the byte budget for tables of 1/N of FP32's."""
    out = []
    for a in variant_args:
        if a.startswith("budget:"):
            cfg = get_config("kaggle_sample")
            tables = fp32_table_bytes() // int(a.split(":")[1])
            out.append(f"quant.budget_bytes={tables + mlp_bytes(mlp_layers(cfg), cfg.quant.mlp_bits) + ARTIFACT_OVERHEAD}")
        else:
            out.append(a)
    return ["--epochs", str(epochs), "--set", f"early_stop_epochs={PATIENCE}", *out, *grid_args]


def interval(diffs: list[float]) -> dict:
    s = spread(diffs)
    half = T95.get(len(diffs), 1.96) * s["std"] / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return {**s, "ci95": [s["mean"] - half, s["mean"] + half]}


def scores(summary: dict) -> dict:
    """Test AUC and log loss at the epoch the validation AUC picks and at the last epoch, and the served sizes."""
    epochs = summary["epochs"]
    best = max(epochs, key=lambda e: e["val"]["auc"])
    export = summary.get("export") or {}
    sizes = export.get("sizes", {})
    files = sizes.get("files", {})
    row_map = sum(b for name, b in files.items() if "rowmap" in name or "row_map" in name)
    return {"picked_epoch": best["epoch"], "picked_val_auc": best["val"]["auc"],
            "picked": {k: best["test"][k] for k in ("auc", "logloss")},
            "last": {k: epochs[-1]["test"][k] for k in ("auc", "logloss")},
            "artifact_test_auc": export.get("test", {}).get("auc"),
            "artifact_max_abs_logit_diff": export.get("max_abs_logit_diff_vs_fake_quant"),
            "table_bytes_served": (sizes["table_bytes"] + row_map) if sizes else None,
            "mlp_bytes_served": sizes.get("mlp_bytes")}


def main() -> None:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants (default: all)")
    p.add_argument("--grid", default=",".join(GRID), help="comma-separated optimizer settings to tune over")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="job seeds; the first one tunes")
    p.add_argument("--epochs", type=int, default=12, help="most epochs per run (default: %(default)s)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_ROOT, help="run cache (default: runs/bench_cache)")
    p.add_argument("--allow-dirty", action="store_true", help="run uncached from a tree that differs from HEAD")
    add_out_argument(p, restricted_default=True)
    args = p.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    grid = [g for g in args.grid.split(",") if g]
    unknown = [v for v in variants if v not in VARIANTS] + [g for g in grid if g not in GRID]
    if unknown:
        raise SystemExit(f"error: unknown {unknown}; variants: {', '.join(VARIANTS)}; grid: {', '.join(GRID)}")
    seeds = parse_seeds(args.seeds)
    data_dir = REPO / get_config("kaggle_sample").data.data_dir
    if not (data_dir / "vocab").is_dir():
        raise SystemExit(f"error: {data_dir} has no converted sample; run `make kaggle-sample` first")
    restricted = [f"{name} {value}" for name, value, full in
                  (("variants", args.variants, ",".join(VARIANTS)), ("grid", args.grid, ",".join(GRID)),
                   ("seeds", args.seeds, ",".join(map(str, SEEDS))), ("epochs", str(args.epochs), "12"))
                  if value != full]
    out = result_dir(args.out, restricted)
    prov = provenance(RUN_DEPENDS)
    prov["code_commit"] = head_commit()
    report = Report()
    report(f"{DATA}; tuned on validation over {', '.join(grid)}; {args.epochs} epochs; seeds {args.seeds}")
    if restricted:
        report(f"RESTRICTED RUN ({'; '.join(restricted)}): not the bench's definition, not a result to cite")

    def one(variant: str, setting: str, seed: int):
        config, vargs = VARIANTS[variant]
        try:
            return run(config, job_args(vargs, GRID[setting], args.epochs), seed=seed, root=args.cache_dir,
                       allow_dirty=args.allow_dirty)
        except (DirtyTree, RuntimeError) as e:
            raise SystemExit(f"error: {e}") from None

    tuning, picks, runs = {}, {}, {}
    for variant in variants:  # 1. tuning on seed 0, by validation AUC
        tuning[variant] = {g: scores(one(variant, g, seeds[0]).summary) for g in grid}
        picks[variant] = max(grid, key=lambda g: tuning[variant][g]["picked_val_auc"])
        report(f"tuning {variant}: " + ", ".join(f"{g} val AUC {tuning[variant][g]['picked_val_auc']:.4f} "
                                                  f"(epoch {tuning[variant][g]['picked_epoch']})" for g in grid)
               + f" -> {picks[variant]}")
    for variant in variants:  # 2. the pick over every seed
        runs[variant] = {s: one(variant, picks[variant], s) for s in seeds}
    results = {v: {s: scores(r.summary) for s, r in by_seed.items()} for v, by_seed in runs.items()}

    report("")
    report("test metrics over the seeds (mean; at the epoch validation AUC picks, and at the last epoch); "
           "difference to FP32 of the same seed: mean [95% t-interval]")
    head = (f"{'variant':<16} {'optimizer':<16} {'ep':>3} {'AUC@pick':>9} {'LL@pick':>8} {'AUC@last':>9} "
            f"{'dAUC@pick vs FP32':>26} {'dAUC@last vs FP32':>26} {'tables KB':>10} {'x smaller':>9}")
    report(head)
    report("-" * len(head))
    fp32_tables = fp32_table_bytes()
    summary = {}
    for v in variants:
        by_seed = results[v]
        row = {"optimizer": picks[v],
               "picked_epochs": [r["picked_epoch"] for r in by_seed.values()],
               **{f"{m}_{w}": spread([r[w][m] for r in by_seed.values()]) for m in ("auc", "logloss")
                  for w in ("picked", "last")}}
        if "FP32" in results and v != "FP32":
            for w in ("picked", "last"):
                for m in ("auc", "logloss"):
                    row[f"{m}_{w}_minus_fp32"] = interval([results[v][s][w][m] - results["FP32"][s][w][m]
                                                           for s in seeds])
        served = [r["table_bytes_served"] for r in by_seed.values() if r["table_bytes_served"]]
        row["table_bytes_served"] = statistics.fmean(served) if served else fp32_tables
        row["compression"] = fp32_tables / row["table_bytes_served"]
        row["artifact_max_abs_logit_diff"] = max((r["artifact_max_abs_logit_diff"] or 0.0) for r in by_seed.values())
        summary[v] = row
        d = lambda k: (f"{row[k]['mean']:+.4f} [{row[k]['ci95'][0]:+.4f},{row[k]['ci95'][1]:+.4f}]"  # noqa: E731
                       if k in row else "")
        report(f"{v:<16} {picks[v]:<16} {statistics.median(row['picked_epochs']):>3.0f} "
               f"{row['auc_picked']['mean']:>9.4f} {row['logloss_picked']['mean']:>8.4f} "
               f"{row['auc_last']['mean']:>9.4f} {d('auc_picked_minus_fp32'):>26} {d('auc_last_minus_fp32'):>26} "
               f"{row['table_bytes_served'] / 1e3:>10.1f} {row['compression']:>9.1f}")
    report("")
    report(f"FP32 tables: {fp32_tables / 1e6:.2f} MB (a row for every id seen in training, dim 16); largest "
           f"|artifact - evaluated model| logit difference over every exported run: "
           f"{max(r['artifact_max_abs_logit_diff'] for r in summary.values()):.1e}")
    out.mkdir(parents=True, exist_ok=True)
    plot(summary, out / "real_quality.png", fp32_tables)
    payload = {**prov, "data": DATA, "grid": {g: GRID[g] for g in grid}, "epochs": args.epochs, "seeds": seeds,
               "restricted": restricted, "picks": picks, "tuning": tuning, "results": summary,
               "per_seed": {v: {str(s): r for s, r in by_seed.items()} for v, by_seed in results.items()},
               "runs": {v: {str(s): str(r.run_dir) for s, r in by_seed.items()} for v, by_seed in runs.items()}}
    print(f"json: {save('real_quality', payload, report.text, out=out)}  plot: {out / 'real_quality.png'}")


def plot(summary: dict, path: Path, fp32_tables: int) -> None:
    """Test AUC at the picked epoch against table bytes as served (log scale), one point per variant with the
    seeds' range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, row in summary.items():
        auc = row["auc_picked"]
        ax.errorbar([row["table_bytes_served"]], [auc["mean"]], yerr=[[auc["mean"] - auc["min"]],
                                                                      [auc["max"] - auc["mean"]]], fmt="o", capsize=3)
        ax.annotate(name, (row["table_bytes_served"], auc["mean"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    if "FP32" in summary:
        ax.axhline(summary["FP32"]["auc_picked"]["mean"], color="grey", ls="--", lw=0.8, label="FP32")
    ax.set_xscale("log")
    ax.set_xlabel(f"table bytes as served (FP32: {fp32_tables / 1e6:.1f} MB)")
    ax.set_ylabel("test AUC at the epoch validation picks")
    ax.set_title("Real Criteo sample: size against quality (mean over seeds, bars: min-max)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

"""The paper's effect on the bundled synthetic data: FP32, INT8 QAT, INT4 QAT and INT4 post-training quantization,
5 epochs each, over seeds 0, 1, 2.

Runs each named config through the real launcher (2 workers, torchx) once per seed (``--set seed=N``: model
initialization and shuffling; the synthetic data are the same for every seed). Prints, over the seeds, the mean
test accuracy and AUC per epoch and, per config, best and final test accuracy and AUC as mean ± sample standard
deviation [min, max]; writes ``compare_quant.{json,txt,png}`` (the plot: mean curves, min-max bands). The data are
synthetic (``datasets/synthetic.py``), not Criteo: the figures show the methods' relative behaviour on data whose
best achievable AUC is known, not Criteo accuracy.

Runs are cached (``bench/run_cache.py``) by config, arguments, seed, workers and commit: a bench stopped midway
resumes where it was, and only runs made from the current, committed code are reused. About 25 minutes per seed on
2 cores.

    python -m bench.compare_quant [--seeds 0,1,2] [--configs default_fp32,...] [--epochs N] [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.common import add_out_argument, format_spread, provenance, result_dir, save, spread
from bench.run_cache import DEFAULT_ROOT, RUN_DEPENDS, DirtyTree, head_commit, run
from dqrm.pipeline.report import plot_curves

CONFIGS = {"FP32": "default_fp32", "INT8 QAT": "default_int8", "INT4 QAT": "default", "INT4 PTQ": "default_ptq4"}
SEEDS = (0, 1, 2)
SYNTHETIC = ("synthetic data (the bundled generator, datasets/synthetic.py: Criteo-shaped, labels from a known "
             "model), not Criteo")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The options of a bench made of cached training runs."""
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)),
                   help="comma-separated job seeds (default: %(default)s; fewer than 3 is a restricted run)")
    p.add_argument("--epochs", type=int, help="epochs per run (default: the config's; setting it restricts the run)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="FIELD=VALUE",
                   help="config overrides for every run, e.g. quant_mode=ptq on the tiny config (restricts the run)")
    p.add_argument("--nproc", type=int, default=2, help="workers per run (default: %(default)s)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_ROOT, help="run cache (default: runs/bench_cache)")
    p.add_argument("--allow-dirty", action="store_true",
                   help="run even when the training code differs from HEAD: uncached, in fresh run dirs never reused")
    add_out_argument(p, restricted_default=True)


def parse_seeds(text: str) -> list[int]:
    seeds = [int(s) for s in text.split(",") if s.strip()]
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"error: --seeds needs distinct integers, got {text!r}")
    return seeds


def restrictions(args: argparse.Namespace, seeds: list[int], **other: str | None) -> list[str]:
    """How a run departs from the bench's definition (fewer seeds, set epochs, other configs): empty for a full run."""
    out = [f"{name} {value}" for name, value in other.items() if value is not None]
    if len(seeds) < len(SEEDS):
        out.append(f"seeds {','.join(map(str, seeds))}")
    if args.epochs is not None:
        out.append(f"epochs {args.epochs}")
    if args.set:
        out.append(f"--set {' '.join(args.set)}")
    return out


def train_args(args: argparse.Namespace) -> list[str]:
    """The training arguments the bench's options add to every run (part of each run's cache key)."""
    epochs = ["--epochs", str(args.epochs)] if args.epochs is not None else []
    return [*epochs, *(["--set", *args.set] if args.set else [])]


def run_jobs(jobs: dict[str, tuple[str, list[str]]], seeds: list[int], args: argparse.Namespace) -> dict:
    """Each job (label -> named config, training arguments) once per seed through the run cache, seed by seed (so
    that a stopped bench has whole seeds done); exits saying why on a refusal or a failed run."""
    runs: dict = {lbl: {} for lbl in jobs}
    try:
        for seed in seeds:
            for lbl, (config, extra) in jobs.items():
                runs[lbl][seed] = run(config, extra, seed=seed, nproc=args.nproc, root=args.cache_dir,
                                      allow_dirty=args.allow_dirty)
    except (DirtyTree, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None
    return runs


def same_commit(prov: dict, runs: dict) -> None:
    """Every run must come from the code the bench started at (HEAD can move during an hour-long bench)."""
    other = {r.key.commit for by_seed in runs.values() for r in by_seed.values()} - {prov["code_commit"]}
    if other:
        raise RuntimeError(f"the code moved from {prov['code_commit'][:12]} while the bench ran (runs from "
                           f"{sorted(other)}); "
                           f"rerun it: finished runs of the current commit are cached")


def runs_info(cached: dict) -> dict:
    """What the result file records about each run: where it is, whether it was reused, its key."""
    return {str(seed): {"run_dir": str(r.run_dir), "reused": r.reused, "cached": r.cached, "key": r.key.as_dict()}
            for seed, r in cached.items()}


def test_history(summary: dict) -> list[dict]:
    """Per epoch, the test metrics of the model the config is about (for post-training quantization: the quantized
    model's)."""
    key = "ptq_test" if summary["quant_mode"] == "ptq" else "test"
    return [{"epoch": e["epoch"], "test": e[key]} for e in summary["epochs"]]


def same_bayes(summaries: list[dict]) -> dict:
    """The test split's best achievable metrics, which must be the same in every run (one dataset for all seeds)."""
    bayes = [s.get("bayes_test") for s in summaries]
    if any(b != bayes[0] for b in bayes):
        raise RuntimeError(f"the runs saw different test data (best achievable metrics differ: {bayes})")
    return bayes[0]


def main() -> None:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS.values()),
                   help="comma-separated named configs (default: %(default)s; others make a restricted run)")
    add_run_arguments(p)
    args = p.parse_args()
    prov = provenance(RUN_DEPENDS)  # the runs' code: checked again by the cache before each run
    prov["code_commit"] = head_commit()  # the newest commit that changed that code: the runs' cache key
    seeds = parse_seeds(args.seeds)
    names = [c for c in args.configs.split(",") if c]
    labels = {next((lbl for lbl, c in CONFIGS.items() if c == name), name): name for name in names}
    restricted = restrictions(args, seeds, configs=None if names == list(CONFIGS.values()) else ",".join(names))
    out = result_dir(args.out, restricted)
    extra = train_args(args)

    runs = run_jobs({lbl: (cfg, extra) for lbl, cfg in labels.items()}, seeds, args)
    same_commit(prov, runs)
    history = {lbl: {seed: test_history(r.summary) for seed, r in by_seed.items()} for lbl, by_seed in runs.items()}
    bayes = same_bayes([r.summary for by_seed in runs.values() for r in by_seed.values()])

    per_epoch, results = {}, {}
    for lbl, by_seed in history.items():
        epochs = [e["epoch"] for e in by_seed[seeds[0]]]
        per_epoch[lbl] = [{"epoch": ep, **{m: spread([h[i]["test"][m] for h in by_seed.values()])
                                          for m in ("accuracy", "auc")}} for i, ep in enumerate(epochs)]
        results[lbl] = {f"{which}_{m}": spread([pick(e["test"][m] for e in h) for h in by_seed.values()])
                        for which, pick in (("best", max), ("final", lambda xs: list(xs)[-1]))
                        for m in ("accuracy", "auc")}
    if "FP32" in history:  # paired per seed: the same seed's FP32 run
        for lbl in history:
            if lbl != "FP32":
                results[lbl]["final_accuracy_minus_fp32"] = spread(
                    [history[lbl][s][-1]["test"]["accuracy"] - history["FP32"][s][-1]["test"]["accuracy"]
                     for s in seeds])

    lines = [f"{SYNTHETIC}; {len(seeds)} seed(s) {','.join(map(str, seeds))}, {args.nproc} workers"]
    if restricted:
        lines.append(f"RESTRICTED RUN ({'; '.join(restricted)}): not the bench's definition, not a result to cite")
    lines += ["", "test accuracy % and AUC per epoch, mean over the seeds"]
    head = f"{'epoch':>5} " + " ".join(f"{lbl + ' acc%':>14} {lbl + ' AUC':>13}" for lbl in labels)
    lines += [head, "-" * len(head)]
    for i, row in enumerate(per_epoch[next(iter(labels))]):
        lines.append(f"{row['epoch']:>5} " + " ".join(
            f"{100 * per_epoch[lbl][i]['accuracy']['mean']:>14.2f} {per_epoch[lbl][i]['auc']['mean']:>13.4f}"
            for lbl in labels))
    lines += ["", "over the seeds: mean ±sample std [min, max]"]
    width = max(len(lbl) for lbl in labels)
    for m, fmt, scale, unit in (("accuracy", ".2f", 100, "test accuracy %"), ("auc", ".4f", 1, "test AUC")):
        lines.append(f"{unit}:")
        for lbl in labels:
            r = results[lbl]
            lines.append(f"  {lbl:<{width}}  best {format_spread(r[f'best_{m}'], fmt, scale)}   "
                         f"final {format_spread(r[f'final_{m}'], fmt, scale)}")
    for lbl in labels:
        if "final_accuracy_minus_fp32" in results[lbl]:
            lines.append(f"final accuracy {lbl} - FP32, same seed (points): "
                         f"{format_spread(results[lbl]['final_accuracy_minus_fp32'], '+.2f', 100)}")
    if bayes:
        lines.append(f"best achievable on this test split (true click probabilities): AUC {bayes['auc']:.4f}, "
                     f"accuracy {100 * bayes['accuracy']:.2f}%")
    exports = {lbl: {str(s): r.summary.get("export") for s, r in by_seed.items()} for lbl, by_seed in runs.items()}
    for lbl, by_seed in exports.items():
        done = [e for e in by_seed.values() if e]
        if done:
            z = done[0]["sizes"]
            lines.append(f"{lbl}: exported INT{done[0]['bits']} artifacts' test AUC "
                         f"{format_spread(spread([e['test']['auc'] for e in done]), '.4f')}, largest |artifact - "
                         f"evaluated model| {max(e['max_abs_logit_diff_vs_fake_quant'] for e in done):.1e}; "
                         f"{z['artifact_bytes'] / 1e6:.1f} MB on disk vs FP32 {z['fp32_bytes'] / 1e6:.1f} MB")
    text = "\n".join(lines)
    print(text)
    plot(per_epoch, out / "compare_quant.png", bayes, f"Synthetic data: test metrics per epoch, mean over "
                                                      f"{len(seeds)} seed(s) (band: min-max), {args.nproc} workers")
    payload = {**prov, "data": SYNTHETIC, "seeds": seeds, "epochs": args.epochs, "set": args.set,
               "nproc": args.nproc, "restricted": restricted, "configs": labels,
               "spread": "mean, sample std, min, max over the seeds",
               "per_epoch_mean": per_epoch, "results": results, "bayes_test": bayes, "exports": exports,
               "runs": {lbl: runs_info(by_seed) for lbl, by_seed in runs.items()},
               "test_history": {lbl: {str(s): h for s, h in by_seed.items()} for lbl, by_seed in history.items()}}
    print(f"json: {save('compare_quant', payload, text, out=out)}  plot: {out / 'compare_quant.png'}")


def plot(per_epoch: dict, path: Path, bayes: dict | None, title: str) -> None:
    """Test AUC and accuracy per epoch: the mean over seeds, the band between the lowest and highest seed."""
    series = {name: [{"epoch": r["epoch"], "test": {k: r[k]["mean"] for k in ("auc", "accuracy")}} for r in rows]
              for name, rows in per_epoch.items()}
    bands = {name: [{k: (r[k]["min"], r[k]["max"]) for k in ("auc", "accuracy")} for r in rows]
             for name, rows in per_epoch.items()}
    plot_curves(series, path, bayes=bayes, title=title, bands=bands)


if __name__ == "__main__":
    main()

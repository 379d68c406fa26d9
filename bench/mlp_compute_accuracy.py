"""Does training the MLPs in bfloat16 (``quant.mlp_compute=bfloat16``) cost accuracy? FP32, INT4 QAT (weight-only
MLPs, float32 activations) and INT4 QAT with bfloat16 MLPs, the default job (5 epochs, 2 workers) through the real
launcher, over seeds 0, 1, 2. Prints final and best test accuracy and AUC per variant (mean ± sample standard
deviation [min, max]) and the differences the goals are about, paired per seed: bfloat16 minus weight-only INT4
final AUC (goal: within 0.001) and bfloat16 minus FP32 final accuracy (goal: >= 0); and, per run, how far the
exported artifact and its torch.export program are from the evaluated model. On the bundled synthetic data, not
Criteo.

Runs are cached (``bench/run_cache.py``) by config, arguments, seed, workers and commit, like ``compare_quant``'s
(whose FP32 and INT4 runs these are, when both are made at the same commit); about 6 minutes each on 2 cores.

    python -m bench.mlp_compute_accuracy [--seeds 0,1,2] [--epochs N] [--out DIR]
"""

from __future__ import annotations

import argparse

from bench.common import format_spread, provenance, result_dir, save, spread
from bench.compare_quant import (SYNTHETIC, add_run_arguments, parse_seeds, restrictions, run_jobs, runs_info,
                                 same_bayes, same_commit, train_args)
from bench.run_cache import RUN_DEPENDS, head_commit

VARIANTS = {
    "FP32": ("default_fp32", []),
    "INT4 QAT": ("default", []),
    "INT4 QAT, bf16 MLPs": ("default", ["--set", "quant.mlp_compute=bfloat16"]),
}
BF16, INT4, FP32 = "INT4 QAT, bf16 MLPs", "INT4 QAT", "FP32"


def main() -> None:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p)
    args = p.parse_args()
    prov = provenance(RUN_DEPENDS)
    prov["code_commit"] = head_commit()  # the newest commit that changed the runs' code: their cache key
    seeds = parse_seeds(args.seeds)
    restricted = restrictions(args, seeds)
    out = result_dir(args.out, restricted)
    common = train_args(args)

    runs = run_jobs({name: (config, [*common, *extra]) for name, (config, extra) in VARIANTS.items()}, seeds, args)
    same_commit(prov, runs)
    bayes = same_bayes([r.summary for by_seed in runs.values() for r in by_seed.values()])
    final = {name: {s: r.summary["epochs"][-1]["test"] for s, r in by_seed.items()} for name, by_seed in runs.items()}
    best = {name: {m: spread([max(e["test"][m] for e in r.summary["epochs"]) for r in by_seed.values()])
                   for m in ("accuracy", "auc")} for name, by_seed in runs.items()}
    results = {name: {"final_accuracy": spread([t["accuracy"] for t in final[name].values()]),
                      "final_auc": spread([t["auc"] for t in final[name].values()]),
                      "best_accuracy": best[name]["accuracy"], "best_auc": best[name]["auc"],
                      "train_samples_per_s": spread([r.summary["epochs"][-1]["samples_per_s"]
                                                     for r in runs[name].values()])}
               for name in VARIANTS}
    auc_vs_int4 = spread([final[BF16][s]["auc"] - final[INT4][s]["auc"] for s in seeds])
    acc_vs_fp32 = spread([final[BF16][s]["accuracy"] - final[FP32][s]["accuracy"] for s in seeds])
    int4_acc_vs_fp32 = spread([final[INT4][s]["accuracy"] - final[FP32][s]["accuracy"] for s in seeds])
    exports = {name: {str(s): r.summary.get("export") or None for s, r in by_seed.items()}
               for name, by_seed in runs.items()}
    worst = {name: {"artifact_vs_evaluated": max(e["max_abs_logit_diff_vs_fake_quant"] for e in by.values()),
                    "program_vs_artifact": max(e["program"]["max_abs_logit_diff_vs_artifact"] for e in by.values())}
             for name, by in exports.items() if all(by.values())}

    lines = [f"{SYNTHETIC}; config default, {len(seeds)} seed(s) {','.join(map(str, seeds))}, {args.nproc} workers"]
    if restricted:
        lines.append(f"RESTRICTED RUN ({'; '.join(restricted)}): not the bench's definition, not a result to cite")
    lines += ["", "over the seeds: mean ±sample std [min, max]"]
    width = max(map(len, VARIANTS))
    for name, r in results.items():
        lines.append(f"  {name:<{width}}  final acc % {format_spread(r['final_accuracy'], '.2f', 100)}  "
                     f"AUC {format_spread(r['final_auc'], '.4f')}   best acc % "
                     f"{format_spread(r['best_accuracy'], '.2f', 100)}  AUC {format_spread(r['best_auc'], '.4f')}")
    met_auc = abs(auc_vs_int4["mean"]) <= 0.001
    met_acc = acc_vs_fp32["mean"] >= 0
    lines += ["", "paired per seed (same seed's runs):",
              f"  final AUC, bf16 MLPs - weight-only INT4: {format_spread(auc_vs_int4, '+.5f')} "
              f"(goal: mean within 0.001: {'met' if met_auc else 'MISSED'})",
              f"  final accuracy, bf16 MLPs - FP32 (points): {format_spread(acc_vs_fp32, '+.2f', 100)} "
              f"(goal: mean >= 0: {'met' if met_acc else 'MISSED'})",
              f"  final accuracy, weight-only INT4 - FP32 (points): {format_spread(int4_acc_vs_fp32, '+.2f', 100)}"]
    for name, w in worst.items():
        lines.append(f"  {name}: largest |artifact - evaluated| logit {w['artifact_vs_evaluated']:.1e}, "
                     f"|torch.export program - artifact| {w['program_vs_artifact']:.1e}")
    if bayes:
        lines.append(f"best achievable on this test split (true click probabilities): AUC {bayes['auc']:.4f}, "
                     f"accuracy {100 * bayes['accuracy']:.2f}%")
    text = "\n".join(lines)
    print(text)
    payload = {**prov, "data": SYNTHETIC, "seeds": seeds, "epochs": args.epochs, "set": args.set,
               "nproc": args.nproc, "restricted": restricted, "variants": VARIANTS,
               "spread": "mean, sample std, min, max over the seeds; differences paired per seed",
               "results": results, "final_auc_bf16_minus_int4": auc_vs_int4,
               "final_accuracy_bf16_minus_fp32": acc_vs_fp32, "final_accuracy_int4_minus_fp32": int4_acc_vs_fp32,
               "goals": {"auc_within_0.001_of_int4": met_auc, "accuracy_at_least_fp32": met_acc},
               "export_diffs": worst, "bayes_test": bayes, "exports": exports,
               "runs": {name: runs_info(by_seed) for name, by_seed in runs.items()}}
    print(f"json: {save('mlp_compute_accuracy', payload, text, out=out)}")


if __name__ == "__main__":
    main()

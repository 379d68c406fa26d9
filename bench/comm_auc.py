"""Does compressing every gradient exchange to INT8 cost accuracy? The default job (INT4 QAT, 5 epochs, 2 workers)
uncompressed and with INT8 everywhere (TorchRec INT8 qcomms on the gradient all-to-alls, touched-rows INT8 for the
data-parallel tables, even the small kernels ``comm.dp_whole_max_rows`` would all-reduce whole by default, INT8 MLP
gradients with error feedback), through the real launcher, over seeds 0, 1, 2. Prints the mean test AUC per epoch
of each variant and the final difference paired per seed (INT8 minus uncompressed, same seed) as mean ± sample
standard deviation [min, max], and the bytes each rank sent per step. On the bundled synthetic data, not Criteo.

Runs come from the cache ``bench.compare_quant`` uses (``bench/run_cache.py``): the uncompressed runs are its INT4
QAT runs, so after it only the INT8 runs are new (about 6 minutes each on 2 cores).

    python -m bench.comm_auc [--seeds 0,1,2] [--config default] [--epochs N] [--out DIR]
"""

from __future__ import annotations

import argparse

from bench.common import format_spread, provenance, result_dir, save, spread
from bench.compare_quant import (SYNTHETIC, add_run_arguments, parse_seeds, restrictions, run_jobs, runs_info,
                                 same_commit, train_args)
from bench.run_cache import RUN_DEPENDS, head_commit

VARIANTS = {
    "uncompressed": [],
    "int8_everywhere": ["--set", "comm.qcomms=int8", "comm.dp_tables=touched_int8", "comm.dense=int8_ef",
                        "comm.dp_whole_max_rows=0"],
}
CONFIG = "default"


def main() -> None:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=CONFIG, help="named config (default: %(default)s; another restricts the run)")
    add_run_arguments(p)
    args = p.parse_args()
    prov = provenance(RUN_DEPENDS)
    prov["code_commit"] = head_commit()  # the newest commit that changed the runs' code: their cache key
    seeds = parse_seeds(args.seeds)
    restricted = restrictions(args, seeds, config=None if args.config == CONFIG else args.config)
    out = result_dir(args.out, restricted)
    common = train_args(args)

    runs = run_jobs({name: (args.config, [*common, *extra]) for name, extra in VARIANTS.items()}, seeds, args)
    same_commit(prov, runs)
    auc = {name: {seed: [e["test"]["auc"] for e in r.summary["epochs"]] for seed, r in by_seed.items()}
           for name, by_seed in runs.items()}
    sent = {name: spread([r.summary["epochs"][-1]["comm_bytes_per_step"]["total"] for r in by_seed.values()])
            for name, by_seed in runs.items()}
    n_epochs = len(auc["uncompressed"][seeds[0]])
    per_epoch = [{"epoch": i + 1, **{name: spread([auc[name][s][i] for s in seeds]) for name in VARIANTS},
                  "difference": spread([auc["int8_everywhere"][s][i] - auc["uncompressed"][s][i] for s in seeds])}
                 for i in range(n_epochs)]
    final = per_epoch[-1]["difference"]

    lines = [f"{SYNTHETIC}; config {args.config}, {len(seeds)} seed(s) {','.join(map(str, seeds))}, "
             f"{args.nproc} workers"]
    if restricted:
        lines.append(f"RESTRICTED RUN ({'; '.join(restricted)}): not the bench's definition, not a result to cite")
    lines += ["", "test AUC per epoch, mean over the seeds; difference = INT8 everywhere - uncompressed, paired per "
                  "seed: mean ±sample std [min, max]",
              f"{'epoch':>5} {'uncompressed AUC':>17} {'INT8 everywhere AUC':>20}  difference"]
    for row in per_epoch:
        lines.append(f"{row['epoch']:>5} {row['uncompressed']['mean']:>17.5f} {row['int8_everywhere']['mean']:>20.5f}"
                     f"  {format_spread(row['difference'], '+.5f')}")
    lines.append(f"final test AUC difference {format_spread(final, '+.5f')} (goal: within 0.002); bytes sent per "
                 f"step per rank (mean over seeds): {sent['uncompressed']['mean']:,.0f} uncompressed, "
                 f"{sent['int8_everywhere']['mean']:,.0f} INT8 everywhere "
                 f"({sent['uncompressed']['mean'] / sent['int8_everywhere']['mean']:.1f}x fewer)")
    text = "\n".join(lines)
    print(text)
    payload = {**prov, "data": SYNTHETIC, "config": args.config, "seeds": seeds, "epochs": args.epochs,
               "set": args.set, "nproc": args.nproc, "restricted": restricted, "variants": VARIANTS,
               "spread": "mean, sample std, min, max over the seeds; differences paired per seed",
               "per_epoch": per_epoch, "final_difference": final, "bytes_per_step": sent,
               "test_auc": {name: {str(s): v for s, v in by_seed.items()} for name, by_seed in auc.items()},
               "runs": {name: runs_info(by_seed) for name, by_seed in runs.items()}}
    print(f"json: {save('comm_auc', payload, text, out=out)}")


if __name__ == "__main__":
    main()

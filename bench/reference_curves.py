"""Does the job learn as fast per epoch as facebookresearch/dlrm's ``dlrm_s_pytorch.py``, trained on the same rows?
Test AUC per epoch of the reference, run unmodified, and of the FP32 job (``kaggle_sample_fp32``, 2 workers, global
batch 256) with each MLP initialization (``model.mlp_init``: torch's default, and the reference's), side by side, on
the real 137k-row Criteo Kaggle sample (issue 31, point 3).

Same rows: the project's ``--split kaggle`` trains on the first 6/7 of the rows and halves the last seventh into
val (first half) then test (second half); the reference's Kaggle loader (``--data-set=kaggle``) cuts its
``train.txt`` into 7 days (``divmod``, the extra rows to the first days: the same 6/7) and halves the last into test
(first half, rounded up) then val. So the reference reads the sample with the last seventh's halves swapped: its
test rows are exactly the job's. What still differs, by design of each: the reference's vocabulary holds every id of
the file (val and test included: an id unseen in training keeps its random initial row), the job's every id seen in
training (an unseen id shares the missing value's row 0); the reference computes AUC with scikit-learn (and prints
it to 4 decimals), the job with TorchRec's metric. The reference shuffles the training rows once; the job every
epoch, or, in the third curve, never (``data.shuffle=false``: the sample's rows are in random order already).

The reference runs from a checkout outside this repository (``--reference-dir``: ``dlrm_s_pytorch.py``,
``dlrm_data_pytorch.py``, ``data_utils.py``, ``extend_distributed.py``, ``mlperf_logger.py``, ``optim/``,
``tricks/``) with its own interpreter (``--reference-python``: torch, numpy < 2, scikit-learn, mlperf-logging,
tqdm, tensorboard); it writes its preprocessed arrays beside its input in the cache and its MLPerf log ``dlrm.log``
into its own folder. Job runs are cached by ``bench/run_cache.py``; reference runs under ``CACHE/reference/`` by
the reference's code, its flags and the seed. About 40 minutes on 2 cores (3 seeds; a 12-epoch job curve takes
2-4 minutes, a reference curve 2-5).

    python -m bench.reference_curves --reference-dir DIR --reference-python PYTHON [--seeds 0,1,2] [--epochs 12]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import subprocess
import time
from pathlib import Path

from bench.common import format_spread, provenance, result_dir, save, spread
from bench.compare_quant import parse_seeds, runs_info, same_commit
from bench.run_cache import DEFAULT_ROOT, RUN_DEPENDS, DirtyTree, head_commit, run

SAMPLE = Path("../shared/data/criteo-real/kaggle_random_sample_137k.tsv.gz")
CONFIG = "kaggle_sample_fp32"
SEEDS, EPOCHS = (0, 1, 2), 12
REFERENCE = "reference (dlrm_s_pytorch.py)"
# label -> the job's overrides. The reference shuffles its training rows once and reads them in that order every
# epoch; the job reshuffles every epoch unless data.shuffle=false (the sample's rows are already in random order).
JOBS = {"job, torch init": ["model.mlp_init=torch"], "job, dlrm init": ["model.mlp_init=dlrm"],
        "job, dlrm init, one order": ["model.mlp_init=dlrm", "data.shuffle=false"]}
# The reference's flags for the job's model and optimization: kaggle's shapes (dim 16, 13-512-256-64-16,
# 367-512-256-1), BCE, plain SGD 0.1 on everything, batch 256 (the job's 128 per rank x 2), AUC after every epoch.
REFERENCE_FLAGS = ("--arch-sparse-feature-size=16", "--arch-mlp-bot=13-512-256-64-16", "--arch-mlp-top=512-256-1",
                   "--data-generation=dataset", "--data-set=kaggle", "--loss-function=bce", "--round-targets=True",
                   "--learning-rate=0.1", "--mini-batch-size=256", "--print-freq=1000", "--test-freq=100000",
                   "--test-mini-batch-size=16384", "--print-time", "--mlperf-logging")
REFERENCE_CODE = ("dlrm_s_pytorch.py", "dlrm_data_pytorch.py", "data_utils.py", "extend_distributed.py",
                  "mlperf_logger.py", "optim/rwsadagrad.py")
# One line per evaluation with --mlperf-logging: "... auc 0.7151, best auc 0.7151, accuracy 75.092 %, ..."
_EVAL_LINE = re.compile(r"\bauc (\d\.\d+), best auc [\d.]+, accuracy ([\d.]+) %")


def reference_input(sample: Path, dest: Path) -> Path:
    """``dest/train.txt``: the sample with its last seventh's halves swapped, so that the reference's test half (the
    first) holds the rows of the job's test split (``datasets.convert --split kaggle``: the second)."""
    path, marker = dest / "train.txt", dest / "input.json"
    digest = hashlib.sha256(sample.read_bytes()).hexdigest()
    if marker.is_file() and json.loads(marker.read_text()).get("sample_sha256") == digest and path.is_file():
        return path
    with gzip.open(sample, "rt", newline="") as f:
        lines = f.readlines()
    n = len(lines)
    day = n // 7  # datasets.convert's kaggle split: train [0, n - day), val the next day // 2 rows, test the rest
    train, half = n - day, day // 2
    per_day, extra = divmod(n, 7)  # the reference's: 7 days of per_day rows, one more in each of the first `extra`
    last = per_day  # extra < 7, so the last day never gets one
    if n - last != train or (last + 1) // 2 != n - train - half:
        raise RuntimeError(f"{sample}: {n} rows split differently by the two loaders (train {train} vs {n - last}, "
                           f"test {n - train - half} vs {(last + 1) // 2}); the curves would not be on the same rows")
    dest.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        f.writelines(lines[:train] + lines[train + half:] + lines[train:train + half])
    tmp.replace(path)
    marker.write_text(json.dumps({"sample": str(sample), "sample_sha256": digest, "rows": n, "train": train,
                                  "test_first": n - train - half, "val_last": half}, indent=2))
    return path


def parse_reference_log(text: str) -> list[dict]:
    """Per epoch, the reference's test AUC and accuracy (a fraction), from its ``--mlperf-logging`` output."""
    return [{"epoch": i + 1, "test": {"auc": float(auc), "accuracy": float(acc) / 100}}
            for i, (auc, acc) in enumerate(_EVAL_LINE.findall(text))]


def reference_run(python: str, ref_dir: Path, sample: Path, seed: int, epochs: int, cache: Path) -> dict:
    """The reference's curve for ``seed``: from the cache when a finished run of the same code, flags and seed is
    there, otherwise run (about 20 ms a step on 2 idle cores, 460 steps an epoch)."""
    code = hashlib.sha256(b"".join((ref_dir / f).read_bytes() for f in REFERENCE_CODE)).hexdigest()
    data = cache / "reference" / "data"
    raw = reference_input(sample, data)
    flags = [*REFERENCE_FLAGS, f"--raw-data-file={raw}",
             f"--processed-data-file={data / 'kaggleAdDisplayChallenge_processed.npz'}",
             f"--nepochs={epochs}", f"--numpy-rand-seed={seed}"]
    key = {"code_sha256": code, "flags": flags, "input": json.loads((data / "input.json").read_text())}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    run_dir = cache / "reference" / f"seed{seed}-{digest[:12]}"
    done, log_path = run_dir / "done.json", run_dir / "reference.log"
    cmd = [python, str(ref_dir / "dlrm_s_pytorch.py"), *flags]
    if done.is_file() and json.loads(done.read_text())["key"] == key:
        curve = parse_reference_log(log_path.read_text())
        return {"curve": curve, "command": cmd, "run_dir": str(run_dir), "reused": True}
    run_dir.mkdir(parents=True, exist_ok=True)
    print("+", " ".join(cmd), f"  (output: {log_path})", flush=True)
    t0 = time.time()
    with open(log_path, "w") as log:  # cwd: its TensorBoard folder goes there, not into the repository
        rc = subprocess.call(cmd, cwd=run_dir, stdout=log, stderr=subprocess.STDOUT)
    curve = parse_reference_log(log_path.read_text())
    if rc != 0 or len(curve) != epochs:
        raise SystemExit(f"error: the reference failed (exit {rc}, {len(curve)} of {epochs} evaluations); see "
                         f"{log_path}")
    done.write_text(json.dumps({"key": key, "seconds": round(time.time() - t0, 1)}, indent=2))
    return {"curve": curve, "command": cmd, "run_dir": str(run_dir), "reused": False}


def per_epoch(curves: list[list[dict]]) -> list[dict]:
    """Over the seeds' curves: per epoch, the spread of test AUC and accuracy."""
    return [{"epoch": i + 1, **{k: spread([c[i]["test"][k] for c in curves]) for k in ("auc", "accuracy")}}
            for i in range(min(map(len, curves)))]


def peak(rows: list[dict]) -> dict:
    """The epoch of the highest mean test AUC, and that AUC."""
    best = max(rows, key=lambda r: r["auc"]["mean"])
    return {"epoch": best["epoch"], "auc": best["auc"]["mean"]}


def first_reaching(rows: list[dict], auc: float) -> int | None:
    """The first epoch whose mean test AUC is at least ``auc``; None if none is."""
    return next((r["epoch"] for r in rows if r["auc"]["mean"] >= auc), None)


def main() -> None:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference-dir", type=Path, required=True,
                   help="a facebookresearch/dlrm checkout (or a copy of its files named in the description)")
    p.add_argument("--reference-python", required=True,
                   help="interpreter for the reference: torch, numpy < 2, scikit-learn, mlperf-logging, tqdm, "
                        "tensorboard")
    p.add_argument("--sample", type=Path, default=SAMPLE, help="raw Criteo sample (default: %(default)s)")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)),
                   help="comma-separated seeds of both (default: %(default)s; fewer restricts the run)")
    p.add_argument("--epochs", type=int, default=EPOCHS,
                   help="epochs (default: %(default)s; another restricts the run)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_ROOT, help="run cache (default: runs/bench_cache)")
    p.add_argument("--allow-dirty", action="store_true",
                   help="run even when the training code differs from HEAD: uncached, in fresh run dirs never reused")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for the result files (default: bench/results for a full run, /tmp/dqrm_bench for a "
                        "restricted one)")
    args = p.parse_args()
    seeds = parse_seeds(args.seeds)
    if not (args.reference_dir / "dlrm_s_pytorch.py").is_file():
        raise SystemExit(f"error: {args.reference_dir}/dlrm_s_pytorch.py not found: fetch facebookresearch/dlrm")
    if not Path("data/kaggle_sample/vocab").is_dir():
        raise SystemExit("error: data/kaggle_sample/vocab not found: run `make kaggle-sample` first")
    prov = provenance(RUN_DEPENDS)
    prov["code_commit"] = head_commit()
    restricted = ([f"seeds {args.seeds}"] if len(seeds) < len(SEEDS) else []) + (
        [f"epochs {args.epochs}"] if args.epochs != EPOCHS else [])
    out = result_dir(args.out, restricted)

    refs, runs = {}, {label: {} for label in JOBS}
    try:
        for seed in seeds:  # seed by seed, so that a stopped bench has whole seeds done
            refs[seed] = reference_run(args.reference_python, args.reference_dir.resolve(), args.sample.resolve(),
                                       seed, args.epochs, args.cache_dir.resolve())
            for label, overrides in JOBS.items():
                runs[label][seed] = run(CONFIG, ["--set", f"epochs={args.epochs}", *overrides],
                                        seed=seed, root=args.cache_dir, allow_dirty=args.allow_dirty)
    except (DirtyTree, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None
    same_commit(prov, runs)

    curves = {REFERENCE: [refs[s]["curve"] for s in seeds]}
    curves.update({label: [[{"epoch": e["epoch"], "test": e["test"]} for e in r.summary["epochs"]]
                           for r in by_seed.values()] for label, by_seed in runs.items()})
    rows = {label: per_epoch(c) for label, c in curves.items()}
    peaks = {label: peak(r) for label, r in rows.items()}
    ref_peak = peaks[REFERENCE]
    # The goal (issue 31): the job's peak at least the reference's, reached in no more epochs: the job's mean curve
    # gets to the reference's peak AUC by the reference's peak epoch.
    reach = {label: first_reaching(r, ref_peak["auc"]) for label, r in rows.items() if label != REFERENCE}
    goal = {label: epoch is not None and epoch <= ref_peak["epoch"] for label, epoch in reach.items()}

    lines = [f"real Criteo sample {args.sample.name}, --split kaggle (the reference reads the same train and test "
             f"rows); kaggle's model, SGD 0.1, global batch 256; the job {CONFIG} at 2 workers; "
             f"{len(seeds)} seed(s) {args.seeds}, {args.epochs} epochs"]
    if restricted:
        lines.append(f"RESTRICTED RUN ({'; '.join(restricted)}): not the bench's definition, not a result to cite")
    width = max(map(len, rows))
    lines += ["", "test AUC per epoch, mean over the seeds" + (" (±sample std)" if len(seeds) > 1 else ""),
              "  epoch  " + "  ".join(f"{label:>{width}}" for label in rows)]
    for i in range(min(map(len, rows.values()))):
        cell = lambda s: f"{s['mean']:.4f}" + (f" ±{s['std']:.4f}" if len(seeds) > 1 else "")  # noqa: E731
        lines.append(f"  {i + 1:>5}  " + "  ".join(f"{cell(r[i]['auc']):>{width}}" for r in rows.values()))
    lines += ["", "peak (highest mean test AUC) and final, over the seeds: mean ±sample std [min, max]"]
    for label, r in rows.items():
        lines.append(f"  {label:<{width}}  peak {peaks[label]['auc']:.4f} at epoch {peaks[label]['epoch']:>2}   "
                     f"final {format_spread(r[-1]['auc'], '.4f')}")
    lines.append(f"goal: the job's mean curve reaches the reference's peak ({ref_peak['auc']:.4f}) by its epoch "
                 f"({ref_peak['epoch']})")
    for label, met in goal.items():
        when = f"at epoch {reach[label]}" if reach[label] is not None else f"in none of the {args.epochs} epochs"
        lines.append(f"  {label}: reaches it {when}: {'met' if met else 'MISSED'}")
    text = "\n".join(lines)
    print(text)

    from dqrm.pipeline.report import plot_curves

    plot_curves({label: [{"epoch": x["epoch"], "test": {k: x[k]["mean"] for k in ("auc", "accuracy")}} for x in r]
                 for label, r in rows.items()}, out / "reference_curves.png",
                title=f"facebookresearch/dlrm vs the job, real Criteo sample, {len(seeds)} seed(s)",
                bands={label: [{k: (x[k]["min"], x[k]["max"]) for k in ("auc", "accuracy")} for x in r]
                       for label, r in rows.items()} if len(seeds) > 1 else None)
    payload = {**prov, "sample": str(args.sample), "config": CONFIG, "seeds": seeds, "epochs": args.epochs,
               "restricted": restricted, "jobs": JOBS, "reference_flags": list(REFERENCE_FLAGS),
               "reference_commands": {str(s): refs[s]["command"] for s in seeds},
               "spread": "mean, sample std, min, max over the seeds",
               "per_epoch": rows, "peaks": peaks, "epoch_reaching_reference_peak": reach, "goal_met": goal,
               "curves": {label: {str(s): c for s, c in zip(seeds, cs)} for label, cs in curves.items()},
               "reference_runs": {str(s): {k: refs[s][k] for k in ("run_dir", "reused")} for s in seeds},
               "runs": {label: runs_info(by_seed) for label, by_seed in runs.items()}}
    print(f"json: {save('reference_curves', payload, text, out=out)}  plot: {out / 'reference_curves.png'}")


if __name__ == "__main__":
    main()

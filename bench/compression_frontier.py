"""The size-accuracy frontier of the default job on the bundled synthetic data: how many bytes the served model takes
against its test accuracy, for uniform bit widths and for byte budgets whose bits and kept rows the job chooses.

Trains, through the real launcher (2 workers, torchx, 5 epochs each), the points

- FP32 (``default_fp32``), INT4 table (``default``: the paper's per-table grid) and the byte budgets 1/8, 1/12 and
  1/16 of the FP32 model (``default`` with ``--set quant.budget_ratio=R``), over seeds 0, 1, 2;
- INT8 (``default_int8``), INT4 row (``default_int4_row``) and INT2 (``default`` with ``quant.embedding_bits=2``),
  seed 0;
- on a second synthetic data configuration ("B": Zipf exponent 1.1, tail effect 0.1, generator seed 4321), FP32,
  INT4 table and budget 1/12, seed 0;

about 21 runs of about 5 minutes each on 2 cores (close to 2 hours); the runs of FP32, INT8 and INT4 table on the
default data are ``compare_quant``'s, already in the cache after it. Runs are cached (``bench/run_cache.py``) by
config, arguments, seed, workers and code commit: a bench stopped midway resumes where it was.

Prints, per point, the bytes as served (every file of the exported artifact, the budget's row map included; for
FP32 the float model's tables and MLPs, as the quantized runs' exports count them) and how many times fewer than
FP32's they are, final and best test accuracy and AUC as mean ± sample standard deviation [min, max] over the seeds,
and for the budgets what their search cost in epochs of training; then whether the frontier meets its goals.
Writes ``compression_frontier.{json,txt,png}``. The data are synthetic (``datasets/synthetic.py``), not Criteo: the
figures compare the methods on data whose best achievable accuracy is known, not Criteo accuracy.

    python -m bench.compression_frontier [--points LABEL,...] [--seeds 0,1,2] [--epochs N] [--dry-run] [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import shlex
import statistics
from pathlib import Path

from bench.common import format_spread, provenance, result_dir, save, spread
from bench.compare_quant import (SEEDS, SYNTHETIC, add_run_arguments, parse_seeds, restrictions, run_jobs, runs_info,
                                 same_bayes, same_commit, test_history)
from bench.run_cache import KEY_FILE, RUN_DEPENDS, RunKey, dirty_paths, head_commit, reusable_summary

DATA = {"A": "the generator's defaults (Zipf exponent 0.95, tail effect 0.05, generator seed 1234)",
        "B": "Zipf exponent 1.1, tail effect 0.1, generator seed 4321"}
DATA_B = ("data.synthetic.zipf_exponent=1.1", "data.synthetic.tail_effect_scale=0.1", "data.synthetic.seed=4321")
BUDGETS = {"1/8": 0.125, "1/12": 0.083333, "1/16": 0.0625}
"""Budget label -> ``quant.budget_ratio`` (1/12 rounded down, so that the budget stays within 1/12)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Point:
    """One point of the frontier: a named config with overrides, trained once per seed."""

    label: str
    config: str
    """Named config (``--config``)."""
    overrides: tuple[str, ...] = ()
    """``--set`` overrides of the config, before the user's own."""
    data: str = "A"
    """The synthetic data configuration (a key of ``DATA``)."""
    multi_seed: bool = False
    """Trained once per ``--seeds`` (default 0, 1, 2); otherwise once, with seed 0."""

    def seeds(self, seeds: list[int]) -> list[int]:
        return list(seeds) if self.multi_seed else [0]

    @property
    def budget(self) -> bool:
        return any(o.startswith("quant.budget_ratio=") for o in self.overrides)


POINTS = (
    Point(label="FP32", config="default_fp32", multi_seed=True),
    Point(label="INT8", config="default_int8"),
    Point(label="INT4 table", config="default", multi_seed=True),
    Point(label="INT4 row", config="default_int4_row"),
    Point(label="INT2", config="default", overrides=("quant.embedding_bits=2",)),
    *(Point(label=f"budget {name}", config="default", overrides=(f"quant.budget_ratio={ratio}",), multi_seed=True)
      for name, ratio in BUDGETS.items()),
    Point(label="FP32 (B)", config="default_fp32", overrides=DATA_B, data="B"),
    Point(label="INT4 table (B)", config="default", overrides=DATA_B, data="B"),
    Point(label="budget 1/12 (B)", config="default", overrides=(f"quant.budget_ratio={BUDGETS['1/12']}", *DATA_B),
          data="B"),
)
GOAL_INT4_RATIO, GOAL_BUDGET_RATIO, GOAL_BEST_SLACK = 5, 12, 0.001  # 0.001: 0.1 accuracy points


def point_args(point: Point, args: argparse.Namespace) -> list[str]:
    """A point's training arguments (part of its runs' cache key): ``--epochs`` if given, then one ``--set`` with
    the point's overrides and the user's after them (the user's win on a field both set). Without either, a point's
    arguments are ``compare_quant``'s, so that FP32, INT8 and INT4 table reuse its cached runs."""
    epochs = ["--epochs", str(args.epochs)] if args.epochs is not None else []
    overrides = [*point.overrides, *args.set]
    return [*epochs, *(["--set", *overrides] if overrides else [])]


def run_points(points: list[Point], seeds: list[int], args: argparse.Namespace) -> dict:
    """Every point's runs (label -> seed -> cached run), seed by seed: seed 0 gives a whole single-seed frontier
    before the other seeds start."""
    runs: dict = {p.label: {} for p in points}
    for seed in sorted({s for p in points for s in p.seeds(seeds)}):
        jobs = {p.label: (p.config, point_args(p, args)) for p in points if seed in p.seeds(seeds)}
        for label, by_seed in run_jobs(jobs, [seed], args).items():
            runs[label].update(by_seed)
    return runs


def cache_state(key: RunKey, root: Path) -> str:
    """What ``run_cache.run`` would do with ``key`` from a clean tree, without doing it (its run dir is
    ``ROOT/<commit>/<dirname>``, as there)."""
    run_dir = Path(root).resolve() / key.commit / key.dirname()
    try:
        if reusable_summary(run_dir, key) is not None:
            return "cached"
    except RuntimeError as e:
        return f"refused: {e}"
    return "unfinished: would resume" if (run_dir / KEY_FILE).exists() else "to train"


def dry_run(points: list[Point], seeds: list[int], args: argparse.Namespace, restricted: list[str]) -> None:
    commit, changed = head_commit(), dirty_paths()
    print(f"dry run: nothing is trained. Runs in the order the bench makes them; cache {args.cache_dir}, code "
          f"commit {commit[:12]}, {args.nproc} workers")
    if changed:
        print(f"note: {len(changed)} file(s) under {', '.join(RUN_DEPENDS)} differ from HEAD "
              f"({', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}): the bench would refuse to train, or "
              f"with --allow-dirty train every run uncached; the states below are those of the code commit")
    if restricted:
        print(f"restricted run ({'; '.join(restricted)}): results would go to {result_dir(args.out, restricted)}")
    width = max(len(p.label) for p in points)
    todo = 0
    for seed in sorted({s for p in points for s in p.seeds(seeds)}):
        for p in points:
            if seed in p.seeds(seeds):
                extra = point_args(p, args)
                state = cache_state(RunKey(config=p.config, args=tuple(extra), seed=seed, nproc=args.nproc,
                                           commit=commit), args.cache_dir)
                todo += state != "cached"
                print(f"  {p.label:<{width}}  seed {seed}  {state:<24}  --config {p.config} "
                      f"{shlex.join(extra)}".rstrip())
    print(f"{todo} run(s) to train or resume")


def fp32_bytes(runs: dict, points: list[Point]) -> dict[str, int | None]:
    """Per data configuration, the float model's bytes as the quantized runs' exports count them; every run has the
    same model shape, so they must agree. A budget run's export counts only the rows it kept, so its record of the
    whole model (``budget.fp32_bytes``) stands in for it."""
    found: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for p in points:
        for seed, r in runs[p.label].items():
            budget, export = r.summary.get("budget") or {}, r.summary.get("export")
            n = budget.get("fp32_bytes") if p.budget else export["sizes"].get("fp32_bytes") if export else None
            if n is not None:
                found[p.data][f"{p.label} seed {seed}"] = n
    out = {}
    for data in dict.fromkeys(p.data for p in points):
        if len(set(found[data].values())) > 1:
            raise RuntimeError(f"data {data}: the runs disagree on the FP32 model's bytes ({found[data]})")
        out[data] = next(iter(found[data].values()), None)
    return out


def seed_record(summary: dict) -> dict:
    """One run's numbers: final and best test metrics, bytes as served, and its budget's search with its cost in
    epochs of training (``search_epochs``: search seconds over the mean epoch's training seconds)."""
    history = test_history(summary)
    out = {f"{which}_{m}": pick([e["test"][m] for e in history])
           for which, pick in (("final", lambda xs: xs[-1]), ("best", max)) for m in ("accuracy", "auc")}
    sizes = (summary.get("export") or {}).get("sizes")
    out["artifact_bytes"] = sizes.get("artifact_bytes") if sizes else None
    out["sizes"] = sizes
    train = [e["train_seconds"] for e in summary["epochs"] if e.get("train_seconds")]
    out["mean_epoch_train_seconds"] = statistics.fmean(train) if train else None
    out["budget"] = summary.get("budget")
    search = (out["budget"] or {}).get("search_seconds")
    out["search_epochs"] = (search / out["mean_epoch_train_seconds"]
                            if search is not None and out["mean_epoch_train_seconds"] else None)
    return out


def point_result(point: Point, by_seed: dict, fp32: int | None) -> dict:
    """A point over its seeds: metric spreads, bytes as served (for FP32, ``fp32``) and the ratio to FP32's."""
    per_seed = {seed: seed_record(r.summary) for seed, r in by_seed.items()}
    out = {"label": point.label, "config": point.config, "overrides": list(point.overrides), "data": point.data,
           "budget": point.budget, "seeds": sorted(per_seed),
           **{f"{which}_{m}": spread([s[f"{which}_{m}"] for s in per_seed.values()])
              for which in ("final", "best") for m in ("accuracy", "auc")}}
    if all(r.summary["quant_mode"] == "fp32" for r in by_seed.values()):
        served = [fp32] * len(per_seed) if fp32 is not None else []
    else:
        served = [s["artifact_bytes"] for s in per_seed.values() if s["artifact_bytes"] is not None]
    complete = len(served) == len(per_seed)
    out["served_bytes"] = spread(served) if complete else None
    out["times_smaller"] = fp32 / out["served_bytes"]["mean"] if complete and fp32 else None
    if point.budget:
        costs = [s["search_epochs"] for s in per_seed.values() if s["search_epochs"] is not None]
        out["search_epochs"] = spread(costs) if len(costs) == len(per_seed) else None
    out["per_seed"] = {str(seed): s for seed, s in per_seed.items()}
    return out


def evaluate_goals(results: dict, fp32: dict[str, int | None]) -> list[dict]:
    """The frontier's goals on the default data (A), from the numbers: each met (True), not (False) or not
    evaluated for want of its points (None), with the numbers it was decided on."""
    base, fp32_a, goals = results.get("FP32"), fp32.get("A"), []

    text = f"uniform INT4 table: at most 1/{GOAL_INT4_RATIO} of FP32's bytes, final accuracy mean at least FP32's"
    int4 = results.get("INT4 table")
    if base is None or int4 is None or int4["served_bytes"] is None or not fp32_a:
        goals.append({"goal": text, "met": None, "detail": "needs the points FP32 and INT4 table with their sizes"})
    else:
        size = int4["served_bytes"]["max"]
        gain = int4["final_accuracy"]["mean"] - base["final_accuracy"]["mean"]
        goals.append({"goal": text, "met": size * GOAL_INT4_RATIO <= fp32_a and gain >= 0,
                      "served_bytes": size, "fp32_bytes": fp32_a, "final_accuracy_minus_fp32": gain,
                      "detail": f"{fp32_a / size:.2f}x smaller ({mb(size)} vs {mb(fp32_a)}); final accuracy "
                                f"{100 * int4['final_accuracy']['mean']:.2f}% vs FP32 "
                                f"{100 * base['final_accuracy']['mean']:.2f}% ({100 * gain:+.2f} points)"})

    text = (f"a byte budget at most 1/{GOAL_BUDGET_RATIO} of FP32's bytes, final accuracy mean at least FP32's and "
            f"best accuracy mean at least FP32's - {100 * GOAL_BEST_SLACK:.1f} points")
    budgets = {lbl: r for lbl, r in results.items() if r["data"] == "A" and r["budget"]}
    if base is None or not budgets or not fp32_a:
        goals.append({"goal": text, "met": None, "detail": "needs the point FP32, a budget point and their sizes"})
    else:
        candidates, lines = {}, []
        for lbl, r in budgets.items():
            size = r["served_bytes"]["max"] if r["served_bytes"] else None
            final = r["final_accuracy"]["mean"] - base["final_accuracy"]["mean"]
            best = r["best_accuracy"]["mean"] - base["best_accuracy"]["mean"]
            met = size is not None and size * GOAL_BUDGET_RATIO <= fp32_a and final >= 0 and best >= -GOAL_BEST_SLACK
            candidates[lbl] = {"met": met, "served_bytes": size, "final_accuracy_minus_fp32": final,
                               "best_accuracy_minus_fp32": best}
            ratio = f"{fp32_a / size:.2f}x smaller" if size else "size missing"
            lines.append(f"{lbl}: {'meets it' if met else 'does not'} ({ratio}; final accuracy {100 * final:+.2f} "
                         f"points, best {100 * best:+.2f} points vs FP32)")
        goals.append({"goal": text, "met": any(c["met"] for c in candidates.values()), "candidates": candidates,
                      "detail": "; ".join(lines)})

    text = "every budget run's search costs less than one epoch of training"
    costs = {f"{lbl} seed {seed}": s["search_epochs"] for lbl, r in results.items() if r["budget"]
             for seed, s in r["per_seed"].items()}
    if not costs:
        goals.append({"goal": text, "met": None, "detail": "needs a budget point"})
    else:
        missing = [k for k, v in costs.items() if v is None]
        worst = max((v for v in costs.values() if v is not None), default=None)
        detail = f"largest {worst:.2f} epochs" if worst is not None else "no search time recorded"
        goals.append({"goal": text, "met": not missing and worst < 1, "search_epochs": costs,
                      "detail": detail + (f"; missing in {', '.join(missing)}" if missing else "")})
    return goals


def mb(n: int | None) -> str:
    return f"{n / 1e6:.2f} MB" if n is not None else "missing"


def show(s: dict, fmt: str, scale: float = 1.0) -> str:
    """A spread over seeds, or one seed's value."""
    return format_spread(s, fmt, scale) if s["n"] > 1 else format(scale * s["mean"], fmt)


def budget_lines(r: dict) -> list[str]:
    """Per seed, what the budget run recorded of its search and choice (or that it is missing)."""
    lines = []
    for seed, s in r["per_seed"].items():
        b = s["budget"]
        if b is None:
            lines.append(f"  seed {seed}: budget record missing from the run's summary")
            continue
        fits = {True: " (fits)", False: " (OVER the budget)"}.get(b.get("fits"), "")
        search = b.get("search_seconds")
        cost = (f"search {search:.1f} s = {s['search_epochs']:.2f} of an epoch's training "
                f"({s['mean_epoch_train_seconds']:.1f} s)" if s["search_epochs"] is not None else
                f"search {f'{search:.1f} s' if search is not None else 'missing'}, epoch time missing")
        lines.append(f"  seed {seed}: budget {mb(b.get('budget_bytes'))}, predicted {mb(b.get('predicted_bytes'))}, "
                     f"served {mb(s['artifact_bytes'])}{fits}; {cost}; {choice(b.get('tables'))}")
    return lines


def choice(tables: list[dict] | None) -> str:
    """The budget's choice in a few words: tables per bit width, and the rows kept where rare rows are shared."""
    if not tables:
        return "table choice missing"
    bits = collections.Counter(t.get("bits") for t in tables)
    out = "tables " + ", ".join(f"{n} at {b} bits" for b, n in sorted(bits.items(), key=lambda kv: kv[0] or 0,
                                                                        reverse=True))
    mapped = [t for t in tables if t.get("kept_rows") is not None and t.get("rows") and t["kept_rows"] < t["rows"]]
    if mapped:
        kept = sum(t["kept_rows"] for t in mapped) / sum(t["rows"] for t in mapped)
        out += f"; {len(mapped)} share their rare rows, keeping {100 * kept:.0f}% of their rows"
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", help=f"comma-separated point labels (default: all: "
                                    f"{', '.join(x.label for x in POINTS)}; fewer make a restricted run)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the runs with their config, arguments, seed and state in the cache, and exit without "
                        "training")
    add_run_arguments(p)
    args = p.parse_args()
    seeds = parse_seeds(args.seeds)
    points = list(POINTS)
    if args.points:
        wanted = [x.strip() for x in args.points.split(",") if x.strip()]
        unknown = sorted(set(wanted) - {x.label for x in POINTS})
        if unknown or not wanted:
            raise SystemExit(f"error: unknown --points {unknown or args.points!r}; the points are "
                             f"{', '.join(x.label for x in POINTS)}")
        points = [x for x in POINTS if x.label in wanted]
    restricted = restrictions(args, seeds, points=None if points == list(POINTS) else ",".join(x.label for x in points))
    if args.dry_run:
        dry_run(points, seeds, args, restricted)
        return
    prov = provenance(RUN_DEPENDS)  # the runs' code: checked again by the cache before each run
    prov["code_commit"] = head_commit()  # the newest commit that changed that code: the runs' cache key
    out = result_dir(args.out, restricted)

    runs = run_points(points, seeds, args)
    same_commit(prov, runs)
    datas = list(dict.fromkeys(x.data for x in points))
    bayes = {d: same_bayes([r.summary for x in points if x.data == d for r in runs[x.label].values()]) for d in datas}
    fp32 = fp32_bytes(runs, points)
    results = {x.label: point_result(x, runs[x.label], fp32[x.data]) for x in points}
    goals = evaluate_goals(results, fp32)

    lines = [f"{SYNTHETIC}; data " + "; data ".join(f"{d}: {DATA[d]}" for d in datas),
             f"seeds {','.join(map(str, seeds))} for FP32, INT4 table and the budgets on data A, seed 0 for the other "
             f"points; {args.nproc} workers"]
    if restricted:
        lines.append(f"RESTRICTED RUN ({'; '.join(restricted)}): not the bench's definition, not a result to cite")
    lines += ["", "bytes as served: every file of the exported artifact (a budget's row map included); FP32: the float "
                  "model's tables and MLPs. Test accuracy % and AUC: mean over the seeds"]
    width = max(len(lbl) for lbl in results)
    head = (f"{'point':<{width}}  data  {'seeds':<5}  {'MB':>8}  {'x smaller':>9}  {'final acc%':>10}  "
            f"{'best acc%':>9}  {'final AUC':>9}  {'best AUC':>8}")
    lines += [head, "-" * len(head)]
    for lbl, r in results.items():
        size = f"{r['served_bytes']['mean'] / 1e6:.2f}" if r["served_bytes"] else "missing"
        ratio = f"{r['times_smaller']:.2f}" if r["times_smaller"] else "missing"
        lines.append(f"{lbl:<{width}}  {r['data']:>4}  {','.join(map(str, r['seeds'])):<5}  {size:>8}  {ratio:>9}  "
                     f"{100 * r['final_accuracy']['mean']:>10.2f}  {100 * r['best_accuracy']['mean']:>9.2f}  "
                     f"{r['final_auc']['mean']:>9.4f}  {r['best_auc']['mean']:>8.4f}")
    lines += ["", "over the seeds: mean ±sample std [min, max] (one seed: its value)"]
    for lbl, r in results.items():
        lines.append(f"{lbl} (data {r['data']}, seeds {','.join(map(str, r['seeds']))}):")
        for m, fmt, scale, unit in (("accuracy", ".2f", 100, "test accuracy %"), ("auc", ".4f", 1, "test AUC")):
            lines.append(f"  {unit:<15}  final {show(r[f'final_{m}'], fmt, scale)}   "
                         f"best {show(r[f'best_{m}'], fmt, scale)}")
        if r["served_bytes"] and r["served_bytes"]["min"] != r["served_bytes"]["max"]:
            lines.append(f"  MB as served     {show(r['served_bytes'], '.2f', 1e-6)}")
        if r["budget"]:
            cost = show(r["search_epochs"], ".2f") if r["search_epochs"] else "missing"
            lines.append(f"  search cost in epochs of training: {cost}")
            lines += budget_lines(r)
    for d, b in bayes.items():
        if b:
            lines.append(f"data {d}: best achievable on its test split (true click probabilities): AUC "
                         f"{b['auc']:.4f}, accuracy {100 * b['accuracy']:.2f}%")
    lines += ["", "goals (data A)"]
    for i, g in enumerate(goals, 1):
        state = {True: "MET", False: "NOT MET", None: "NOT EVALUATED"}[g["met"]]
        lines.append(f"({i}) {g['goal']}: {state}: {g['detail']}")
    text = "\n".join(lines)
    print(text)
    plot(results, bayes, out / "compression_frontier.png",
         f"Synthetic data (not Criteo): test accuracy against bytes as served, {args.nproc} workers\n(markers: mean "
         f"over the point's seeds, bars: min-max; dashed: best achievable)")
    payload = {**prov, "data": SYNTHETIC, "data_configs": {d: {"description": DATA[d],
                                                               "overrides": list(DATA_B) if d == "B" else []}
                                                           for d in datas},
               "seeds": seeds, "epochs": args.epochs, "set": args.set, "nproc": args.nproc, "restricted": restricted,
               "points": {x.label: {"config": x.config, "args": point_args(x, args), "data": x.data,
                                    "seeds": x.seeds(seeds)} for x in points},
               "spread": "mean, sample std, min, max over the seeds", "fp32_bytes": fp32, "results": results,
               "goals": goals, "bayes_test": bayes, "runs": {lbl: runs_info(by_seed) for lbl, by_seed in runs.items()}}
    print(f"json: {save('compression_frontier', payload, text, out=out)}  plot: {out / 'compression_frontier.png'}")


def plot(results: dict, bayes: dict, path: Path, title: str) -> None:
    """Final and best test accuracy against bytes as served (log scale), one marker per point, one colour per data
    configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    colours = {"A": "tab:blue", "B": "tab:orange"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, which in zip(axes, ("final", "best")):
        for lbl, r in results.items():
            if r["served_bytes"] is None:
                continue
            s, z = r[f"{which}_accuracy"], r["served_bytes"]
            x, y = z["mean"] / 1e6, 100 * s["mean"]
            ax.errorbar(x, y, xerr=bar(z, 1e-6), yerr=bar(s, 100), fmt="o", capsize=3, color=colours[r["data"]])
            ax.annotate(lbl, (x, y), textcoords="offset points", xytext=(5, 5 if r["data"] == "A" else -11),
                        fontsize=8)
        for d, b in bayes.items():
            if b:
                ax.axhline(100 * b["accuracy"], color=colours[d], linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("MB as served (log scale)")
        ax.set_ylabel(f"{which} test accuracy (%)")
        ax.set_title(f"{which} epoch" if which == "final" else "best epoch")
        ax.grid(alpha=0.3, which="both")
    handles = [Line2D([], [], color=colours[d], marker="o", linestyle="", label=f"data {d}") for d in bayes]
    axes[0].legend(handles=handles)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bar(s: dict, scale: float) -> list[list[float]]:
    """Error bar from the mean to the min and max of a spread (never below 0: the mean of equal values may round
    past them)."""
    return [[max(0.0, scale * (s["mean"] - s["min"]))], [max(0.0, scale * (s["max"] - s["mean"]))]]


if __name__ == "__main__":
    main()

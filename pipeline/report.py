"""The run summary: a table on the console, ``summary.json`` and a PNG of the metrics per epoch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def epoch_table(history: list[dict[str, Any]], bayes: dict[str, float] | None = None) -> str:
    """Per-epoch metrics; for post-training quantization runs, the quantized test metrics too."""
    head = (f"{'epoch':>5} {'train loss':>10} {'val AUC':>8} {'val acc%':>8} {'test AUC':>8} {'test acc%':>9} "
            f"{'test logloss':>12} {'samples/s':>10}")
    lines = [head, "-" * len(head)]
    for s in history:
        v, t = s["val"], s["test"]
        lines.append(f"{s['epoch']:>5} {s['train_loss']:>10.4f} {v['auc']:>8.4f} {100 * v['accuracy']:>8.2f} "
                     f"{t['auc']:>8.4f} {100 * t['accuracy']:>9.2f} {t['logloss']:>12.4f} {s['samples_per_s']:>10.0f}")
        if "ptq_test" in s:
            q, qv = s["ptq_test"], s["ptq_val"]
            lines.append(f"{'  ptq':>5} {'':>10} {qv['auc']:>8.4f} {100 * qv['accuracy']:>8.2f} {q['auc']:>8.4f} "
                         f"{100 * q['accuracy']:>9.2f} {q['logloss']:>12.4f}   (post-training quantized)")
    if bayes:
        lines.append(f"{'best':>5} {'':>10} {'':>8} {'':>8} {bayes['auc']:>8.4f} {100 * bayes['accuracy']:>9.2f} "
                     f"{bayes['logloss']:>12.4f}   (true click probabilities of the synthetic test split)")
    return "\n".join(lines)


def plot_curves(series: dict[str, list[dict[str, Any]]], path: Path, *, bayes: dict[str, float] | None = None,
                title: str = "", bands: dict[str, list[dict[str, tuple[float, float]]]] | None = None) -> None:
    """Test AUC and accuracy per epoch, one line per run in ``series``; ``bands`` (per run, per epoch, per metric a
    (low, high) pair, e.g. the range over seeds) are shaded around the lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "auc", "test AUC"), (axes[1], "accuracy", "test accuracy (%)")):
        scale = 100 if key == "accuracy" else 1
        for name, history in series.items():
            x = [s["epoch"] for s in history]
            line, = ax.plot(x, [scale * s["test"][key] for s in history], marker="o", label=name)
            if bands and name in bands:
                ax.fill_between(x, [scale * b[key][0] for b in bands[name]], [scale * b[key][1] for b in bands[name]],
                                color=line.get_color(), alpha=0.2, linewidth=0)
        if bayes:
            ax.axhline(scale * bayes[key], color="grey", linestyle="--", label="best achievable")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def strict_json(value: Any) -> Any:
    """``value`` with every NaN (an AUC over a single-class split) as None, so that it dumps as strict JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    path = run_dir / "summary.json"
    path.write_text(json.dumps(strict_json(summary), indent=2, allow_nan=False))
    return path


def report(run_dir: Path, name: str, summary: dict[str, Any]) -> None:
    """Rank 0 at the end of a job: ``summary.json``, the plot, and on the console the epoch table, the gap to the
    best achievable AUC (synthetic data) and the exported model's metrics and sizes."""
    history, bayes, exported = summary["epochs"], summary["bayes_test"], summary["export"]
    write_summary(run_dir, summary)
    plot_curves({name: history}, run_dir / "metrics.png", bayes=bayes, title=f"{name}: test metrics")
    print("\n" + epoch_table(history, bayes), flush=True)
    if bayes:
        best = max(history, key=lambda s: s["test"]["auc"])
        print(f"best test AUC {best['test']['auc']:.4f} (epoch {best['epoch']}) is "
              f"{bayes['auc'] - best['test']['auc']:.4f} below the best achievable {bayes['auc']:.4f}")
    if exported:
        budget = summary.get("budget")
        print(export_report(exported, configured_fp32_bytes=budget["fp32_bytes"] if budget else None), flush=True)
    print(f"summary: {run_dir / 'summary.json'}  plot: {run_dir / 'metrics.png'}", flush=True)


def export_report(e: dict, *, configured_fp32_bytes: int | None = None) -> str:
    """The export's lines. Sizes compare with the FP32 model as configured (every row of every table):
    ``configured_fp32_bytes`` where the trained float model is smaller than that (a byte budget's shared rows),
    which is then shown beside it."""
    t, z = e["test"], e["sizes"]
    mb = lambda b: f"{b / 1e6:.1f} MB"  # noqa: E731
    compute = " computing in bfloat16" if e.get("mlp_compute") == "bfloat16" else ""
    fp32 = configured_fp32_bytes or z["fp32_bytes"]
    trained = (f" as configured (the float model trained with the budget's shared rows: {mb(z['fp32_bytes'])})"
               if fp32 != z["fp32_bytes"] else "")
    program = e.get("program")
    program = (f"\ntorch.export program (same rows): {program['path']}, max |program - artifact logits| "
               f"{program['max_abs_logit_diff_vs_artifact']:.2e}") if program else ""
    return (f"exported INT{e['bits']} model ({e['granularity']} grid, INT{e['mlp_bits'] or 32} MLPs{compute}): "
            f"test AUC {t['auc']:.4f} acc {100 * t['accuracy']:.2f}% logloss {t['logloss']:.4f} | "
            f"max |artifact - fake-quant logits| {e['max_abs_logit_diff_vs_fake_quant']:.2e}\n"
            f"sizes: FP32 {mb(fp32)}{trained}; artifact {mb(z['artifact_bytes'])} on disk "
            f"({fp32 / z['artifact_bytes']:.1f}x smaller than FP32), {mb(z['loaded_bytes'])} in memory once "
            f"loaded; tables {mb(z['table_bytes'])} = codes {mb(z['table_codes_bytes'])} + fp16 scale/bias "
            f"{mb(z['table_scale_bias_bytes'])} + padding {mb(z['table_padding_bytes'])} (rows aligned to "
            f"{z['row_alignment']} B); MLPs {mb(z['mlp_bytes'])}  ->  {e['path']}{program}")

"""The paper's effect on the default data: FP32, INT8 QAT, INT4 QAT and INT4 post-training quantization, 5 epochs each.

Runs each named config through the real launcher (2 workers, torchx), then prints one table of test accuracy and
AUC per epoch, writes `bench/results/compare_quant.{json,png}`. A run dir that already finished is reused.

    python -m bench.compare_quant [--runs-dir runs/compare] [--nproc 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench.common import RESULTS, save
from pipeline.report import plot_curves

CONFIGS = {"FP32": "default_fp32", "INT8 QAT": "default_int8", "INT4 QAT": "default", "INT4 PTQ": "default_ptq4"}


def run(config: str, run_dir: Path, nproc: int, extra: list[str] | None = None) -> dict:
    """The summary of a job run through the launcher (``extra``: more training arguments), reused if finished."""
    summary = run_dir / "summary.json"
    if not summary.is_file():
        cmd = [sys.executable, "-m", "pipeline.launch", "--run-dir", str(run_dir), "--nproc", str(nproc), "--",
               "--config", config, *(extra or [])]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(summary.read_text())


def main() -> None:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs-dir", type=Path, default=Path("runs/compare"), help="where the four runs go")
    p.add_argument("--nproc", type=int, default=2, help="workers per run")
    args = p.parse_args()
    summaries = {label: run(cfg, args.runs_dir / cfg, args.nproc) for label, cfg in CONFIGS.items()}
    series = {label: s["epochs"] for label, s in summaries.items() if label != "INT4 PTQ"}
    ptq = summaries["INT4 PTQ"]["epochs"]
    series["INT4 PTQ"] = [{"epoch": e["epoch"], "test": e["ptq_test"]} for e in ptq]
    bayes = summaries["FP32"]["bayes_test"]
    labels = list(series)
    epochs = [e["epoch"] for e in series["FP32"]]
    head = f"{'epoch':>5} " + " ".join(f"{lbl + ' acc%':>14} {lbl + ' AUC':>13}" for lbl in labels)
    lines = [head, "-" * len(head)]
    for i, ep in enumerate(epochs):
        lines.append(f"{ep:>5} " + " ".join(
            f"{100 * series[lbl][i]['test']['accuracy']:>14.2f} {series[lbl][i]['test']['auc']:>13.4f}"
            for lbl in labels))
    best = {lbl: max(100 * e["test"]["accuracy"] for e in series[lbl]) for lbl in labels}
    final = {lbl: 100 * series[lbl][-1]["test"]["accuracy"] for lbl in labels}
    lines.append(f"{'best':>5} " + " ".join(f"{best[lbl]:>14.2f} {'':>13}" for lbl in labels))
    lines.append(f"{'final':>5} " + " ".join(f"{final[lbl]:>14.2f} {'':>13}" for lbl in labels))
    print("\n".join(lines))
    print(f"best achievable on this test split: AUC {bayes['auc']:.4f}, accuracy {100 * bayes['accuracy']:.2f}%")
    exports = {lbl: summaries[lbl].get("export") for lbl in labels}
    for lbl, e in exports.items():
        if e:
            z = e["sizes"]
            print(f"{lbl}: exported INT{e['bits']} artifact test AUC {e['test']['auc']:.4f} acc "
                  f"{100 * e['test']['accuracy']:.2f}%, max |artifact - eval| {e['max_abs_logit_diff_vs_fake_quant']:.1e},"
                  f" artifact {z['artifact_bytes'] / 1e6:.1f} MB on disk (padding {z['table_padding_bytes'] / 1e6:.1f} MB)"
                  f" vs FP32 {z['fp32_bytes'] / 1e6:.1f} MB")
    RESULTS.mkdir(exist_ok=True)
    plot_curves(series, RESULTS / "compare_quant.png", bayes=bayes,
                title="Synthetic default data: test metrics per epoch (2 workers)")
    path = save("compare_quant", {"series": series, "best_acc": best, "final_acc": final, "bayes_test": bayes,
                                  "exports": exports})
    print(f"json: {path}  plot: {RESULTS / 'compare_quant.png'}")


if __name__ == "__main__":
    main()

"""Does compressing every gradient exchange to INT8 cost accuracy? The default job (INT4 QAT, 5 epochs, 2 workers)
uncompressed and with INT8 everywhere (TorchRec INT8 qcomms on the gradient all-to-alls, touched-rows INT8 for the
data-parallel tables, even the small kernels ``comm.dp_whole_max_rows`` would all-reduce whole by default, INT8 MLP
gradients with error feedback), through the real launcher; prints test AUC per epoch,
the final difference and the bytes each rank sent per step. A run dir that already finished is reused.

    python -m bench.comm_auc [--runs-dir runs/comm_auc] [--nproc 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.common import save
from bench.compare_quant import run

VARIANTS = {
    "uncompressed": [],
    "int8_everywhere": ["--set", "comm.qcomms=int8", "comm.dp_tables=touched_int8", "comm.dense=int8_ef",
                        "comm.dp_whole_max_rows=0"],
}


def main() -> None:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs-dir", type=Path, default=Path("runs/comm_auc"), help="where the two runs go")
    p.add_argument("--nproc", type=int, default=2, help="workers per run")
    args = p.parse_args()
    runs = {name: run("default", args.runs_dir / name, args.nproc, extra) for name, extra in VARIANTS.items()}
    auc = {name: [e["test"]["auc"] for e in s["epochs"]] for name, s in runs.items()}
    sent = {name: s["epochs"][-1].get("comm_bytes_per_step", {}).get("total") for name, s in runs.items()}
    print(f"{'epoch':>5} {'uncompressed AUC':>17} {'INT8 everywhere AUC':>20} {'difference':>11}")
    for i, (a, b) in enumerate(zip(auc["uncompressed"], auc["int8_everywhere"]), start=1):
        print(f"{i:>5} {a:>17.5f} {b:>20.5f} {b - a:>+11.5f}")
    final = auc["int8_everywhere"][-1] - auc["uncompressed"][-1]
    print(f"final test AUC difference {final:+.5f} (goal: within 0.002); bytes sent per step per rank: "
          f"{sent['uncompressed']:,.0f} uncompressed, {sent['int8_everywhere']:,.0f} INT8 everywhere")
    print(f"json: {save('comm_auc', {'test_auc': auc, 'final_difference': final, 'bytes_per_step': sent})}")


if __name__ == "__main__":
    main()

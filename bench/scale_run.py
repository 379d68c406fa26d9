"""Scale run: the Terabyte-shaped model (26 tables, 49.1M rows, dim 64, 12.6 GB FP32) end to end on one box.

One command runs ``make train``'s launcher on ``--config terabyte_synthetic`` at world size 2 with a restart budget
of 1, SIGKILLs rank 1 after its mid-epoch checkpoint (``--kill-at-step``), lets the launcher's retry resume from
that checkpoint, finish the epoch, export shard-locally and score the artifact; then loads the artifact in a fresh
process, scores the held-out test rows and compares its logits with the QAT model's (saved by the job). Meanwhile a
sampler reads every worker's resident memory twice a second, so "the ranks together" is measured at every moment,
not added up from per-rank peaks taken at different times.

Reported per phase and rank (``logs/phases_rankR.json``, written by the job; a phase's peak is the kernel's
high-water mark, reset at the phase's start): wall seconds and peak RSS for data, build+shard, resume load, train
(checkpoint saves inside it listed separately), export (rows, then the serving module), artifact load, predict; the
checkpoint and artifact bytes; and the issue's goals, each marked met or missed:

- every rank's peak RSS <= 1.5 x its share of the FP32 table bytes + 2 GB;
- the ranks together <= 20 GB at every moment;
- export adds at most the largest table's integer bytes to any rank's peak;
- export time <= checkpoint save time.

    python -m bench.scale_run [--run-dir runs/scale_run] [--kill-at-step 300] [--out DIR]

Needs about 23 GB of memory and 40 GB of disk (two 12.6 GB checkpoints exist for a moment while the newer replaces
the older); it deletes the run's checkpoints at the end unless --keep-checkpoints. Takes about 20 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.common import add_out_argument, provenance, save
from bench.run_cache import RUN_DEPENDS
from dqrm.pipeline.phases import status_bytes

ROOT = Path(__file__).resolve().parent.parent
GB = 1e9


class RssSampler(threading.Thread):
    """Sums the resident memory of every process running ``pipeline.train`` (the ranks), every ``period`` s."""

    def __init__(self, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.period, self.stop_event = period, threading.Event()
        self.max_total, self.max_at, self.samples = 0, 0.0, []
        self.t0 = time.monotonic()

    @staticmethod
    def _ranks() -> dict[int, int]:
        out = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"dqrm.pipeline.train" in cmd and b"-m" in cmd:
                out[int(pid)] = status_bytes("VmRSS", pid) or 0
        return out

    def run(self) -> None:
        while not self.stop_event.is_set():
            ranks = self._ranks()
            total, t = sum(ranks.values()), time.monotonic() - self.t0
            self.samples.append((round(t, 1), total))
            if total > self.max_total:
                self.max_total, self.max_at = total, t
            self.stop_event.wait(self.period)


def fp32_share_per_rank(plan: list[dict], rows: dict[str, int], dim: int, world_size: int) -> list[int]:
    """FP32 table bytes each rank holds under the job's plan (replicated tables count on every rank)."""
    share = [0] * world_size
    for entry in plan:
        size = rows[entry["table"]] * dim * 4
        if entry["sharding"] == "data_parallel":
            for r in range(world_size):
                share[r] += size
        else:
            for r in entry["ranks"]:
                share[r] += size // len(entry["ranks"])
    return share


def fresh_process_check(run_dir: Path) -> dict:
    """Load the artifact and score the test split in a new interpreter; compare with the QAT model's logits."""
    code = (
        "import json, sys, torch\n"
        "from pathlib import Path\n"
        "from pipeline.phases import status_bytes\n"
        "from pipeline.predict import score\n"
        "from quant.export import load_with_manifest\n"
        "run = Path(sys.argv[1])\n"
        "import time; t0 = time.perf_counter()\n"
        "module, manifest = load_with_manifest(run / 'model_int4.pt')\n"
        "t1 = time.perf_counter()\n"
        "ref = torch.load(run / 'export_check.pt')\n"
        "test = [Path(p) for p in json.loads((run / 'summary.json').read_text())['test_files']]\n"
        "logits, labels = score(module, test, manifest['num_embeddings'], limit_rows=ref['rows'])\n"
        "t2 = time.perf_counter()\n"
        "print(json.dumps({'load_seconds': t1 - t0, 'predict_seconds': t2 - t1, 'rows': logits.numel(),\n"
        "                  'max_abs_logit_diff': float((logits - ref['logits']).abs().max()),\n"
        "                  'peak_rss_bytes': status_bytes('VmHWM')}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(run_dir)], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"fresh-process predict failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def phase_table(phases: dict[int, list[dict]]) -> list[dict]:
    rows = []
    for rank, entries in phases.items():
        for e in entries:
            rows.append({"rank": rank, "attempt": e.get("attempt", 0), "phase": e["phase"], "seconds": e["seconds"],
                         "peak_gb": (e["peak_rss_bytes"] or 0) / GB, "start_gb": (e["start_rss_bytes"] or 0) / GB})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "scale_run", help="run directory (made anew)")
    p.add_argument("--config", default="terabyte_synthetic", help="named config (default: %(default)s)")
    p.add_argument("--kill-at-step", type=int, default=300, help="SIGKILL rank 1 at this step (0: no kill)")
    p.add_argument("--keep-checkpoints", action="store_true", help="leave the checkpoints on disk")
    p.add_argument("--set", nargs="*", default=[], help="extra config overrides for the job")
    add_out_argument(p)
    args = p.parse_args(argv)
    prov = provenance(RUN_DEPENDS)  # the job runs in child processes
    if args.run_dir.exists():
        shutil.rmtree(args.run_dir)  # a bench never reuses an earlier run's output
    env = dict(os.environ, DQRM_CACHE_DIR=str(args.run_dir / "data"))  # the data are generated by this run
    if args.kill_at_step:
        env.update(DQRM_FAULT_KILL_AT_STEP=str(args.kill_at_step), DQRM_FAULT_KILL_RANK="1")
    cmd = [sys.executable, "-m", "dqrm.pipeline.launch", "--run-dir", str(args.run_dir), "--nproc", "2",
           "--max-retries", "1", "--", "--config", args.config, *(["--set", *args.set] if args.set else [])]
    print("+", " ".join(cmd), flush=True)
    sampler = RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, cwd=ROOT, env=env)
    wall = time.perf_counter() - t0
    sampler.stop_event.set()
    sampler.join()
    if rc != 0:
        print(f"error: the job failed (exit {rc}); logs in {args.run_dir}/logs and {args.run_dir}/torchx",
              file=sys.stderr)
        return 1
    run = args.run_dir
    summary = json.loads((run / "summary.json").read_text())
    cfg = json.loads((run / "config.json").read_text())
    plan = json.loads((run / "plan.json").read_text())
    phases = {r: json.loads((run / "logs" / f"phases_rank{r}.json").read_text()) for r in range(2)}
    names = [f"t_cat_{i}" for i in range(26)]
    rows = dict(zip(names, cfg["model"]["num_embeddings"]))
    dim = cfg["model"]["embedding_dim"]
    share = fp32_share_per_rank(plan, rows, dim, 2)
    check = fresh_process_check(run)
    export = summary["export"]
    sizes = export["sizes"]
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    ckpt_bytes = {c.name: sum(f.stat().st_size for f in c.iterdir()) for c in ckpts}

    def peak(rank: int, *phase_names: str) -> int:
        return max((e["peak_rss_bytes"] or 0) for e in phases[rank] if e["phase"] in phase_names)

    def seconds(rank: int, phase: str) -> list[float]:
        return [e["seconds"] for e in phases[rank] if e["phase"] == phase]

    bits = cfg["quant"]["embedding_bits"]
    largest_int = max(rows.values()) * (4 + dim * bits // 8)
    rank_peak = [max((e["peak_rss_bytes"] or 0) for e in phases[r]) for r in range(2)]
    export_added = []
    for r in range(2):
        before = max((e["peak_rss_bytes"] or 0) for e in phases[r] if e["phase"] not in
                     ("export_rows", "export_module", "artifact_load", "predict")
                     and e.get("attempt", 0) == max(x.get("attempt", 0) for x in phases[r]))
        export_added.append(max(0, peak(r, "export_rows", "export_module", "artifact_load", "predict") - before))
    export_seconds = sum(seconds(0, "export_rows")) + sum(seconds(0, "export_module"))
    save_seconds = [s for r in range(2) for s in seconds(r, "checkpoint_save")]
    goals = {
        "rank_peak_within_1.5x_share_plus_2GB": {
            "met": all(rank_peak[r] <= 1.5 * share[r] + 2e9 for r in range(2)),
            "peak_gb": [x / GB for x in rank_peak], "bound_gb": [(1.5 * s + 2e9) / GB for s in share]},
        "ranks_together_within_20GB": {"met": sampler.max_total <= 20e9, "max_gb": sampler.max_total / GB,
                                       "at_seconds": sampler.max_at},
        "export_adds_at_most_largest_table_int_bytes": {
            "met": max(export_added) <= largest_int, "added_gb": [x / GB for x in export_added],
            "largest_table_int_gb": largest_int / GB},
        "export_time_within_checkpoint_save_time": {
            "met": bool(save_seconds) and export_seconds <= min(save_seconds),
            "export_seconds": export_seconds, "checkpoint_save_seconds": save_seconds},
    }
    train_epochs = summary["epochs"]
    result = {
        **prov, "config": args.config, "kill_at_step": args.kill_at_step, "wall_seconds": wall,
        "fp32_table_bytes_per_rank": share, "phases": phases, "goals": goals,
        "ranks_together_max_bytes": sampler.max_total, "rss_timeline": sampler.samples[::4],
        "checkpoint_bytes": ckpt_bytes, "artifact": {"files": sizes["files"], "sizes": sizes},
        "train": [{k: e[k] for k in ("epoch", "step", "train_loss", "samples_per_s") if k in e} for e in train_epochs],
        "test_in_job": export["test"], "max_abs_logit_diff_in_job": export["max_abs_logit_diff_vs_fake_quant"],
        "fresh_process": check, "attempts": 1 + max(e.get("attempt", 0) for e in phases[0]),
    }
    if not args.keep_checkpoints:
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
        shutil.rmtree(run / "data", ignore_errors=True)
    killed = f"rank 1 SIGKILLed at step {args.kill_at_step}" if args.kill_at_step else "no worker killed"
    lines = [f"scale run: {args.config}, world size 2, {result['attempts']} attempt(s) ({killed}), "
             f"{wall / 60:.1f} min wall", ""]
    lines.append(f"{'rank':>4} {'att':>3} {'phase':<16} {'seconds':>8} {'peak GB':>8} {'start GB':>8}")
    for row in phase_table(phases):
        lines.append(f"{row['rank']:>4} {row['attempt']:>3} {row['phase']:<16} {row['seconds']:>8.1f} "
                     f"{row['peak_gb']:>8.2f} {row['start_gb']:>8.2f}")
    lines.append("")
    lines.append(f"FP32 table bytes per rank: {[round(s / GB, 2) for s in share]} GB; ranks together at most "
                 f"{sampler.max_total / GB:.2f} GB (sampled every 0.5 s)")
    speeds = ", ".join(f"{e['samples_per_s']:.0f}" for e in result["train"])
    lines.append(f"train: {speeds} samples/s (the resumed attempt's part of the epoch)")
    lines.append("checkpoints: " + ", ".join(f"{k} {v / GB:.2f} GB" for k, v in ckpt_bytes.items()))
    lines.append("artifact: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes["files"].items()) +
                 f"; tables {sizes['table_bytes'] / 1e6:.1f} MB of which padding "
                 f"{sizes['table_padding_bytes'] / 1e6:.1f} MB; FP32 {sizes['fp32_bytes'] / GB:.2f} GB "
                 f"({sizes['fp32_bytes'] / sizes['artifact_bytes']:.1f}x)")
    lines.append(f"export check in the job: max |artifact - QAT logits| "
                 f"{export['max_abs_logit_diff_vs_fake_quant']:.2e} on {check['rows']} test rows; test AUC "
                 f"{export['test']['auc']:.4f}")
    lines.append(f"fresh process: load {check['load_seconds']:.1f} s, predict {check['predict_seconds']:.1f} s, peak "
                 f"{check['peak_rss_bytes'] / GB:.2f} GB, max |artifact - QAT logits| "
                 f"{check['max_abs_logit_diff']:.2e}")
    lines.append("")
    for name, g in goals.items():
        detail = {k: v for k, v in g.items() if k != "met"}
        lines.append(f"{'MET   ' if g['met'] else 'MISSED'} {name}: {json.dumps(detail, default=float)}")
    text = "\n".join(lines)
    print(text)
    print(f"json: {save('scale_run', result, text, out=args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

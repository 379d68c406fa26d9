"""``python -m bench.faults``: the fault campaign. Runs the reference job (uninterrupted) and a job killed at step 360
(the start of the checkpoint faults), then each fault of ``bench.faults.catalog``, and judges it against the outcome
written for it: a table of fault x phase x action x expected x outcome in ``bench/results/faults.{txt,json}``, with
the count of faults that lost a checkpoint or an artifact or were silently wrong.

    python -m bench.faults [--only NAME[,NAME]] [--quick] [--list] [--terabyte] [--work DIR] [--out DIR]

Needs root (tmpfs and bind mounts under --work; all unmounted at the end) and about 2 GB of memory for the tmpfs
run dirs; each job runs alone (2 ranks). About 40 minutes on 2 cores; --terabyte adds the terabyte_synthetic model
(about 15 GB of memory, 40 GB of disk, 30 more minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

from bench.common import Report, add_out_argument, git_changes, provenance, result_dir, save
from bench.faults import harness as h
from bench.faults.catalog import FAULTS, QUICK, Damage, Expect, Fault, FillDisk, Phase, ReadOnly, SmallDisk, Start, \
    by_name
from bench.faults.judge import TIMING_KEYS, Observation, as_expected, checkpoint_order, classify, comparable, \
    differences, lost_checkpoints, silently_wrong
from bench.run_cache import RUN_DEPENDS

# The job: the default model under a byte budget of 1/16 with INT8 error-feedback MLP gradients, shortened to about
# a minute here (2 epochs of 240 steps, a checkpoint every 80 steps, a shorter budget search, smaller splits).
DEFAULT_JOB = ("--config", "default", "--epochs", "2", "--limit-train-batches", "240", "--limit-eval-batches", "2",
               "--set", "quant.budget_ratio=0.0625", "comm.dense=int8_ef", "checkpoint_every_steps=80",
               "quant.budget_warmup_steps=200", "quant.budget_eval_rows=4096", "data.synthetic.num_train=100000",
               "data.synthetic.num_val=10000", "data.synthetic.num_test=20000")
INTERRUPT_AT = 360  # steps: the job the checkpoint faults start from has checkpoints at 240 (epoch end) and 320
TERABYTE_JOB = ("--config", "terabyte_synthetic", "--limit-train-batches", "300", "--limit-eval-batches", "2",
                "--set", "checkpoint_every_steps=100", "checkpoint_keep=1")
JOB_TIMEOUT = 420.0
TB_TIMEOUT = 1800.0


class Model:
    """One model's reference: its job, the uninterrupted run, and (for the default) the interrupted one."""

    def __init__(self, work: Path, args: tuple[str, ...], timeout: float) -> None:
        self.work, self.args, self.timeout = work, list(args), timeout
        self.cache = work / "data"
        self.env = {"DQRM_CACHE_DIR": str(self.cache)}
        self.summary: dict | None = None
        self.ref: h.Reference | None = None
        self.predicted: dict[str, dict] = {}

    def places(self, run_dir: Path, cache: Path | None = None) -> dict[str, str]:
        return {str(run_dir): "<run>", str(cache or self.cache): "<data>"}

    def reference(self, say) -> Path:
        """The uninterrupted run; returns its run dir."""
        run = self.work / "runs" / "finished"
        say(f"reference run: {run}")
        t0 = time.time()
        job = h.launch(run, self.args, self.env, self.work / "reference.log")
        rc, left = job.wait(self.timeout)
        if rc != 0:
            raise RuntimeError(f"the reference run failed (exit {rc}); see {self.work / 'reference.log'}")
        self.summary = comparable(json.loads((run / "summary.json").read_text()), self.places(run))
        phases = json.loads((run / "logs" / "phases_rank0.json").read_text())
        seconds: dict[str, float] = {}
        for e in phases:
            seconds[e["phase"]] = max(seconds.get(e["phase"], 0.0), e["seconds"])
        newest = h.newest_checkpoint(run / "checkpoints")
        self.ref = h.Reference(seconds, sum(f.stat().st_size for f in newest.iterdir()),
                               (run / "model_int4.rows").stat().st_size)
        for name in ("model_int4.pt", "model_int4.pt2"):
            rc, out, metrics = h.predict(run / name, self.test_file(), self.work / f"reference_predict_{name}.log")
            if rc != 0:
                raise RuntimeError(f"predict on the reference's {name} failed: {out[-2000:]}")
            self.predicted[name] = metrics
        say(f"  {time.time() - t0:.0f} s; phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in seconds.items()))
        return run

    def test_file(self) -> Path:
        return next(self.cache.glob("synthetic-*/test.parquet"))

    def interrupted(self, say) -> Path:
        """A run killed at step ``INTERRUPT_AT``; returns the snapshot of it the INTERRUPTED faults start from."""
        run = self.work / "runs" / "interrupted"
        say(f"interrupted run (SIGKILL of rank 1 at step {INTERRUPT_AT} by the job's own hook): {run}")
        env = {**self.env, "DQRM_FAULT_KILL_AT_STEP": str(INTERRUPT_AT), "DQRM_FAULT_KILL_RANK": "1"}
        job = h.launch(run, self.args, env, self.work / "interrupted.log")
        rc, left = job.wait(self.timeout)
        state = h.verified(run)
        if rc == 0 or not state or not all(state.values()):
            raise RuntimeError(f"the interrupted run ended with exit {rc} and checkpoints {state}; see "
                               f"{self.work / 'interrupted.log'}")
        say(f"  checkpoints: {', '.join(state)}")
        return snapshot(run, self.work / "snapshots")


def snapshot(run: Path, folder: Path) -> Path:
    """A copy of ``run`` to restore it from before each fault that starts from it. Faults run in the original's
    place: a budgeted run dir records its own path (data.row_map in config.json), so a copy elsewhere is refused
    as another job's."""
    copy = folder / run.name
    shutil.rmtree(copy, ignore_errors=True)
    h.copy_run(run, copy)
    return copy


def run_fault(fault: Fault, model: Model, starts: dict[Start, Path], say, *, keep: bool = False) -> dict:
    """One fault, from its start to its judgement; every mount and process it made is gone when it returns."""
    rng = random.Random(fault.seed)
    restored = fault.start in (Start.INTERRUPTED, Start.FINISHED)
    run = model.work / "runs" / (starts[fault.start].name if restored else fault.name)
    (model.work / "logs").mkdir(parents=True, exist_ok=True)
    shutil.rmtree(run, ignore_errors=True)
    record: dict = {"fault": fault.name, "phase": fault.phase.value, "action": fault.action.describe(),
                    "expected": fault.expect.name, "start": fault.start.name, "seed": fault.seed, "run_dir": str(run),
                    "code_changed_at_start": git_changes(*RUN_DEPENDS), "notes": [], "lost": []}
    mounts = h.Mounts()
    t0 = time.time()
    try:
        env, cache = _prepare(fault, model, starts, run, mounts)
        before = {n for n, ok in h.verified(run).items() if ok} if run.is_dir() else set()
        obs = {"names": fault.names.replace("{run_dir}", str(run))}
        if fault.phase is Phase.SERVE:
            record["injected"] = h.damage(run, fault.action, rng)
            return _judged(fault, record, _serve(fault, model, run, obs), t0)
        record["injected"] = _before_launch(fault, run, mounts, rng)
        if isinstance(fault.action, Damage):
            before -= {n for n in before if any(d.startswith(f"checkpoints/{n}/") for d in record["injected"])}
            obs["damaged"] = True
        log = model.work / "logs" / f"{fault.name}.log"
        log.unlink(missing_ok=True)
        job = h.launch(run, model.args, env, log)
        if fault.phase is not Phase.AT_REST and not isinstance(fault.action, SmallDisk):
            point = h.wait_for_point(fault, job, model.ref, rng)
            if point is None:
                job.wait(model.timeout)
                record.update(outcome="NOT_INJECTED", as_expected=False, silently_wrong=False,
                              seconds=time.time() - t0)
                record["notes"].append("the job ended or left the phase before the point was reached")
                return record
            before = before or set(h.complete_checkpoints(run))  # whole at the point (verified when written)
            record["injected"] = [point, h.strike(fault.action, job, mounts, rng)]
        rc, summary = _ended(job, model, run, cache, record)
        text = log.read_text(errors="replace")
        obs.update(rc=rc, errors=h.error_lines(text), traceback=h.has_traceback(text, workers_only=True),
                   fell_back="is unusable" in text,
                   diff=tuple(differences(summary, model.summary)) if summary is not None else None)
        _check_kept(fault, model, run, before, record)
        if rc not in (0, None) and fault.expect in (Expect.RESUMES, Expect.REFUSES_THEN_RESUMES):
            obs.update(_recover(fault, model, run, env, cache, log, mounts, record))
        if fault.expect is Expect.RESUMES:
            obs["names"] = ""
        return _judged(fault, record, Observation(**obs), t0)
    finally:
        mounts.close()
        h.kill_all(run)
        if keep and restored:
            kept = run.with_name(fault.name)
            shutil.rmtree(kept, ignore_errors=True)
            run.rename(kept)
        elif not keep:
            shutil.rmtree(run, ignore_errors=True)  # a run dir is up to 0.5 GB; the logs are kept apart
        say(_line(record))


def _prepare(fault: Fault, model: Model, starts: dict[Start, Path], run: Path, mounts: h.Mounts):
    """The fault's run dir (restored from its start, on a tmpfs for the disk faults) and data cache; returns the
    job's environment and the data cache."""
    env, cache = dict(model.env), model.cache
    if fault.start is Start.FRESH_DATA:
        cache = model.work / "data_fresh" / fault.name
        shutil.rmtree(cache, ignore_errors=True)
        env["DQRM_CACHE_DIR"] = str(cache)
    if isinstance(fault.action, (FillDisk, SmallDisk)):
        mounts.tmpfs(run, fault.action.mb)
    if fault.start in (Start.INTERRUPTED, Start.FINISHED):
        h.copy_run(starts[fault.start], run)
        (run / "summary.json").unlink(missing_ok=True)  # only a summary this fault's runs write is judged
    return env, cache


def _before_launch(fault: Fault, run: Path, mounts: h.Mounts, rng: random.Random) -> list[str]:
    """What a fault does before its job starts: damage, a read-only run dir, a small disk."""
    if isinstance(fault.action, Damage):
        return h.damage(run, fault.action, rng)
    if isinstance(fault.action, ReadOnly) and fault.phase is Phase.AT_REST:
        at = run / fault.action.sub if fault.action.sub else run
        mounts.read_only(at)
        return [f"made {at} read-only before the run"]
    if isinstance(fault.action, SmallDisk):
        return [f"run dir on a {fault.action.mb} MB tmpfs from the start"]
    return []


def _ended(job: h.Launched, model: Model, run: Path, cache: Path, record: dict) -> tuple[int | None, dict | None]:
    """Wait for a job; its exit status and (after exit 0) its comparable summary."""
    rc, left = job.wait(model.timeout)
    if left:
        record["notes"].append(f"processes left running after the launcher exited (killed): {left}")
    return rc, (_summary(run, model, cache) if rc == 0 else None)


def _check_kept(fault: Fault, model: Model, run: Path, before: set[str], record: dict) -> None:
    """After the faulted run: the checkpoints whole before it, the finished artifact, and the damaged checkpoints
    (kept for the operator, never deleted)."""
    after = h.verified(run)
    record["lost"] += lost_checkpoints(before, after)
    record["checkpoints"] = {"before": sorted(before), "after": after}
    if fault.start is Start.FINISHED:
        record["lost"] += _artifact_lost(run, model, model.work / "logs", fault.name)
    if fault.expect is Expect.FALLS_BACK:
        damaged = {d.split("/")[1] for d in record["injected"] if d.startswith("checkpoints/")}
        gone = sorted(n for n in damaged if not (run / "checkpoints" / n).is_dir())
        if gone:
            record["notes"].append(f"damaged checkpoint(s) deleted, not kept for the operator: {gone}")


def _recover(fault: Fault, model: Model, run: Path, env: dict, cache: Path, log: Path, mounts: h.Mounts,
             record: dict) -> dict:
    """Repair what the fault did to the file system, rerun the same command, and compare."""
    fixed = h.repair(fault.action, run, mounts)
    if fixed:
        record["notes"].append(f"repair: {fixed}")
    (run / "summary.json").unlink(missing_ok=True)
    rc, summary = _ended(h.launch(run, model.args, env, log), model, run, cache, record)
    after = h.verified(run)
    newest = max(after, key=checkpoint_order) if after else None
    if rc == 0 and (newest is None or not after[newest]):
        record["lost"].append(f"after the rerun the newest checkpoint {newest} does not verify")
    return {"recovery_rc": rc, "recovery_diff": tuple(differences(summary, model.summary))
            if summary is not None else None}


def _serve(fault: Fault, model: Model, run: Path, obs: dict) -> Observation:
    """``pipeline.predict`` on the damaged artifact, its metrics (if any) against the reference artifact's."""
    rc, out, metrics = h.predict(run / fault.serve, model.test_file(), model.work / "logs" / f"{fault.name}.log")
    diff = tuple(differences(metrics, model.predicted[fault.serve])) if metrics is not None else None
    return Observation(rc=rc, errors=h.error_lines(out), traceback=h.has_traceback(out, workers_only=False),
                       diff=diff, damaged=True, **obs)


def _judged(fault: Fault, record: dict, obs: Observation, t0: float) -> dict:
    outcome = classify(obs)
    record.update(outcome=outcome.name, outcome_text=outcome.value, as_expected=as_expected(fault.expect, outcome)
                  and not any("deleted, not kept" in n for n in record["notes"]),
                  silently_wrong=silently_wrong(outcome, obs), seconds=time.time() - t0,
                  observed={"rc": obs.rc, "errors": list(obs.errors), "traceback": obs.traceback,
                            "fell_back": obs.fell_back, "diff": list(obs.diff or [])[:12],
                            "recovery_rc": obs.recovery_rc, "recovery_diff": list(obs.recovery_diff or [])[:12]})
    return record


def _summary(run: Path, model: Model, cache: Path) -> dict | None:
    try:
        return comparable(json.loads((run / "summary.json").read_text()), model.places(run, cache))
    except (OSError, ValueError):
        return None


def _artifact_lost(run: Path, model: Model, logs: Path, name: str) -> list[str]:
    """The finished artifact of a run rerun for a fault: it must still serve the reference's numbers (or a whole
    new one in its place)."""
    lost = []
    for file, want in model.predicted.items():
        rc, out, metrics = h.predict(run / file, model.test_file(), logs / f"{name}_artifact_{file}.log")
        if rc != 0 or metrics != want:
            lost.append(f"artifact {file}: predict exit {rc}, {h.error_lines(out)[:1] or out[-300:]}")
    return lost


def _line(r: dict) -> str:
    ok = "as expected" if r.get("as_expected") else "NOT AS EXPECTED"
    bad = " LOST" if r.get("lost") else ""
    bad += " SILENTLY WRONG" if r.get("silently_wrong") else ""
    return f"  {r['fault']}: {r.get('outcome', '?')} ({ok}{bad}) in {r.get('seconds', 0):.0f} s; " \
           f"{'; '.join(map(str, r.get('injected', [])))[:200]}"


def table_text(records: list[dict]) -> str:
    cols = ("fault", "phase", "action", "expected", "outcome", "as expected", "lost/wrong")
    rows = [(r["fault"], r["phase"], r["action"], r["expected"], r.get("outcome", "?"),
             "yes" if r.get("as_expected") else "NO",
             ("lost" if r.get("lost") else "") + (" wrong" if r.get("silently_wrong") else "") or "-")
            for r in records]
    widths = [max(len(c), *(len(x[i]) for x in rows)) for i, c in enumerate(cols)] if rows else [len(c) for c in cols]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*cols), "-" * (sum(widths) + 2 * len(widths) - 2), *(fmt.format(*x) for x in rows)])


def details_text(records: list[dict]) -> str:
    lines = []
    for r in records:
        if r.get("as_expected") and not r.get("lost") and not r.get("silently_wrong"):
            continue
        o = r.get("observed", {})
        lines += [f"{r['fault']} ({r['phase']}; {r['action']}; seed {r['seed']}; start {r['start']}):",
                  f"  expected {r['expected']}, got {r.get('outcome')}: {r.get('outcome_text', '')}",
                  f"  injected: {'; '.join(map(str, r.get('injected', [])))}",
                  f"  exit {o.get('rc')}, traceback {o.get('traceback')}, rerun exit {o.get('recovery_rc')}"]
        lines += [f"  error line: {e}" for e in o.get("errors", [])[:3]]
        lines += [f"  differs: {d}" for d in (o.get("diff") or o.get("recovery_diff") or [])[:6]]
        lines += [f"  lost: {x}" for x in r.get("lost", [])]
        lines += [f"  note: {n}" for n in r.get("notes", [])]
        lines.append(f"  reproduce: .venv/bin/python -m bench.faults --only {r['fault']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated fault names (default: all but --terabyte's)")
    p.add_argument("--quick", action="store_true", help=f"a smoke subset: {', '.join(QUICK)}")
    p.add_argument("--list", action="store_true", help="list the faults with their expected outcomes and exit")
    p.add_argument("--terabyte", action="store_true", help="also the terabyte_synthetic faults (~15 GB memory)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new /tmp/dqrm_faults-*)")
    p.add_argument("--keep", action="store_true", help="keep each fault's run dir (default: only its logs)")
    add_out_argument(p, restricted_default=True)
    args = p.parse_args(argv)
    chosen = by_name([n for n in args.only.split(",") if n] or (list(QUICK) if args.quick else []),
                     terabyte=args.terabyte)
    if args.list:
        for f in chosen if (args.only or args.quick or args.terabyte) else FAULTS:
            print(f"{f.name:<28} {f.phase.name:<15} {f.start.name:<11} {f.action.describe():<58} "
                  f"{f.expect.name}{' (--terabyte)' if f.terabyte else ''}")
        return 0
    if os.geteuid() != 0:
        print("error: the campaign mounts tmpfs and read-only binds: run it as root", file=sys.stderr)
        return 2
    restricted = [x for x in (args.only and f"--only {args.only}", args.quick and "--quick") if x]
    out = result_dir(args.out, restricted)
    prov = provenance(RUN_DEPENDS)
    work = args.work or Path(f"/tmp/dqrm_faults-{time.strftime('%Y%m%d-%H%M%S')}")
    work.mkdir(parents=True, exist_ok=True)
    say = Report()
    say(f"fault campaign: {len(chosen)} fault(s), work dir {work}")
    t0 = time.time()
    records: list[dict] = []
    skipped: list[str] = []
    models: dict[bool, Model] = {}
    starts: dict[bool, dict[Start, Path]] = {}
    for tb in sorted({f.terabyte for f in chosen}):
        m = Model(work / ("terabyte" if tb else "default"), TERABYTE_JOB if tb else DEFAULT_JOB,
                  TB_TIMEOUT if tb else JOB_TIMEOUT)
        models[tb] = m
        finished = m.reference(say)
        starts[tb] = {}
        if any(f.start is Start.FINISHED and f.terabyte == tb for f in chosen):
            starts[tb][Start.FINISHED] = snapshot(finished, m.work / "snapshots")
        if any(f.start is Start.INTERRUPTED and f.terabyte == tb for f in chosen):
            starts[tb][Start.INTERRUPTED] = m.interrupted(say)
    for f in chosen:
        records.append(run_fault(f, models[f.terabyte], starts[f.terabyte], say, keep=args.keep))
    wall = time.time() - t0
    unexpected = [r for r in records if not r.get("as_expected")]
    bad = [r for r in records if r.get("lost") or r.get("silently_wrong")]
    if not args.terabyte and not args.only:
        skipped.append("terabyte_synthetic faults not run (pass --terabyte: ~15 GB of memory for the two ranks, "
                       "three 12.6 GB checkpoints on disk, ~30 min)")
    text = [f"{len(records)} faults in {wall / 60:.1f} min; {len(records) - len(unexpected)} as expected, "
            f"{len(unexpected)} not; {len(bad)} with something lost or silently wrong (goal: 0 and 0)", "",
            f"job: python -m dqrm.pipeline.launch --run-dir RUN --nproc 2 -- {' '.join(DEFAULT_JOB)}",
            f"compared: summary.json without {', '.join(sorted(TIMING_KEYS))}, run and data paths masked",
            "", table_text(records)]
    detail = details_text(records)
    if detail:
        text += ["", "not as expected, lost or silently wrong:", detail]
    text += [f"not run: {s}" for s in skipped]
    report = "\n".join(text)
    say("")
    say(report)
    payload = {**prov, "wall_seconds": wall, "work_dir": str(work), "job_args": list(DEFAULT_JOB),
               "terabyte_job_args": list(TERABYTE_JOB), "faults": records, "not_run": skipped,
               "counts": {"faults": len(records), "as_expected": len(records) - len(unexpected),
                          "lost_or_silently_wrong": len(bad)},
               "expected_outcomes": {e.name: e.value for e in Expect},
               "reference": {str(tb): {"phase_seconds": m.ref.seconds, "checkpoint_bytes": m.ref.checkpoint_bytes,
                                       "rows_bytes": m.ref.rows_bytes} for tb, m in models.items()}}
    print(f"json: {save('faults', payload, report, out=out, used=RUN_DEPENDS)}")
    return 0 if not bad and not unexpected else 1


if __name__ == "__main__":
    sys.exit(main())

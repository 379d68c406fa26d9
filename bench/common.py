"""Shared bits of the benchmarks: spawning ranks, medians, printing a table, and saving results with what produced
them (commit, command, machine)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parents[1]


def random_batches(cards, batch: int, n: int, seed: int = 0) -> list:
    """``n`` single-hot DLRM batches with ids uniform in each table (the same for every variant of a benchmark)."""
    from torchrec.datasets.utils import Batch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from dqrm.datasets.schema import FEATURE_NAMES

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        values = torch.cat([torch.randint(0, c, (batch,), generator=g) for c in cards])
        kjt = KeyedJaggedTensor.from_lengths_sync(FEATURE_NAMES, values, torch.ones(26 * batch, dtype=torch.int32))
        out.append(Batch(torch.rand(batch, 13, generator=g), kjt, (torch.rand(batch, generator=g) < 0.25).float()))
    return out


def cpu_seconds(fn, reps: int) -> tuple[float, object]:
    """Median CPU seconds (``time.process_time``) of ``fn()`` over ``reps`` runs after one warm run, and the last
    run's result."""
    import time

    out = fn()
    times = []
    for _ in range(reps):
        t = time.process_time()
        out = fn()
        times.append(time.process_time() - t)
    return sorted(times)[reps // 2], out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def optimizer_name(optim) -> str:
    """The optimizer a step figure uses, from the job's ``OptimConfig``: e.g. ``dense sgd lr 0.1, tables sgd lr 1.0
    (fused into the embedding kernels)``."""
    return (f"dense {optim.dense} lr {optim.lr}, tables {optim.embedding} lr {optim.embedding_lr} (fused into the "
            f"embedding kernels)")


def paired_ratio(xs: list[float], base: list[float], draws: int = 2000) -> dict:
    """Median of the ratios ``xs[i] / base[i]`` of measurements taken side by side, its quartiles, and a 95% interval
    of the median from resampling the pairs (percentile bootstrap)."""
    ratios = torch.tensor([x / b for x, b in zip(xs, base)], dtype=torch.float64)
    q1, q3 = (float(ratios.quantile(q)) for q in (0.25, 0.75))
    picks = torch.randint(len(ratios), (draws, len(ratios)), generator=torch.Generator().manual_seed(0))
    medians = ratios[picks].median(dim=1).values
    return {"median": statistics.median(ratios.tolist()), "q1": q1, "q3": q3,
            "ci95": (float(medians.quantile(0.025)), float(medians.quantile(0.975)))}


def machine() -> dict:
    """Where a result was measured. ``cores``: physical cores (distinct socket and core ids in /proc/cpuinfo);
    ``logical_cpus``: what the OS counts (hardware threads); ``usable_cpus``: those this process may run on;
    ``torch_threads``: torch's intra-op threads in this process (children may set their own, e.g. 1 per rank);
    ``load_average``: the OS's 1-minute load average when the result was saved (above the logical CPUs, other
    work shared the machine: timings are slower and noisier than on an idle one)."""
    info = _cpuinfo()
    cores = len({(c.get("physical id"), c.get("core id")) for c in info if "core id" in c}) or None
    out = {"cpu_model": info[0].get("model name") if info else platform.processor() or None, "cores": cores,
           "logical_cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
           "torch_threads": torch.get_num_threads(), "cgroup_cpu_limit": _cgroup_cpus(),
           "memory_gb": _meminfo_gb(), "platform": platform.platform(), "python": platform.python_version(),
           "torch": torch.__version__, "load_average": round(os.getloadavg()[0], 2)}
    if torch.cuda.is_available():
        out["cuda_device"] = torch.cuda.get_device_name()
    return out


def describe_machine(m: dict) -> str:
    """One line for a result's text: ``AMD EPYC, 2 cores / 2 logical CPUs, 25 GB; torch 2.13.0 with 2 intra-op
    threads``."""
    usable = f" ({m['usable_cpus']} usable)" if m["usable_cpus"] != m["logical_cpus"] else ""
    limit = f", cgroup limit {m['cgroup_cpu_limit']:g} CPUs" if m.get("cgroup_cpu_limit") else ""
    gpu = f", {m['cuda_device']}" if m.get("cuda_device") else ""
    return (f"{m['cpu_model']}, {m['cores']} cores / {m['logical_cpus']} logical CPUs{usable}{limit}, "
            f"{m['memory_gb']:.0f} GB{gpu}; torch {m['torch']} with {m['torch_threads']} intra-op threads"
            + (f"; load average {m['load_average']:g} when saved" if "load_average" in m else ""))


def _cpuinfo() -> list[dict]:
    try:
        blocks = Path("/proc/cpuinfo").read_text().strip().split("\n\n")
    except OSError:
        return []
    return [{k.strip(): v.strip() for k, _, v in (line.partition(":") for line in b.splitlines())} for b in blocks]


def _cgroup_cpus() -> float | None:
    """The CPU quota of this process's cgroup (v2 ``cpu.max``) in CPUs, or None without one."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _meminfo_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return None


def provenance(used: tuple[str, ...] = ()) -> dict:
    """The code and command behind a result: ``git rev-parse HEAD``, whether the work tree had changes (and which
    paths; other work in the tree shows here too), whether any repository file the bench ran from had
    (``used_dirty``: the files this process imported, and ``used``, files or folders of code that runs in child
    processes), and the command line as typed from the repository root."""
    try:
        changed = git_changes()
        commit = git("rev-parse", "HEAD").strip()
    except (OSError, subprocess.CalledProcessError):  # a copy of the tree without git (a device machine)
        changed = []
        commit = os.environ.get("DQRM_GIT_COMMIT", "unknown: no git repository and no DQRM_GIT_COMMIT")
    imported = [Path(m.__file__) for m in list(sys.modules.values()) if getattr(m, "__file__", None)]
    files = set(used) | {str(f.relative_to(ROOT)) for f in imported
                         if f.is_absolute() and f.is_relative_to(ROOT) and ".venv" not in f.parts}
    exe = Path(sys.executable)
    exe = exe.relative_to(ROOT) if exe.is_relative_to(ROOT) else exe
    module = sys.modules["__main__"].__spec__
    argv = [str(exe), "-m", module.name] if module is not None else [str(exe), sys.argv[0]]
    folders = tuple(u.rstrip("/") + "/" for u in used)
    used_changed = sorted(path for path in changed if path in files or path.startswith(folders))
    return {"commit": commit, "dirty": bool(changed), "dirty_paths": changed, "used_dirty": bool(used_changed),
            "used_dirty_paths": used_changed, "command": shlex.join(argv + sys.argv[1:])}


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, check=True).stdout


def git_changes(*paths: str) -> list[str]:
    """Paths (under ``paths``, or anywhere) that differ from HEAD: modified, staged, deleted or untracked."""
    out = git("status", "--porcelain", "--untracked-files=all", *(["--", *paths] if paths else []))
    return [line[3:] for line in out.splitlines()]


def add_out_argument(p: argparse.ArgumentParser, *, restricted_default: bool = False) -> None:
    """``--out``: where the result files go. With ``restricted_default`` the default depends on the run (see
    ``result_dir``)."""
    if restricted_default:
        p.add_argument("--out", type=Path, default=None,
                       help=f"folder for the result files (default: bench/results for a full run, {SCRATCH} for a "
                            f"run restricted by the options below, so that a smoke test never replaces a committed "
                            f"result)")
    else:
        p.add_argument("--out", type=Path, default=RESULTS,
                       help="folder for the result files (default: bench/results; point a smoke test elsewhere)")


SCRATCH = Path("/tmp/dqrm_bench")


def result_dir(out: Path | None, restricted: list[str]) -> Path:
    """``out`` if given, else bench/results for a full run and ``SCRATCH`` for one restricted as ``restricted``
    says (e.g. fewer seeds or epochs than the bench's definition)."""
    return out if out is not None else SCRATCH if restricted else RESULTS


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max of repeated measurements (e.g. seeds)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values), "values": list(values)}


def format_spread(s: dict, fmt: str = ".2f", scale: float = 1.0) -> str:
    """``81.20 ±0.15 [80.98, 81.35]``: mean ± sample std [min, max]."""
    f = lambda x, spec=fmt: format(scale * x, spec)  # noqa: E731
    return f"{f(s['mean'])} ±{f(s['std'], fmt.lstrip('+'))} [{f(s['min'])}, {f(s['max'])}]"


def save(name: str, payload: dict, text: str | None = None, *, out: Path = RESULTS,
         used: tuple[str, ...] = ()) -> Path:
    """Write ``out/NAME.json`` (``payload`` with the provenance and the machine) and, given ``text`` (the report as
    printed, never captured output: library warnings go to stderr and stay out), ``out/NAME.txt`` headed by the
    command, commit and machine. ``used``: files or folders the bench's child processes run (see ``provenance``).
    Keys of ``payload`` win: a bench that took its provenance at the start passes it in."""
    record = {**provenance(used), "machine": machine(), **payload}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(record, indent=2))
    if text is not None:
        (out / f"{name}.txt").write_text(header(record) + "\n\n" + text.rstrip("\n") + "\n")
    return path


def header(record: dict) -> str:
    """The first lines of a result's text: command, commit (and whether the tree or the files used differed from
    it), machine."""
    if record["used_dirty"]:
        used = record.get("used_dirty_paths") or record["dirty_paths"]
        state = f" (files this bench ran from differ from it: {', '.join(used[:6])}{' ...' if len(used) > 6 else ''})"
    elif record["dirty"]:
        state = " (other files in the tree differ from it)"
    else:
        state = " (clean tree)"
    return (f"command: {record['command']}\ncommit: {record['commit']}{state}\n"
            f"machine: {describe_machine(record['machine'])}")


class Report:
    """Lines printed as they come and kept for the result's text (``save(..., report.text)``), so that the text file
    holds what the bench printed and nothing a library wrote to the console."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: object = "") -> None:
        self.lines.append(str(line))
        print(line, flush=True)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """``columns``: (key, header, format)."""
    head = "  ".join(f"{h:>{max(len(h), 10)}}" for _, h, _ in columns)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append("  ".join(f"{format(r[k], f) if not isinstance(r[k], str) else r[k]:>{max(len(h), 10)}}"
                               for k, h, f in columns))
    return "\n".join(lines)


def sharded_model(model_cfg, optim_cfg):
    """A DLRM of ``model_cfg`` (seed 0) with its tables' fused optimizer, sharded at world size 1 (a process group
    must exist): what the benches time and convert."""
    import torch.distributed as dist

    from dqrm.pipeline.model import build_dlrm
    from dqrm.pipeline.optimizer import fuse_embedding_optimizer
    from dqrm.sharding.plan import plan_sharding, shard_model

    torch.manual_seed(0)
    model = build_dlrm(model_cfg, torch.device("cpu"))
    fuse_embedding_optimizer(model.model.sparse_arch.parameters(), optim_cfg)
    return shard_model(model, plan_sharding(model, world_size=1, device=torch.device("cpu"), pg=dist.group.WORLD),
                       torch.device("cpu"))


def prepared_model(cfg):
    """The config's DLRM sharded at world size 1 (a process group must exist), prepared for QAT with its scales
    taken from its initial weights: what the export benches convert."""
    import torch.distributed as dist

    from dqrm.quant.api import QATConfig, embedding_quantizer, quantize_

    model = sharded_model(cfg.model, cfg.optim)
    quantize_(model, QATConfig(spec=cfg.quant), pg=dist.group.WORLD)
    embedding_quantizer(model).update_scales()
    return model


def train_step_seconds(model, optimizer, batches) -> float:
    """Mean wall seconds of a training step (forward, backward, optimizer step) over ``batches``."""
    import time

    model.train()
    t0 = time.perf_counter()
    for b in batches:
        loss, _ = model(b)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - t0) / len(batches)

"""Shared bits of the benchmarks: spawning ranks, medians, printing a table and saving JSON."""

from __future__ import annotations

import json
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

    from datasets.schema import FEATURE_NAMES

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        values = torch.cat([torch.randint(0, c, (batch,), generator=g) for c in cards])
        kjt = KeyedJaggedTensor.from_lengths_sync(FEATURE_NAMES, values, torch.ones(26 * batch, dtype=torch.int32))
        out.append(Batch(torch.rand(batch, 13, generator=g), kjt, (torch.rand(batch, generator=g) < 0.25).float()))
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


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
    return {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__}


def provenance(used: tuple[str, ...] = ()) -> dict:
    """The code and command behind a result: ``git rev-parse HEAD``, whether the work tree had changes (and which
    paths; other work in the tree shows here too), whether any repository file the bench ran from had
    (``used_dirty``: the files this process imported, and ``used``, for code that runs in child processes), and the
    command line as typed from the repository root."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, check=True).stdout

    changed = [line[3:] for line in git("status", "--porcelain").splitlines()]
    imported = [Path(m.__file__) for m in list(sys.modules.values()) if getattr(m, "__file__", None)]
    files = set(used) | {str(f.relative_to(ROOT)) for f in imported
                         if f.is_absolute() and f.is_relative_to(ROOT) and ".venv" not in f.parts}
    exe = Path(sys.executable)
    exe = exe.relative_to(ROOT) if exe.is_relative_to(ROOT) else exe
    module = sys.modules["__main__"].__spec__
    argv = [str(exe), "-m", module.name] if module is not None else [str(exe), sys.argv[0]]
    return {"commit": git("rev-parse", "HEAD").strip(), "dirty": bool(changed), "dirty_paths": changed,
            "used_dirty": any(path in files for path in changed), "command": shlex.join(argv + sys.argv[1:])}


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    return path


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """``columns``: (key, header, format)."""
    head = "  ".join(f"{h:>{max(len(h), 10)}}" for _, h, _ in columns)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append("  ".join(f"{format(r[k], f) if not isinstance(r[k], str) else r[k]:>{max(len(h), 10)}}"
                               for k, h, f in columns))
    return "\n".join(lines)


def prepared_model(cfg):
    """The config's DLRM sharded at world size 1 (a process group must exist), prepared for QAT with its scales
    taken from its initial weights: what the export benches convert."""
    import torch.distributed as dist

    from pipeline.model import build_dlrm
    from pipeline.optimizer import fuse_embedding_optimizer
    from quant.api import QATConfig, embedding_quantizer, quantize_
    from sharding.plan import plan_sharding, shard_model

    torch.manual_seed(0)
    model = build_dlrm(cfg.model, torch.device("cpu"))
    fuse_embedding_optimizer(model.model.sparse_arch.parameters(), cfg.optim)
    model = shard_model(model, plan_sharding(model, world_size=1, device=torch.device("cpu"), pg=dist.group.WORLD),
                        torch.device("cpu"))
    quantize_(model, QATConfig(spec=cfg.quant), pg=dist.group.WORLD)
    embedding_quantizer(model).update_scales()
    return model

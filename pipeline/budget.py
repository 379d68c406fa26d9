"""The byte budget's search (``quant.budget_bytes`` / ``quant.budget_ratio``): measure how much validation loss each
table's cheaper options cost, choose the least damaging set that fits (``quant.budget.choose``), and turn the choice
into the job's config (per-table bits, table sizes, the row map the reader applies).

The measurement, collective over the job's ranks, before training:

1. every table's row counts over the training split (the ids a shared row would absorb);
2. the job's sharded model trained ``budget_warmup_steps`` steps with INT8 QAT on every table;
3. the validation loss on ``budget_eval_rows`` rows: once as is, once per table at each fewer bit width (that
   table's bits changed in the fake-quantizer, the others INT8), and once per large table and frequency threshold
   with the ids seen fewer times in training dropped from their bags (a zero vector standing in for the shared row,
   which training will then learn).

A table's damage for (bits, threshold) is the sum of the two losses added. Damages within the measurement's noise
(``noise_floor``) count as zero, and each option also carries the share of training lookups it loses
(``quant.budget.lookups_lost``), so that where the warm-up cannot tell options apart, rows are kept by how often they
are looked up. The search's record (every measurement,
the choice, its bytes and seconds) goes to ``budget.json`` in the run dir, the kept rows to ``row_map.npz``. A
resumed job reads both back instead of searching again.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import itertools
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dqrm.datasets.reader import ParquetBatches, ReaderConfig
from dqrm.datasets.row_map import RowMap, kept_by_count
from dqrm.datasets.schema import FEATURE_NAMES, NUM_DENSE, NUM_SPARSE
from dqrm.pipeline.checkpoint import Checkpointer
from dqrm.pipeline.config import JobConfig, resume_view, to_dict
from dqrm.pipeline.data import build_splits
from dqrm.pipeline.parallelize import build_sharded_model
from dqrm.pipeline.trainer import Trainer
from dqrm.quant.api import embedding_quantizer
from dqrm.quant.budget import (ARTIFACT_OVERHEAD, Option, bit_choices, choose, cost, lookups_lost, mlp_bytes,
                               option_bytes)
from dqrm.sharding.comm import CommConfig

log = logging.getLogger("dqrm")

PLAN_NAME = "budget.json"
ROW_MAP_NAME = "row_map.npz"
MIN_COUNTS = (1, 2, 4, 8, 16, 32, 64)
"""Frequency thresholds tried for a table's shared row: rows seen fewer times in training share it."""
MAP_MIN_ROWS = 1024
"""Smaller tables are always kept whole (their rows cost less than a map's bookkeeping is worth)."""


def mlp_layers(cfg: JobConfig) -> list[tuple[int, int]]:
    """``(in, out)`` of every MLP layer of the job's DLRM (TorchRec's: the over arch reads the dense embedding and
    the pairwise dots of the 27 vectors). DLRM_DCN: the over arch reads the 27 vectors crossed, and each cross
    layer's two kernels count as layers ``(N, r)`` and ``(r, N)`` (its N biases counted as the second's; the
    first's r are 4 r bytes too many)."""
    dense = list(zip((NUM_DENSE, *cfg.model.dense_arch[:-1]), cfg.model.dense_arch))
    f = NUM_SPARSE + 1
    cross = []
    if cfg.model.arch == "dcn":
        n, r = f * cfg.model.embedding_dim, cfg.model.dcn_low_rank_dim
        cross = [(n, r), (r, n)] * cfg.model.dcn_num_layers
        over_in = n
    else:
        over_in = cfg.model.embedding_dim + f * (f - 1) // 2
    over = list(zip((over_in, *cfg.model.over_arch[:-1]), cfg.model.over_arch))
    return dense + cross + over


def fp32_bytes(cfg: JobConfig, id_space: list[int]) -> int:
    """The float model's bytes (tables and MLPs), as ``quant.convert.integer_parts`` counts them."""
    d = cfg.model.embedding_dim
    return sum(n * d * 4 for n in id_space) + mlp_bytes(mlp_layers(cfg), 0)


def request(cfg: JobConfig) -> dict:
    """What a search's result depends on: a saved plan is reused only for the same request."""
    q = cfg.quant
    return {"budget_bytes": q.budget_bytes, "budget_ratio": q.budget_ratio, "warmup_steps": q.budget_warmup_steps,
            "eval_rows": q.budget_eval_rows, "granularity": q.granularity, "mlp_bits": q.mlp_bits,
            "row_alignment": q.row_alignment, "scale_update_every": q.scale_update_every,
            "model": to_dict(cfg.model), "data": {k: v for k, v in to_dict(cfg.data).items() if k != "row_map"},
            "optim": to_dict(cfg.optim), "seed": cfg.seed}


def saved_plan(cfg: JobConfig) -> dict | None:
    """The run dir's plan when it answers this job's request, else ``None``."""
    path = cfg.run_path / PLAN_NAME
    if not path.is_file():
        return None
    try:
        plan = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: unreadable ({e}); delete it to search again") from None
    # compared as a resume compares configs: what a resume may change, and how a path is spelled, do not count
    if resume_view(plan.get("request", {})) != resume_view(request(cfg)):
        return None
    row_map = cfg.run_path / ROW_MAP_NAME
    if plan.get("mapped_tables") and "row_map_sha256" in plan:
        if not row_map.is_file() or _sha256(row_map) != plan["row_map_sha256"]:
            state = "missing" if not row_map.is_file() else "checksum does not match"
            raise ValueError(f"{row_map}: {state} {path.name}'s record (damaged or replaced); the checkpoints here "
                             f"were trained with that map: restore it from a copy of the run dir, or start a new "
                             f"--run-dir")
    return plan


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def apply_plan(cfg: JobConfig, plan: dict) -> JobConfig:
    """The job with the plan's bits, table sizes and row map (a copy; ``cfg`` is not changed)."""
    row_map = str(cfg.run_path / ROW_MAP_NAME) if plan["mapped_tables"] else ""
    return dataclasses.replace(
        cfg, quant=dataclasses.replace(cfg.quant, table_bits=dict(plan["table_bits"])),
        model=dataclasses.replace(cfg.model, num_embeddings=tuple(plan["num_embeddings"])),
        data=dataclasses.replace(cfg.data, row_map=row_map))


def budgeted(cfg: JobConfig, paths: dict[str, list[Path]], rank: int, world_size: int,
             device: torch.device) -> JobConfig:
    """The job under its byte budget: the saved plan's, or a new search's (collective). A config the plan was
    already applied to (``pipeline.cli`` applies a saved one) is returned as it is."""
    if cfg.quant.table_bits:
        return cfg
    plan = saved_plan(cfg)
    if plan is None:
        plan = search(cfg, paths, rank, world_size, device)
    else:
        log.info("byte budget: reusing the choice in %s", cfg.run_path / PLAN_NAME)
    return apply_plan(cfg, plan)


def row_counts(paths: list[Path], id_space: list[int], cfg: JobConfig, rank: int, world_size: int) -> list[np.ndarray]:
    """How often each row of each table is looked up over the training split (every rank counts its slice; summed)."""
    reader = ReaderConfig(batch_size=65536, vocab_dir=cfg.data.vocab_dir or None)
    counts = [np.zeros(n, dtype=np.int64) for n in id_space]
    for batch in ParquetBatches(paths, id_space, reader, rank=rank, world_size=world_size):
        kjt = batch.sparse_features
        for t, values in enumerate(torch.split(kjt.values(), kjt.length_per_key())):
            counts[t] += np.bincount(values.numpy(), minlength=len(counts[t]))
    flat = torch.from_numpy(np.concatenate(counts))
    if world_size > 1:
        dist.all_reduce(flat)
    return list(torch.split(flat, id_space))


def without_rare(batch: Batch, t: int, keep: torch.Tensor) -> Batch:
    """``batch`` with the ids of feature ``t`` whose row is not in ``keep`` (a bool per row) left out of their bags."""
    kjt = batch.sparse_features
    values, lengths = kjt.values(), kjt.lengths()
    per_key = kjt.length_per_key()
    start, b = sum(per_key[:t]), batch.dense_features.shape[0]
    mask = torch.ones_like(values, dtype=torch.bool)
    mask[start:start + per_key[t]] = keep[values[start:start + per_key[t]]]
    bag = torch.repeat_interleave(torch.arange(b), lengths[t * b:(t + 1) * b])
    lengths = lengths.clone()
    lengths[t * b:(t + 1) * b] = torch.bincount(bag[mask[start:start + per_key[t]]], minlength=b).to(lengths.dtype)
    return Batch(dense_features=batch.dense_features,
                 sparse_features=KeyedJaggedTensor(keys=kjt.keys(), values=values[mask], lengths=lengths),
                 labels=batch.labels)


class _Probe:
    """The warmed-up INT8 model and the validation rows it is scored on."""

    def __init__(self, trainer: Trainer, batches: list[Batch], device: torch.device) -> None:
        self.trainer, self.batches, self.device = trainer, batches, device
        self.evaluations = 0

    @torch.no_grad()
    def loss(self, t: int | None = None, keep: torch.Tensor | None = None) -> float:
        """Mean validation log loss over every rank's rows (feature ``t``'s rare ids dropped, given ``keep``)."""
        model = self.trainer.pipeline.detach()
        model.eval()
        total = torch.zeros(2, dtype=torch.float64)
        for batch in self.batches:
            if keep is not None:
                batch = without_rare(batch, t, keep)
            _, (_, logits, labels) = model(batch.to(self.device))
            total[0] += F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="sum").item()
            total[1] += labels.numel()
        if dist.is_initialized():
            dist.all_reduce(total)
        model.train()
        self.trainer.pipeline.attach(model)
        self.evaluations += 1
        return float(total[0] / total[1])


def search(cfg: JobConfig, paths: dict[str, list[Path]], rank: int, world_size: int, device: torch.device) -> dict:
    """Measure, choose, and (rank 0) write ``budget.json`` and ``row_map.npz``; returns the plan on every rank."""
    if cfg.quant_mode == "fp32":
        raise ValueError("a byte budget chooses integer bit widths: use quant_mode qat or ptq, not fp32")
    t0 = time.perf_counter()
    q, d = cfg.quant, cfg.model.embedding_dim
    id_space = list(cfg.model.num_embeddings)
    fp32 = fp32_bytes(cfg, id_space)
    budget = q.budget_bytes or int(q.budget_ratio * fp32)
    fixed = mlp_bytes(mlp_layers(cfg), q.mlp_bits) + ARTIFACT_OVERHEAD
    log.info("byte budget: %s bytes (%.1f MB, 1/%.1f of FP32's %.1f MB); counting rows, then %d warm-up steps",
             f"{budget:,}", budget / 1e6, fp32 / budget, fp32 / 1e6, q.budget_warmup_steps)
    if budget <= fixed:
        raise ValueError(f"a byte budget of {budget:,} leaves nothing for the tables: the MLPs and the artifact's "
                         f"file take {fixed:,}; raise quant.budget_bytes / quant.budget_ratio")
    counts = row_counts(paths["train"], id_space, cfg, rank, world_size)

    probe_dir = cfg.run_path / "budget_probe"
    probe_dir.mkdir(parents=True, exist_ok=True)
    probe_cfg = dataclasses.replace(
        cfg, quant_mode="qat", run_dir=str(probe_dir), comm=CommConfig(count_bytes=False),
        quant=dataclasses.replace(q, embedding_bits=8, table_bits={}, budget_bytes=0, budget_ratio=0.0),
        data=dataclasses.replace(cfg.data, row_map=""))
    splits = build_splits(probe_cfg, paths, rank, world_size)
    model, optimizer, _, _ = build_sharded_model(probe_cfg, rank, world_size, device)
    trainer = Trainer(probe_cfg, model, optimizer, device, splits, Checkpointer(probe_dir / "checkpoints"), rank=rank)
    model.train()
    batches = itertools.chain.from_iterable(_epochs(splits.train))
    for _ in range(q.budget_warmup_steps):
        trainer.train_step(batches)
    eval_batches = -(-q.budget_eval_rows // (world_size * cfg.data.eval_batch_size))
    probe = _Probe(trainer, list(itertools.islice(iter(splits.val), eval_batches)), device)
    quantizer = embedding_quantizer(model)
    quantizer.update_scales()
    base = probe.loss()
    t_warm = time.perf_counter() - t0

    bits_damage: dict[str, dict[int, float]] = {}
    keep_damage: dict[str, dict[int, tuple[int, float]]] = {}
    for t, name in enumerate(FEATURE_NAMES):
        table = f"t_{name}"
        g = quantizer.table_names.index(table)
        bits_damage[table] = {8: 0.0}
        for b in bit_choices(d):
            if b != 8:
                quantizer.table_bits[g] = b
                bits_damage[table][b] = probe.loss() - base
                quantizer.table_bits[g] = 8
        keep_damage[table] = {}
        if id_space[t] < MAP_MIN_ROWS:
            continue
        seen = set()
        for c in MIN_COUNTS:
            keep = counts[t] >= c
            kept = int(keep.sum())
            if kept >= id_space[t] or kept in seen:
                continue
            seen.add(kept)
            keep_damage[table][c] = (kept, probe.loss(t, keep) - base)
    evaluations = probe.evaluations
    del probe, trainer, model, optimizer, splits, quantizer
    gc.collect()

    options = []
    lookups = sum(int(c.sum()) for c in counts)
    for t, name in enumerate(FEATURE_NAMES):
        table, n, ct = f"t_{name}", id_space[t], counts[t].numpy()
        opts = []
        for b, db in bits_damage[table].items():
            opts.append(Option(b, 0, n, option_bytes(n, None, d, b, q.row_alignment), db,
                               lookups_lost(ct, lookups, b, 0)))
            for c, (kept, dk) in keep_damage[table].items():
                opts.append(Option(b, c, kept + 1, option_bytes(n, kept, d, b, q.row_alignment), db + dk,
                                   lookups_lost(ct, lookups, b, c)))
        options.append(opts)
    noise = noise_floor(bits_damage, keep_damage)
    chosen = choose(options, budget - fixed, noise)
    tables = []
    for t, (name, o) in enumerate(zip(FEATURE_NAMES, chosen)):
        merged = float(counts[t][counts[t] < o.min_count].sum() / max(int(counts[t].sum()), 1)) if o.min_count else 0.0
        tables.append({"table": f"t_{name}", "rows": id_space[t], "kept_rows": o.rows, "dim": d, "bits": o.bits,
                       "min_count": o.min_count, "bytes": o.bytes, "sensitivity": o.damage, "prior": o.prior,
                       "cost": cost(o, noise), "merged_lookup_share": merged})
    plan = {"request": json.loads(json.dumps(request(cfg))), "budget_bytes": budget, "fp32_bytes": fp32,
            "fixed_bytes": fixed, "predicted_bytes": fixed + sum(o.bytes for o in chosen),
            "baseline_val_logloss": base, "noise_floor": noise, "warmup_seconds": t_warm, "evaluations": evaluations,
            "search_seconds": time.perf_counter() - t0, "tables": tables,
            "table_bits": {r["table"]: r["bits"] for r in tables},
            "num_embeddings": [r["kept_rows"] for r in tables],
            "mapped_tables": [r["table"] for r in tables if r["min_count"]],
            "damage": {"bits": bits_damage, "min_count": {k: {c: list(v) for c, v in m.items()}
                                                          for k, m in keep_damage.items()}}}
    if rank == 0:
        kept = tuple(kept_by_count(counts[t].numpy(), r["min_count"]) if r["min_count"] else None
                     for t, r in enumerate(tables))
        RowMap(tuple(id_space), kept).save(cfg.run_path / ROW_MAP_NAME)
        if plan["mapped_tables"]:  # a resume trains and serves with this map: it is checked against this
            plan["row_map_sha256"] = _sha256(cfg.run_path / ROW_MAP_NAME)
        tmp = cfg.run_path / f".{PLAN_NAME}.tmp"  # written whole or not at all: a killed write leaves no half plan
        tmp.write_text(json.dumps(plan, indent=2))
        tmp.replace(cfg.run_path / PLAN_NAME)
        log.info("byte budget: chose in %.1f s (%d evaluations after %.1f s of counting and warm-up); %.1f MB "
                 "predicted of %.1f MB:\n%s", plan["search_seconds"], evaluations, t_warm,
                 plan["predicted_bytes"] / 1e6, budget / 1e6, choice_table(tables))
    if dist.is_initialized():
        dist.barrier()
    return plan


def noise_floor(bits_damage: dict, keep_damage: dict) -> float:
    """The measurement's noise: the largest loss decrease any cheaper option measured (coarser codes or fewer rows
    do not make a model better; a decrease this large is the eval rows' chance, and increases within it are too)."""
    measured = [v for m in bits_damage.values() for v in m.values()]
    measured += [v for m in keep_damage.values() for _, v in m.values()]
    return max(0.0, -min(measured, default=0.0))


def budget_summary(cfg: JobConfig, exported: dict | None) -> dict | None:
    """The run summary's record of the budget: the choice, and whether the artifact as written fits it."""
    if not cfg.quant.has_budget:
        return None
    plan = json.loads((cfg.run_path / PLAN_NAME).read_text())
    out = {k: plan[k] for k in ("budget_bytes", "fp32_bytes", "predicted_bytes", "search_seconds", "warmup_seconds",
                                "evaluations", "tables")}
    if exported is not None:
        out["artifact_bytes"] = exported["sizes"]["artifact_bytes"]
        out["fits"] = out["artifact_bytes"] <= plan["budget_bytes"]
        if not out["fits"]:
            log.warning("byte budget: the artifact takes %s bytes, over the budget of %s (predicted %s)",
                        f"{out['artifact_bytes']:,}", f"{plan['budget_bytes']:,}", f"{plan['predicted_bytes']:,}")
    return out


def _epochs(data: ParquetBatches):
    for epoch in itertools.count():
        data.set_epoch(epoch)
        yield iter(data)


def choice_table(tables: list[dict]) -> str:
    head = (f"{'table':<10} {'rows':>10} {'kept':>10} {'dim':>4} {'bits':>4} {'MB':>8} {'sensitivity':>12} "
            f"{'prior':>9} {'merged':>7}")
    lines = [head, "-" * len(head)]
    for r in tables:
        lines.append(f"{r['table']:<10} {r['rows']:>10,} {r['kept_rows']:>10,} {r['dim']:>4} {r['bits']:>4} "
                     f"{r['bytes'] / 1e6:>8.3f} {r['sensitivity']:>12.2e} {r['prior']:>9.2e} "
                     f"{100 * r['merged_lookup_share']:>6.2f}%")
    return "\n".join(lines)

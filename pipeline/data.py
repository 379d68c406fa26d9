"""The job's data: where the train/val/test Parquet files are (or the bundled synthetic data, made once) and each
rank's reader of every split."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch.distributed as dist

from dqrm.datasets.reader import ParquetBatches
from dqrm.datasets.schema import parquet_files
from dqrm.datasets.synthetic import ensure_synthetic
from dqrm.pipeline.config import JobConfig
from dqrm.pipeline.trainer import Splits

log = logging.getLogger("dqrm")


def resolve_data(cfg: JobConfig, rank: int) -> tuple[dict[str, list[Path]], dict | None]:
    """Paths of the train/val/test Parquet files (``SPLIT.parquet`` or every file below ``SPLIT/``, see
    ``datasets.schema.parquet_files``); generates the synthetic default once (rank 0) if needed."""
    if not cfg.data.data_dir:
        if rank == 0:
            ensure_synthetic(cfg.data.synthetic)
        if dist.is_initialized():
            dist.barrier()
        root = ensure_synthetic(cfg.data.synthetic)
        meta = json.loads((root / "meta.json").read_text())
        return {s: [root / f"{s}.parquet"] for s in ("train", "val", "test")}, meta["splits"]["test"]["bayes"]
    root = Path(cfg.data.data_dir)
    return {split: parquet_files(root, split) for split in ("train", "val", "test")}, None


def build_splits(cfg: JobConfig, paths: dict[str, list[Path]], rank: int, world_size: int) -> Splits:
    """This rank's reader of each split; the rows left over so that every rank runs the same batches are logged."""
    splits = Splits(**{
        s: ParquetBatches(paths[s], cfg.model.num_embeddings, cfg.data.reader(train=s == "train", seed=cfg.seed),
                          rank=rank, world_size=world_size)
        for s in ("train", "val", "test")})
    for s in ("train", "val", "test"):
        d = getattr(splits, s)
        if d.rows_unused:
            log.warning("%s: %d of %d rows unused so that all %d ranks run the same number of batches",
                        s, d.rows_unused, d.total_rows, world_size)
    return splits

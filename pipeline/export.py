"""The job's export stage: every rank's integer rows streamed into the artifact's rows file, then (rank 0, after the
float model is freed) the serving module and its torch.export program beside them, each reloaded as a server would
and scored on the test split."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import shutil
from pathlib import Path

import torch

from dqrm.datasets.reader import ParquetBatches
from dqrm.datasets.schema import FEATURE_NAMES, NUM_DENSE
from dqrm.pipeline.config import JobConfig
from dqrm.pipeline.metrics import binary_metrics
from dqrm.pipeline.phases import PhaseLog
from dqrm.pipeline.trainer import Trainer, post_training_quantized
from dqrm.quant.export import artifact_sizes, export, load_with_manifest, loaded_bytes, rows_path
from dqrm.quant.integer_model import convert_model
from dqrm.quant.program import program_path

log = logging.getLogger("dqrm")


def artifact_path(cfg: JobConfig) -> Path:
    return cfg.run_path / f"model_int{cfg.quant.embedding_bits}.pt"


def row_map_path(path: Path) -> Path:
    """The artifact's copy of the row map its model was trained with (``datasets.row_map``), beside it."""
    return Path(path).with_suffix(".rowmap.npz")


def write_integer_rows(cfg: JobConfig, trainer: Trainer, model):
    """The fake-quantized model's test logits (the reference the artifact must reproduce), then every rank's
    integer rows streamed into the artifact's rows file (shard-local: no rank holds another's float rows), by
    ``quant.integer_model.convert_model`` for DLRM and DLRM_DCN alike. Collective; returns (logits, the integer
    model with its rows in the file) on rank 0, (logits, None) elsewhere."""
    ptq = post_training_quantized(model) if cfg.quant_mode == "ptq" else contextlib.nullcontext()
    path = artifact_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    with ptq:
        ref_logits, _ = trainer.predict("test")
        parts = convert_model(model, cfg.quant, rows_file=rows_path(path))
    return ref_logits, parts


def finish_export(cfg: JobConfig, parts, ref_logits: torch.Tensor, test_paths: list[Path], world_size: int,
                  phases: PhaseLog) -> dict:
    """Rank 0, after the float model is freed: the serving module beside the rows, reloaded as a server would and
    scored on the test split, its logits checked against the fake-quantized model's."""
    path = artifact_path(cfg)
    manifest = {"config": cfg.name, "arch": cfg.model.arch, "quant_mode": cfg.quant_mode, "quant": dataclasses.asdict(cfg.quant),
                "num_embeddings": list(cfg.model.num_embeddings), "embedding_dim": cfg.model.embedding_dim,
                "dense_features": NUM_DENSE, "dense_transform": "log(1 + max(x, 0)), missing -> 0",
                "id_mapping": (f"vocabulary {Path(cfg.data.vocab_dir).resolve()} (index + 1; rare or missing -> 0)"
                               if cfg.data.vocab_dir else "hash % num_embeddings, missing -> empty bag"),
                "vocab_dir": str(Path(cfg.data.vocab_dir).resolve()) if cfg.data.vocab_dir else None,
                "row_map": row_map_path(path).name if cfg.data.row_map else None}
    shipped = (row_map_path(path),) if cfg.data.row_map else ()
    with phases("export_module"):
        if cfg.data.row_map:  # the kept rows of a byte budget ship with the model, hashed in its manifest
            shutil.copyfile(cfg.data.row_map, row_map_path(path))
        program_path(path).unlink(missing_ok=True)  # written again for a DLRM; DLRM_DCN has none (quant.export)
        export(parts, FEATURE_NAMES, path, manifest, shipped=shipped)
    sizes = artifact_sizes(parts, path, shipped)
    del parts
    with phases("artifact_load"):
        module, manifest = load_with_manifest(path)
    with phases("predict"):
        logits, labels = score_like_evaluation(module, cfg, test_paths, world_size)
    sizes["loaded_bytes"] = loaded_bytes(module)
    del module
    program_check = None
    if program_path(path).is_file():
        with phases("program_check"):  # the torch.export program beside it serves the same logits
            program, _ = load_with_manifest(program_path(path))
            program_logits, _ = score_like_evaluation(program, cfg, test_paths, world_size)
            del program
        program_check = {"path": str(program_path(path)), "bytes": program_path(path).stat().st_size,
                         "max_abs_logit_diff_vs_artifact": float((program_logits - logits).abs().max())}
    # the reference a server can check itself against in a fresh process (bench.scale_run does)
    torch.save({"logits": ref_logits, "rows": ref_logits.numel()}, cfg.run_path / "export_check.pt")
    log.info("exported %s + %s (%.1f MB on disk)", path, rows_path(path).name, sizes["artifact_bytes"] / 1e6)
    return {"path": str(path), "test": binary_metrics(logits, labels), "bits": cfg.quant.embedding_bits,
            "granularity": cfg.quant.granularity, "mlp_bits": cfg.quant.mlp_bits,
            "mlp_compute": cfg.quant.mlp_compute, "sizes": sizes,
            "max_abs_logit_diff_vs_fake_quant": float((logits - ref_logits).abs().max()),
            "program": program_check}


@torch.no_grad()
def score_like_evaluation(module, cfg: JobConfig, paths: list[Path], world_size: int):
    """The artifact's logits and labels on exactly the rows evaluation scored, in the order ``Trainer.predict``
    gathers them: each rank's slice of the split, its first ``limit_eval_batches`` batches, rank after rank. (With a
    limit, those are not the split's first rows.)"""
    logits, labels = [], []
    reader = cfg.data.reader(train=False, seed=cfg.seed)
    if cfg.data.row_map:  # the artifact's copy, as a server reads it
        reader = dataclasses.replace(reader, row_map=str(row_map_path(artifact_path(cfg))))
    for r in range(world_size):
        data = ParquetBatches(paths, cfg.model.num_embeddings, reader, rank=r, world_size=world_size)
        for batch in itertools.islice(iter(data), cfg.limit_eval_batches or len(data)):
            kjt = batch.sparse_features
            logits.append(module(batch.dense_features, kjt.values(), kjt.lengths()))
            labels.append(batch.labels)
    return torch.cat(logits), torch.cat(labels)

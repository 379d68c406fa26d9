"""Entry point of a training job: ``python -m pipeline.train --config NAME [overrides]`` (one process per rank)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import itertools
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from datasets.reader import ParquetBatches
from datasets.schema import FEATURE_NAMES, NUM_DENSE, parquet_files
from datasets.synthetic import ensure_synthetic
from datasets.vocab import vocab_num_embeddings
from pipeline.checkpoint import Checkpointer, NotEnoughDiskSpace
from pipeline.config import JobConfig, apply_override, describe_fields, to_dict, validate
from pipeline.configs import CONFIGS, get_config
from pipeline.quiet import quiet_library_noise
from pipeline.model import build_dlrm
from pipeline.metrics import binary_metrics
from pipeline.optimizer import build_optimizer, fuse_embedding_optimizer
from pipeline.phases import PhaseLog
from pipeline.report import epoch_table, plot_curves, write_summary
from pipeline.trainer import NonFiniteLossError, Splits, Trainer, post_training_quantized
from quant.api import QATConfig, quantize_, set_fake_quant
from quant.export import artifact_sizes, export, load_with_manifest, loaded_bytes, rows_path, write_rows
from sharding.byte_counter import ByteCounter
from sharding.comm import check_qcomms, compress_gradients, sharders_for
from sharding.ddp_hooks import Int8ErrorFeedbackHook
from sharding.plan import describe_plan, plan_table, save_plan, shard_model
from sharding.policy import placements_from_plan, plan_by_policy, save_placements

log = logging.getLogger("dqrm")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.train",
        description="Train a TorchRec DLRM on Criteo-shaped Parquet data. Run one process per rank "
                    "(torchrun / `torchx run`); without a launcher it runs at world size 1.",
    )
    p.add_argument("--config", default="default", choices=sorted(CONFIGS), help="named experiment (default: default)")
    p.add_argument("--run-dir", help="where logs, checkpoints and the summary go (resumed if it has checkpoints)")
    p.add_argument("--data-dir", help="folder with train/val/test Parquet; omit for the bundled synthetic data")
    p.add_argument("--epochs", type=int, help="passes over the training split (default: the config's)")
    p.add_argument("--batch-size", type=int, help="training rows per batch per rank (default: the config's)")
    p.add_argument("--lr", type=float, help="one learning rate for both the MLP and the embedding SGD (default: the "
                                            "config's optim.lr and optim.embedding_lr, which may differ)")
    p.add_argument("--limit-train-batches", type=int, help="stop each epoch after N batches (smoke tests)")
    p.add_argument("--limit-eval-batches", type=int, help="evaluate on at most N batches per rank")
    p.add_argument("--fields", action="store_true",
                   help="print every config field --set accepts, with its value in the chosen config (after the "
                        "other flags) and what it means, then exit")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="FIELD=VALUE",
                   help="override config fields, e.g. --set quant.embedding_bits=8 comm.dense=int8_ef "
                        "plan.overrides=t_cat_3:row_wise,t_cat_5:column_wise:0,1 (repeatable; an unknown field "
                        "lists the section's fields)")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> JobConfig:
    cfg = get_config(args.config)
    flags = {"run_dir": args.run_dir, "data.data_dir": args.data_dir, "epochs": args.epochs,
             "data.batch_size": args.batch_size, "optim.lr": args.lr, "optim.embedding_lr": args.lr,
             "limit_train_batches": args.limit_train_batches, "limit_eval_batches": args.limit_eval_batches}
    for field, value in flags.items():
        if value is not None:
            apply_override(cfg, f"{field}={value}", check=False)
    for item in args.set:
        apply_override(cfg, item, check=False)
    validate(cfg)  # once, after all overrides: fields that must agree can change together
    if cfg.run_path.exists() and not cfg.run_path.is_dir() or any(p.is_file() for p in cfg.run_path.parents):
        raise ValueError(f"--run-dir {cfg.run_dir}: a file is in the way (a run dir must be a folder)")
    check_same_job(cfg)
    if cfg.data.vocab_dir:
        sizes = tuple(vocab_num_embeddings(cfg.data.vocab_dir))
        if tuple(cfg.model.num_embeddings) != sizes:
            if any(f.startswith("model.num_embeddings=") for f in args.set):
                raise ValueError(f"model.num_embeddings was set to {list(cfg.model.num_embeddings)} but the vocabulary "
                                 f"{cfg.data.vocab_dir} needs {list(sizes)} (its sizes + 1); drop the override")
            print(f"table sizes from the vocabulary {cfg.data.vocab_dir}: {list(sizes)} (config had "
                  f"{list(cfg.model.num_embeddings)})", file=sys.stderr)
            cfg.model.num_embeddings = sizes
    return cfg


# Fields a resumed job may change: how long it runs, how it evaluates and checkpoints, where it is.
RESUME_MAY_CHANGE = ("epochs", "limit_train_batches", "limit_eval_batches", "eval_every_steps",
                     "checkpoint_every_steps", "checkpoint_keep", "run_dir", "name", "data.eval_batch_size",
                     "comm.count_bytes")


def check_same_job(cfg: JobConfig) -> None:
    """A run dir with checkpoints is resumed: refuse when this job's config differs from the one that wrote them
    (``config.json``) in anything but ``RESUME_MAY_CHANGE``, listing the fields, instead of continuing another job's
    weights under other settings."""
    saved_path = cfg.run_path / "config.json"
    if not saved_path.is_file() or not any((cfg.run_path / "checkpoints").glob("step_*/manifest.json")):
        return
    try:
        saved = _flatten(json.loads(saved_path.read_text()))
    except ValueError as e:
        raise ValueError(f"{saved_path}: unreadable ({e}); it records the job the checkpoints beside it belong to. "
                         f"Restore it, or start in a new --run-dir") from None
    now = _flatten(json.loads(json.dumps(to_dict(cfg))))
    differ = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k) and k not in RESUME_MAY_CHANGE]
    if differ:
        shown = "; ".join(f"{k}: {saved.get(k)!r} in the run dir, {now.get(k)!r} now" for k in differ[:8])
        more = f" (and {len(differ) - 8} more)" if len(differ) > 8 else ""
        raise ValueError(f"--run-dir {cfg.run_dir} holds checkpoints of another job; it would be resumed with "
                         f"different settings: {shown}{more}. Use a new --run-dir, or the same settings to resume "
                         f"(only {', '.join(RESUME_MAY_CHANGE)} may change)")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("overrides", "table_bits"):  # dict-valued fields compare whole
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_or_exit(args: argparse.Namespace) -> JobConfig | int:
    """The job's config, or the exit code after saying why there is none to run: 2 after a bad flag or field
    (printed as ``error: ...``), 0 after ``--fields`` printed the listing. ``main`` and the launcher share it."""
    try:
        cfg = build_config(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.fields:
        print(fields_table(cfg))
        return 0
    return cfg


def fields_table(cfg: JobConfig) -> str:
    """The ``--fields`` listing: one block per field (path = value, then its docstring, wrapped)."""
    import textwrap

    lines = [f"fields of --config {cfg.name} (set any with --set PATH=VALUE; tuples as 1,2,3; dicts as "
             f"name:value,name:value):", ""]
    for path, value, doc in describe_fields(cfg):
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        shown = ",".join(f"{k}:{v}" for k, v in value.items()) if isinstance(value, dict) else shown
        lines.append(f"{path} = {shown}")
        lines.extend(textwrap.wrap(doc, 100, initial_indent="    ", subsequent_indent="    "))
    return "\n".join(lines)


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the process group a launcher set up (nccl on GPUs, gloo on CPU), or a group of one without a launcher
    (DistributedModelParallel needs a process group even alone)."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend)
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), device


def setup_logging(run_dir: Path, rank: int) -> None:
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.FileHandler(run_dir / "logs" / f"rank{rank}.log")]
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stdout))
    root = logging.getLogger()
    for h in list(root.handlers):  # a library may have called basicConfig already
        root.removeHandler(h)
    root.setLevel(logging.WARNING)  # libraries (torchrec, fbgemm) log per-table details at INFO on the root logger
    for h in handlers:
        h.setFormatter(fmt)
        # torchrec's planner warns once per table that it is sharded as planned: not news.
        h.addFilter(lambda r: "Sharding spec not found" not in r.getMessage())
        root.addHandler(h)
    for ours in ("dqrm", "pipeline", "datasets", "sharding", "quant"):
        logging.getLogger(ours).setLevel(logging.INFO)


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


def run(cfg: JobConfig) -> dict:
    """One rank of a job; the process group lives exactly as long as this call."""
    rank, world_size, device = init_distributed()
    try:
        return _run(cfg, rank, world_size, device)
    finally:
        for h in list(logging.getLogger().handlers):
            h.close()
            logging.getLogger().removeHandler(h)
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(cfg: JobConfig, rank: int, world_size: int, device: torch.device) -> dict:
    run_dir = cfg.run_path
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run dir {run_dir} exists and is not a directory")
    setup_logging(run_dir, rank)
    phases = PhaseLog(run_dir / "logs" / f"phases_rank{rank}.json")
    log.info("job %s: world size %d on %s, run dir %s", cfg.name, world_size, device, run_dir)
    with phases("data"):
        paths, bayes = resolve_data(cfg, rank)
        splits = Splits(**{
            s: ParquetBatches(paths[s], cfg.model.num_embeddings, cfg.data.reader(train=s == "train", seed=cfg.seed),
                              rank=rank, world_size=world_size)
            for s in ("train", "val", "test")})
    for s in ("train", "val", "test"):
        d = getattr(splits, s)
        if d.rows_unused:
            log.warning("%s: %d of %d rows unused so that all %d ranks run the same number of batches",
                        s, d.rows_unused, d.total_rows, world_size)

    with phases("build_shard"):
        model, optimizer, counter, comm_state = build_sharded_model(cfg, rank, world_size, device)
    checkpointer = Checkpointer(run_dir / "checkpoints", timed=phases, extra=comm_state)
    trainer = Trainer(cfg, model, optimizer, device, splits, checkpointer, rank=rank, comm_counter=counter)
    with phases("resume_load"):
        if trainer.resume():
            log.info("resuming at epoch %d (step %d)", trainer.start_epoch + 1, trainer.step)
    t0 = time.perf_counter()
    with phases("train"):
        history = trainer.train()
    eval_history, exported = trainer.eval_history, None
    if cfg.quant_mode != "fp32":
        with phases("export_rows"):
            ref_logits, parts = write_integer_rows(cfg, trainer, model)
        del trainer, model, optimizer, splits  # the float model is not needed any more: free it before serving
        gc.collect()
        dist.barrier()
        if rank == 0:
            exported = finish_export(cfg, parts, ref_logits, paths["test"], world_size, phases)
    summary = {"config": cfg.name, "quant_mode": cfg.quant_mode, "world_size": world_size, "device": str(device),
               "epochs": history, "eval_history": eval_history, "bayes_test": bayes, "export": exported,
               "test_files": [str(p) for p in paths["test"]],
               "wall_seconds_this_attempt": time.perf_counter() - t0}
    if rank == 0:
        write_summary(run_dir, summary)
        plot_curves({cfg.name: history}, run_dir / "metrics.png", bayes=bayes, title=f"{cfg.name}: test metrics")
        print("\n" + epoch_table(history, bayes), flush=True)
        if bayes:
            best = max(history, key=lambda s: s["test"]["auc"])
            print(f"best test AUC {best['test']['auc']:.4f} (epoch {best['epoch']}) is "
                  f"{bayes['auc'] - best['test']['auc']:.4f} below the best achievable {bayes['auc']:.4f}")
        if exported:
            print(export_report(exported), flush=True)
        print(f"summary: {run_dir / 'summary.json'}  plot: {run_dir / 'metrics.png'}", flush=True)
    return summary


def build_sharded_model(cfg: JobConfig, rank: int, world_size: int, device: torch.device):
    """The DLRM, planned, sharded (DMP), prepared for QAT, with gradient compression and its optimizer; rank 0
    writes the plan and config into the run dir. Returns (model, optimizer, byte counter or None, the gradient
    compression's state to checkpoint by name)."""
    torch.manual_seed(cfg.seed)
    model = build_dlrm(cfg.model, device)
    fuse_embedding_optimizer(model.model.sparse_arch.parameters(), cfg.optim)
    sharders = sharders_for(cfg.comm, device)
    plan = plan_by_policy(model, cfg.plan, world_size=world_size, device=device, pg=dist.group.WORLD,
                          sharders=sharders)
    rows = describe_plan(plan)
    check_qcomms(cfg.comm, rows)
    model = shard_model(model, plan, device, sharders)
    if cfg.quant_mode != "fp32":
        quantize_(model, QATConfig(spec=cfg.quant, step="prepare"), pg=dist.group.WORLD)
        set_fake_quant(model, cfg.quant_mode == "qat")  # ptq trains in float
    counter = ByteCounter().install() if cfg.comm.count_bytes and world_size > 1 else None
    hooks = compress_gradients(model, cfg.comm, counter)
    comm_state = {"comm_int8_ef": h for h in hooks if isinstance(h, Int8ErrorFeedbackHook)}
    optimizer = build_optimizer(model, cfg.optim)
    if rank == 0:
        run_dir = cfg.run_path
        log.info("sharding plan:\n%s", plan_table(rows))
        replicated = [r["table"] for r in rows if r["sharding"] == "data_parallel"]
        log.info("learning rates: every table %g (optim.embedding_lr; fused for the sharded ones%s); MLPs %g "
                 "(optim.lr)", cfg.optim.embedding_lr,
                 f", plain SGD for the {len(replicated)} data-parallel ones" if replicated else "", cfg.optim.lr)
        save_plan(rows, run_dir / "plan.json")
        try:
            save_placements(placements_from_plan(plan), run_dir / "placements.json")
        except ValueError as e:  # e.g. the planner chose table_column_wise, which placements cannot express
            log.warning("placements.json not written (%s); plan.json holds the full plan", e)
        (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    return model, optimizer, counter, comm_state


def artifact_path(cfg: JobConfig) -> Path:
    return cfg.run_path / f"model_int{cfg.quant.embedding_bits}.pt"


def write_integer_rows(cfg: JobConfig, trainer: Trainer, model):
    """The fake-quantized model's test logits (the reference the artifact must reproduce), then every rank's
    integer rows streamed into the artifact's rows file (shard-local: no rank holds another's float rows).
    Collective; returns (logits, integer MLPs and layout) on rank 0, (logits, None) elsewhere."""
    ptq = post_training_quantized(model) if cfg.quant_mode == "ptq" else contextlib.nullcontext()
    with ptq:
        ref_logits, _ = trainer.predict("test")
        parts = write_rows(model, cfg.quant, artifact_path(cfg))
    return ref_logits, parts


def finish_export(cfg: JobConfig, parts, ref_logits: torch.Tensor, test_paths: list[Path], world_size: int,
                  phases: PhaseLog) -> dict:
    """Rank 0, after the float model is freed: the serving module beside the rows, reloaded as a server would and
    scored on the test split, its logits checked against the fake-quantized model's."""
    path = artifact_path(cfg)
    manifest = {"config": cfg.name, "quant_mode": cfg.quant_mode, "quant": dataclasses.asdict(cfg.quant),
                "num_embeddings": list(cfg.model.num_embeddings), "embedding_dim": cfg.model.embedding_dim,
                "dense_features": NUM_DENSE, "dense_transform": "log(1 + max(x, 0)), missing -> 0",
                "id_mapping": (f"vocabulary {Path(cfg.data.vocab_dir).resolve()} (index + 1; rare or missing -> 0)"
                               if cfg.data.vocab_dir else "hash % num_embeddings, missing -> empty bag"),
                "vocab_dir": str(Path(cfg.data.vocab_dir).resolve()) if cfg.data.vocab_dir else None}
    with phases("export_module"):
        export(parts, FEATURE_NAMES, path, manifest)
    sizes = artifact_sizes(parts, path)
    del parts
    with phases("artifact_load"):
        module, manifest = load_with_manifest(path)
    with phases("predict"):
        logits, labels = score_like_evaluation(module, cfg, test_paths, world_size)
    sizes["loaded_bytes"] = loaded_bytes(module)
    # the reference a server can check itself against in a fresh process (bench.scale_run does)
    torch.save({"logits": ref_logits, "rows": ref_logits.numel()}, cfg.run_path / "export_check.pt")
    log.info("exported %s + %s (%.1f MB on disk)", path, rows_path(path).name, sizes["artifact_bytes"] / 1e6)
    return {"path": str(path), "test": binary_metrics(logits, labels), "bits": cfg.quant.embedding_bits,
            "granularity": cfg.quant.granularity, "mlp_bits": cfg.quant.mlp_bits, "sizes": sizes,
            "max_abs_logit_diff_vs_fake_quant": float((logits - ref_logits).abs().max())}


@torch.no_grad()
def score_like_evaluation(module, cfg: JobConfig, paths: list[Path], world_size: int):
    """The artifact's logits and labels on exactly the rows evaluation scored, in the order ``Trainer.predict``
    gathers them: each rank's slice of the split, its first ``limit_eval_batches`` batches, rank after rank. (With a
    limit, those are not the split's first rows.)"""
    logits, labels = [], []
    for r in range(world_size):
        data = ParquetBatches(paths, cfg.model.num_embeddings, cfg.data.reader(train=False, seed=cfg.seed), rank=r,
                              world_size=world_size)
        for batch in itertools.islice(iter(data), cfg.limit_eval_batches or len(data)):
            kjt = batch.sparse_features
            logits.append(module(batch.dense_features, kjt.values(), kjt.lengths()))
            labels.append(batch.labels)
    return torch.cat(logits), torch.cat(labels)


def export_report(e: dict) -> str:
    t, z = e["test"], e["sizes"]
    mb = lambda b: f"{b / 1e6:.1f} MB"  # noqa: E731
    return (f"exported INT{e['bits']} model ({e['granularity']} grid, INT{e['mlp_bits'] or 32} MLPs): "
            f"test AUC {t['auc']:.4f} acc {100 * t['accuracy']:.2f}% logloss {t['logloss']:.4f} | "
            f"max |artifact - fake-quant logits| {e['max_abs_logit_diff_vs_fake_quant']:.2e}\n"
            f"sizes: FP32 {mb(z['fp32_bytes'])}; artifact {mb(z['artifact_bytes'])} on disk "
            f"({z['fp32_bytes'] / z['artifact_bytes']:.1f}x smaller), {mb(z['loaded_bytes'])} in memory once "
            f"loaded; tables {mb(z['table_bytes'])} = codes {mb(z['table_codes_bytes'])} + fp16 scale/bias "
            f"{mb(z['table_scale_bias_bytes'])} + padding {mb(z['table_padding_bytes'])} (rows aligned to "
            f"{z['row_alignment']} B); MLPs {mb(z['mlp_bytes'])}  ->  {e['path']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_library_noise()
    cfg = config_or_exit(args)
    if isinstance(cfg, int):
        return cfg
    try:
        run(cfg)
    except (FileNotFoundError, ValueError, NotImplementedError, NonFiniteLossError, NotEnoughDiskSpace) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

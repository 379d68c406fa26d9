"""The job's command line: flags and ``--set`` overrides -> a checked ``JobConfig`` (``python -m dqrm.pipeline.train
--help``); ``pipeline.train`` and the launcher behind ``make train`` share it."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

from dqrm.datasets.schema import parquet_files
from dqrm.datasets.vocab import vocab_num_embeddings
from dqrm.pipeline.config import (RESUME_MAY_CHANGE, JobConfig, apply_override, describe_fields, resume_view, to_dict,
                                  validate)
from dqrm.pipeline.configs import CONFIGS, get_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dqrm.pipeline.train",
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
    p.add_argument("--profile-steps", metavar="START:STOP",
                   help="record training steps START..STOP-1 (counted from 0) with torch.profiler into "
                        "RUN_DIR/profile: a trace per rank for Perfetto or TensorBoard and a table of the top ops")
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
             "limit_train_batches": args.limit_train_batches, "limit_eval_batches": args.limit_eval_batches,
             "observe.profile_steps": args.profile_steps}
    for field, value in flags.items():
        if value is not None:
            apply_override(cfg, f"{field}={value}", check=False)
    for item in args.set:
        apply_override(cfg, item, check=False)
    validate(cfg)  # once, after all overrides: fields that must agree can change together
    if cfg.run_path.exists() and not cfg.run_path.is_dir() or any(p.is_file() for p in cfg.run_path.parents):
        raise ValueError(f"--run-dir {cfg.run_dir}: a file is in the way (a run dir must be a folder)")
    # The vocabulary's table sizes first: the run dir's config.json and a saved budget's request were made with them.
    if cfg.data.vocab_dir:
        sizes = tuple(vocab_num_embeddings(cfg.data.vocab_dir))
        if tuple(cfg.model.num_embeddings) != sizes:
            if any(f.startswith("model.num_embeddings=") for f in args.set):
                raise ValueError(f"model.num_embeddings was set to {list(cfg.model.num_embeddings)} but the vocabulary "
                                 f"{cfg.data.vocab_dir} needs {list(sizes)} (its sizes + 1); drop the override")
            print(f"table sizes from the vocabulary {cfg.data.vocab_dir}: {list(sizes)} (config had "
                  f"{list(cfg.model.num_embeddings)})", file=sys.stderr)
            cfg.model.num_embeddings = sizes
    if cfg.quant.has_budget:
        cfg = _with_saved_budget(cfg)
    check_same_job(cfg)
    return cfg


def _with_saved_budget(cfg: JobConfig) -> JobConfig:
    """A byte-budgeted job whose run dir holds the budget's choice for this request runs with it (bits, table
    sizes, row map), so that a resume compares like with like; without one, the job searches when it starts."""
    from dqrm.pipeline.budget import apply_plan, saved_plan  # torch and torchrec: only for a budgeted job

    if cfg.quant.table_bits:
        raise ValueError("quant.table_bits and a byte budget both set: the budget chooses every table's bits; drop "
                         "quant.table_bits (or the budget)")
    if cfg.data.row_map:
        raise ValueError("data.row_map and a byte budget both set: the budget writes its own row map; drop "
                         "data.row_map (or the budget)")
    if cfg.quant_mode == "fp32":
        raise ValueError("a byte budget chooses integer bit widths: use quant_mode qat or ptq, not fp32")
    plan = saved_plan(cfg)
    return cfg if plan is None else apply_plan(cfg, plan)


def check_same_job(cfg: JobConfig) -> None:
    """A run dir with checkpoints is resumed: refuse when this job's config differs from the one that wrote them
    (``config.json``) in anything but ``RESUME_MAY_CHANGE``, listing the fields, instead of continuing another job's
    weights under other settings."""
    saved_path = cfg.run_path / "config.json"
    if not saved_path.is_file() or not any((cfg.run_path / "checkpoints").glob("step_*/manifest.json")):
        return
    try:
        saved = resume_view(json.loads(saved_path.read_text()))
    except ValueError as e:
        raise ValueError(f"{saved_path}: unreadable ({e}); it records the job the checkpoints beside it belong to. "
                         f"Restore it, or start in a new --run-dir") from None
    now = resume_view(to_dict(cfg))
    # A field added since the run dir was written is not in its config.json: that job ran as the field's default
    # does (a new field's default keeps the behaviour from before it), so it is compared as the default.
    defaults = resume_view(to_dict(JobConfig()))
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    differ = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if differ:
        shown = "; ".join(f"{k}: {saved.get(k)!r} in the run dir, {now.get(k)!r} now" for k in differ[:8])
        more = f" (and {len(differ) - 8} more)" if len(differ) > 8 else ""
        raise ValueError(f"--run-dir {cfg.run_dir} holds checkpoints of another job; it would be resumed with "
                         f"different settings: {shown}{more}. Use a new --run-dir, or the same settings to resume "
                         f"(only {', '.join(RESUME_MAY_CHANGE)} may change)")


def config_or_exit(args: argparse.Namespace) -> JobConfig | int:
    """The job's config, or the exit code after saying why there is none to run: 2 after a bad flag or field
    (printed as ``error: ...``), 0 after ``--fields`` printed the listing. ``main`` and the launcher share it."""
    try:
        cfg = build_config(args)
        if not args.fields:
            check_inputs(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.fields:
        print(fields_table(cfg))
        return 0
    return cfg


def check_inputs(cfg: JobConfig) -> None:
    """Raise ``FileNotFoundError`` naming the first input the job would read and not find: the data dir's splits,
    the vocabulary (read by ``build_config``) and a row map. Cheap (paths only, nothing is read), so that the
    launcher refuses before torchx and the workers start; a synthetic config's data are made by the job itself."""
    if cfg.data.data_dir:
        root = Path(cfg.data.data_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"--data-dir {root}: no such folder; give the folder holding train/val/test "
                                    f"Parquet (convert raw Criteo first with `python -m dqrm.datasets.convert`), "
                                    f"or omit --data-dir for the bundled synthetic data")
        for split in ("train", "val", "test"):
            parquet_files(root, split)
    if cfg.data.row_map and not Path(cfg.data.row_map).is_file():
        raise FileNotFoundError(f"data.row_map {cfg.data.row_map}: no such file; give the row map the budget wrote "
                                f"(RUN_DIR/row_map.npz) or drop data.row_map")


def fields_table(cfg: JobConfig) -> str:
    """The ``--fields`` listing: one block per field (path = value, then its docstring, wrapped)."""
    lines = [f"fields of --config {cfg.name} (set any with --set PATH=VALUE; tuples as 1,2,3; dicts as "
             f"name:value,name:value):", ""]
    for path, value, doc in describe_fields(cfg):
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        shown = ",".join(f"{k}:{v}" for k, v in value.items()) if isinstance(value, dict) else shown
        lines.append(f"{path} = {shown}")
        lines.extend(textwrap.wrap(doc, 100, initial_indent="    ", subsequent_indent="    "))
    return "\n".join(lines)

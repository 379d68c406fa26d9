"""``python -m dqrm.pipeline.predict``: score a Parquet file with an exported integer model; print AUC, accuracy and
log loss."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dqrm.datasets.reader import ParquetBatches, ReaderConfig
from dqrm.pipeline.metrics import binary_metrics
from dqrm.pipeline.quiet import quiet_library_noise
from dqrm.pipeline.report import strict_json
from dqrm.quant.export import load_with_manifest


@torch.no_grad()
def score(module, paths: list[Path], num_embeddings: list[int], batch_size: int = 4096,
          limit_rows: int | None = None, vocab_dir: str | None = None,
          row_map: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of every row of ``paths`` (file order) from a loaded artifact; ids are mapped as in
    training (``vocab_dir``, recorded in the artifact's manifest, or hashing; then the artifact's ``row_map``, if
    its tables share rows)."""
    data = ParquetBatches(paths, num_embeddings, ReaderConfig(batch_size=batch_size, vocab_dir=vocab_dir,
                                                              row_map=row_map))
    logits, labels, rows = [], [], 0
    for batch in data:
        kjt = batch.sparse_features
        logits.append(module(batch.dense_features, kjt.values(), kjt.lengths()))
        labels.append(batch.labels)
        rows += batch.labels.numel()
        if limit_rows is not None and rows >= limit_rows:
            break
    out, lab = torch.cat(logits), torch.cat(labels)
    return (out, lab) if limit_rows is None else (out[:limit_rows], lab[:limit_rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dqrm.pipeline.predict",
                                description="Score Parquet data (dqrm layout) with an exported integer DLRM.")
    p.add_argument("--model", type=Path, required=True,
                   help="exported artifact in a run dir: model_int*.pt (TorchScript) or model_int*.pt2 (the same "
                        "model as a torch.export program); either serves the same logits")
    p.add_argument("--data", type=Path, nargs="+", required=True, help="Parquet file(s) to score")
    p.add_argument("--batch-size", type=int, default=4096, help="rows per forward call (default: 4096)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--vocab-dir", help="vocabulary the model was trained with (default: the one its manifest names)")
    args = p.parse_args(argv)
    quiet_library_noise()
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {args.batch_size}")
    try:
        module, manifest = load_with_manifest(args.model)
        if args.vocab_dir and not manifest.get("vocab_dir"):
            raise ValueError(f"{args.model} was trained with hashed ids (hash % table size), not a vocabulary; "
                             f"drop --vocab-dir")
        vocab = args.vocab_dir or manifest.get("vocab_dir")
        if vocab and not Path(vocab).is_dir():
            raise FileNotFoundError(f"{vocab}: the vocabulary this model was trained with is missing; pass "
                                    f"--vocab-dir with its new location")
        for path in args.data:
            if path.is_dir():
                raise ValueError(f"{path} is a folder; pass its Parquet files (e.g. {path}/*.parquet)")
        row_map = None
        if manifest.get("row_map"):  # load_with_manifest checked it against the SHA-256 recorded at export
            if manifest["row_map"] not in manifest.get("shipped", {}):
                raise ValueError(f"{args.model}: its manifest names the row map {manifest['row_map']} but not its "
                                 f"SHA-256 (exported before row maps were hashed), so the map cannot be verified; "
                                 f"re-export the model")
            row_map = str(args.model.parent / manifest["row_map"])
        logits, labels = score(module, args.data, manifest["num_embeddings"], args.batch_size, vocab_dir=vocab,
                               row_map=row_map)
        m = binary_metrics(logits, labels)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:  # strict JSON: an undefined AUC is null, not NaN
        print(json.dumps(strict_json(m), allow_nan=False))
    else:
        auc = f"{m['auc']:.4f}" if m["auc"] == m["auc"] else "n/a"
        print(f"rows {m['rows']:,}  AUC {auc}  accuracy {100 * m['accuracy']:.2f}%  log loss {m['logloss']:.4f}")
    if m["auc"] != m["auc"]:
        print(f"note: every label is {int(labels[0])}, so AUC is undefined; unlabeled data (e.g. Criteo's test.txt, "
              f"converted with label 0) can be scored but not evaluated", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

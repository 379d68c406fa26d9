"""``python -m pipeline.predict``: score a Parquet file with an exported integer model; print AUC, accuracy, log loss."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from datasets.reader import ParquetBatches, ReaderConfig
from pipeline.metrics import binary_metrics
from quant.export import load_with_manifest


@torch.no_grad()
def score(module, paths: list[Path], num_embeddings: list[int], batch_size: int = 4096,
          limit_rows: int | None = None, vocab_dir: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of every row of ``paths`` (file order) from a loaded artifact; ids are mapped as in
    training (``vocab_dir``, recorded in the artifact's manifest, or hashing)."""
    data = ParquetBatches(paths, num_embeddings, ReaderConfig(batch_size=batch_size, vocab_dir=vocab_dir))
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
    p = argparse.ArgumentParser(prog="python -m pipeline.predict",
                                description="Score Parquet data (dqrm layout) with an exported integer DLRM.")
    p.add_argument("--model", type=Path, required=True, help="exported artifact (model_int*.pt in a run dir)")
    p.add_argument("--data", type=Path, nargs="+", required=True, help="Parquet file(s) to score")
    p.add_argument("--batch-size", type=int, default=4096, help="rows per forward call")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--vocab-dir", help="vocabulary the model was trained with (default: the one its manifest names)")
    args = p.parse_args(argv)
    try:
        module, manifest = load_with_manifest(args.model)
        vocab = args.vocab_dir or manifest.get("vocab_dir")
        if vocab and not Path(vocab).is_dir():
            raise FileNotFoundError(f"{vocab}: the vocabulary this model was trained with is missing; pass "
                                    f"--vocab-dir with its new location")
        logits, labels = score(module, args.data, manifest["num_embeddings"], args.batch_size, vocab_dir=vocab)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    m = binary_metrics(logits, labels)
    if args.json:
        print(json.dumps(m))
    else:
        print(f"rows {m['rows']:,}  AUC {m['auc']:.4f}  accuracy {100 * m['accuracy']:.2f}%  "
              f"log loss {m['logloss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Global evaluation metrics (AUC, accuracy, log loss) over all ranks' predictions.

Predictions are all-gathered and scored exactly with ``torchmetrics`` (sort-based AUROC), rather than with
RecMetrics' windowed, approximate state: an evaluation split of up to a few million rows fits in memory.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc


def gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate an equal-length 1-D tensor from every rank (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def binary_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """AUC, accuracy at 0.5 and mean log loss of logits against 0/1 labels (AUC is NaN when every label is the
    same: it ranks positives against negatives)."""
    logits, labels = logits.double().flatten(), labels.double().flatten()
    if logits.numel() == 0:
        raise ValueError("no predictions to score: the evaluation split is empty")
    one_class = bool((labels == labels[0]).all())  # AUC is undefined (torchmetrics would say 0)
    return {
        "auc": float("nan") if one_class else float(binary_auroc(torch.sigmoid(logits), labels.long())),
        "accuracy": float(((logits >= 0).double() == labels).double().mean()),
        "logloss": float(F.binary_cross_entropy_with_logits(logits, labels)),
        "rows": int(labels.numel()),
    }

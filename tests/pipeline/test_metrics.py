"""Global metrics against brute-force definitions."""

import itertools
import math

import torch

from dqrm.pipeline.metrics import binary_metrics


def test_auc_accuracy_logloss_match_definitions():
    torch.manual_seed(0)
    logits = torch.randn(200)
    labels = (torch.rand(200) < torch.sigmoid(logits)).float()
    logits[:10] = logits[10:20]  # ties count one half
    pos = [x for x, y in zip(logits.tolist(), labels.tolist()) if y == 1]
    neg = [x for x, y in zip(logits.tolist(), labels.tolist()) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    m = binary_metrics(logits, labels)
    assert abs(m["auc"] - wins / (len(pos) * len(neg))) < 1e-6  # torchmetrics accumulates in float32
    assert abs(m["accuracy"] - sum((x >= 0) == (y == 1) for x, y in zip(logits.tolist(), labels.tolist())) / 200) < 1e-12
    p = torch.sigmoid(logits.double())
    ll = -sum(math.log(pi) if y else math.log(1 - pi) for pi, y in zip(p.tolist(), labels.tolist())) / 200
    assert abs(m["logloss"] - ll) < 1e-9
    assert m["rows"] == 200

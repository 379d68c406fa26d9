"""The fake-quant math on CUDA tensors: bitwise equal to CPU, and the touched-rows correction's cost on a GPU.

Needs torch, numpy and numba, not FBGEMM or TorchRec (the GPU machines have no FBGEMM): it drives
``EmbeddingFakeQuantizer``'s correction with a stand-in for a TBE (a flat weight buffer with FBGEMM's layout
attributes). Prints a JSON report and writes ``gpu_fake_quant.json`` (with the commit, command and machine) to
``--out``: ``$OUT`` where set (the device machines' output folder), else bench/results. Where the copy of the tree has
no git repository, pass the commit as ``DQRM_GIT_COMMIT=$(git rev-parse HEAD)``.

    python -m bench.gpu_fake_quant [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from bench.common import RESULTS, save
from dqrm.quant.embedding_qat import EmbeddingFakeQuantizer
from dqrm.quant.fake_quant import fake_quantize, rowwise_qparams, symmetric_qparams
from dqrm.quant.mlp_qat import RowwiseWeightFakeQuant
from dqrm.sharding.tbe import TBELayout


class _FlatTBE(nn.Module):
    """Stand-in for a dense TBE: one flat buffer, per-table element offsets."""

    def __init__(self, rows: list[int], dim: int, device) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)  # CPU generator: identical weights on every device
        self.weights = nn.Parameter((torch.randn(sum(rows) * dim, generator=g) * 0.1).to(device))
        self.weights_offsets = torch.tensor([0] + [r * dim for r in rows[:-1]], device=device).cumsum(0)


def _layout(tbe, rows, dim):
    n = len(rows)
    return TBELayout(tbe=tbe, table_names=[f"t{i}" for i in range(n)], local_rows=rows, local_dims=[dim] * n,
                     full_dims=[dim] * n, feature_table_map=torch.arange(n),
                     feature_dim_offsets=torch.arange(n) * dim)


def _inputs(rows, batch, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.cat([torch.randint(0, r, (batch,), generator=g) for r in rows]).to(device)
    offsets = torch.arange(0, len(rows) * batch + 1, device=device)
    return {"indices": idx, "offsets": offsets}


def check_equal(device) -> dict:
    torch.manual_seed(0)
    out = {}
    w = torch.randn(4096, 16) * torch.rand(4096, 1) * 3
    for bits in (2, 4, 8):
        s, b = rowwise_qparams(w, bits)
        cpu = fake_quantize(w, s, b, bits)
        wd = w.to(device)
        sd, bd = rowwise_qparams(wd, bits)
        out[f"rowwise_int{bits}_bitwise_equal"] = bool(torch.equal(fake_quantize(wd, sd, bd, bits).cpu(), cpu))
        s, b = symmetric_qparams(w.abs().max().reshape(1), bits)
        sd, bd = symmetric_qparams(wd.abs().max().reshape(1), bits)
        out[f"table_int{bits}_bitwise_equal"] = bool(torch.equal(fake_quantize(wd, sd, bd, bits).cpu(),
                                                                 fake_quantize(w, s, b, bits)))
        fq = RowwiseWeightFakeQuant(bits)
        out[f"mlp_int{bits}_bitwise_equal"] = bool(torch.equal(fq(wd).cpu(), fq(w)))
    rows, dim, batch = [1000, 50_000, 200_000], 16, 512
    results = {}
    for dev in ("cpu", device):
        torch.manual_seed(1)
        tbe = _FlatTBE(rows, dim, dev)
        for gran in ("table", "row"):
            q = EmbeddingFakeQuantizer([_layout(tbe, rows, dim)], [f"t{i}" for i in range(3)],
                                       {f"t{i}": 4 for i in range(3)}, gran, 200)
            q.to(dev)
            q.update_scales()
            kw = _inputs(rows, batch, dev)
            results[(dev, gran)] = q.corrected(0, kw, torch.zeros(batch, 3 * dim, device=dev)).cpu()
            q.remove()
    for gran in ("table", "row"):
        diff = (results[(device, gran)] - results[("cpu", gran)]).abs().max().item()
        out[f"correction_{gran}_max_abs_diff_cuda_vs_cpu"] = diff
    return out


def time_correction(device, rows_per_table, batch=2048, steps=50) -> dict:
    rows = [rows_per_table] * 4
    tbe = _FlatTBE(rows, 16, device)
    q = EmbeddingFakeQuantizer([_layout(tbe, rows, 16)], [f"t{i}" for i in range(4)], {f"t{i}": 4 for i in range(4)},
                               "table", 200).to(device)
    q.update_scales()
    kw = _inputs(rows, batch, device)
    out = torch.zeros(batch, 64, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(5):
        q.corrected(0, kw, out)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        q.corrected(0, kw, out)
    sync()
    per = (time.perf_counter() - t0) / steps
    t0 = time.perf_counter()
    q.update_scales()
    sync()
    scale_s = time.perf_counter() - t0
    return {"rows_per_table": rows_per_table, "correction_ms": 1e3 * per, "scale_update_ms": 1e3 * scale_s}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_fake_quant", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or RESULTS),
                   help="folder for gpu_fake_quant.json (default: $OUT if set, else bench/results)")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "equality": check_equal(device) if device == "cuda" else "no CUDA device: nothing to compare",
              "timing": [time_correction(device, n) for n in (10**5, 10**6, 10**7)]}
    print(json.dumps(report, indent=2))
    print(f"json: {save('gpu_fake_quant', report, out=args.out)}")

if __name__ == "__main__":
    main()

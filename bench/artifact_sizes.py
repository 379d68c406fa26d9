"""Artifact sizes: what an exported model holds, on disk and in memory once loaded, per bit width and row alignment.

The default model (26 tables, 7.9M rows, dim 16) is prepared for QAT, its scales taken from its weights, and
exported through the training job's path (shard-local rows, then the serving module) at INT8/INT4/INT2 with the
project's row alignment (1) and TorchRec's default (16). Each artifact is loaded as a server loads it and run once,
so "in memory" includes the MLP weights it dequantizes on first use. Sizes are bytes of the files and tensors, with
the tables' padding shown apart; "x smaller" divides the FP32 model's bytes (tables and MLPs) by the artifact's.

    python -m bench.artifact_sizes [--config default] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from bench.common import add_out_argument, prepared_model, provenance, save, table
from dqrm.datasets.schema import FEATURE_NAMES
from dqrm.pipeline.configs import get_config
from dqrm.pipeline.quiet import quiet_library_noise
from dqrm.quant.export import artifact_sizes, export, load_with_manifest, loaded_bytes, write_rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="default", help="named config whose model is exported (default: %(default)s)")
    add_out_argument(p)
    args = p.parse_args(argv)
    prov = provenance()
    quiet_library_noise()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    cfg = get_config(args.config)
    model = prepared_model(cfg)
    rows = []
    dense = torch.randn(64, 13)
    lengths = torch.ones(26 * 64, dtype=torch.int32)
    values = torch.cat([torch.randint(0, n, (64,)) for n in cfg.model.num_embeddings])
    with tempfile.TemporaryDirectory() as tmp:
        for bits in (8, 4, 2):
            for alignment in (1, 16):
                spec = dataclasses.replace(cfg.quant, embedding_bits=bits, row_alignment=alignment,
                                           mlp_bits=8 if bits == 8 else cfg.quant.mlp_bits)
                path = Path(tmp) / f"int{bits}_a{alignment}" / "model.pt"
                parts = write_rows(model, spec, path)
                export(parts, FEATURE_NAMES, path, {"num_embeddings": list(cfg.model.num_embeddings)})
                sizes = artifact_sizes(parts, path)
                module, _ = load_with_manifest(path)
                with torch.no_grad():
                    module(dense, values, lengths)
                sizes["loaded_bytes"] = loaded_bytes(module)
                rows.append({"bits": bits, "alignment": alignment, **{k: v for k, v in sizes.items() if k != "files"},
                             "files": sizes["files"],
                             "x_smaller_on_disk": sizes["fp32_bytes"] / sizes["artifact_bytes"],
                             "x_smaller_loaded": sizes["fp32_bytes"] / sizes["loaded_bytes"]})
                del module, parts
    mb = lambda b: b / 1e6  # noqa: E731
    shown = [{**r, "disk_mb": mb(r["artifact_bytes"]), "loaded_mb": mb(r["loaded_bytes"]),
              "tables_mb": mb(r["table_bytes"]), "padding_mb": mb(r["table_padding_bytes"]),
              "row_b": (r["table_codes_bytes"] + r["table_scale_bias_bytes"] + r["table_padding_bytes"])
              / sum(cfg.model.num_embeddings)} for r in rows]
    text = (f"{args.config} model: FP32 {mb(rows[0]['fp32_bytes']):.1f} MB (tables and MLPs)\n\n" +
            table(shown, [("bits", "bits", "d"), ("alignment", "align B", "d"), ("row_b", "B/row", ".2f"),
                          ("tables_mb", "tables MB", ".1f"), ("padding_mb", "padding MB", ".1f"),
                          ("disk_mb", "on disk MB", ".1f"), ("loaded_mb", "loaded MB", ".1f"),
                          ("x_smaller_on_disk", "x < FP32", ".2f"), ("x_smaller_loaded", "x < FP32 ld", ".2f")]))
    print(text)
    print(f"json: {save('artifact_sizes', {**prov, 'config': args.config, 'rows': rows}, text, out=args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

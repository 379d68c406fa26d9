"""Serve an exported dqrm model with nothing but torch and fbgemm_gpu: raw Criteo rows in, click probabilities out.

    python examples/serve_artifact.py RUN_DIR/model_int4.pt  [ROWS.tsv]   # TorchScript artifact
    python examples/serve_artifact.py RUN_DIR/model_int4.pt2 [ROWS.tsv]   # the same model as a torch.export program

ROWS.tsv holds raw Criteo lines (``train.txt``'s format: label, 13 integer counts, 26 categoricals as 8 hex digits,
tab-separated, an empty field for a missing value; a line of 39 fields without the label, as in ``test.txt``, works
too); without it, the three sample lines below are scored. It prints one click probability per line.

What the module takes (``model(dense, values, lengths) -> logits [B]``), made here exactly as the training job's
reader makes it (``dqrm.datasets.reader``), so that the served logits equal the evaluated ones:

- ``dense``: float32 ``[B, 13]``, each count already transformed to ``log(1 + max(x, 0))``, a missing count 0;
- ``values``: int64, the categorical ids already mapped to table rows: ``hash % num_embeddings[t]`` with the table
  sizes from the manifest (a model trained with a vocabulary or a byte budget's row map maps ids differently; this
  script refuses those: ``python -m dqrm.pipeline.predict`` serves them), in key-major order: every row's id of
  ``cat_0``, then every row's id of ``cat_1``, ...; a missing categorical contributes no id;
- ``lengths``: int32 ``[26 * B]``, key-major too: ``lengths[t * B + i]`` is 1 if row ``i`` has categorical ``t``,
  else 0 (an empty bag, which pools to zero).

What loading trusts: ``torch.jit.load`` and ``torch.export.load`` run the code inside the file, so load only
artifacts you made or got from someone you trust. The SHA-256 beside the model (``model_int4.pt.json``) and the rows
file's SHA-256 in its manifest, both checked below, prove integrity (the files are the ones export wrote, not
truncated or modified by accident), not origin: whoever can replace the model can replace its sidecar too.
"""

import hashlib
import json
import math
import sys
from pathlib import Path

import torch
import fbgemm_gpu  # noqa: F401 - registers the FBGEMM operators the artifact calls (fbgemm::...)

MANIFEST = "dqrm_manifest.json"
SAMPLE_LINES = [  # label, I1..I13, C1..C26 (raw Criteo, tab-separated; empty = missing)
    "0\t1\t1\t5\t0\t1382\t4\t15\t2\t181\t1\t2\t\t2\t68fd1e64\t80e26c9b\tfb936136\t7b4723c4\t25c83c98\t7e0ccccf"
    "\tde7995b8\t1f89b562\ta73ee510\ta8cd5504\tb2cb9c98\t37c9c164\t2824a5f6\t1adce6ef\t8ba8b39a\t891b62e7\te5ba7672"
    "\tf54016b9\t21ddcdc9\tb1252a9d\t07b5194c\t\t3a171ecb\tc5c50484\te8b83407\t9727dd16",
    "0\t2\t0\t44\t1\t102\t8\t2\t2\t4\t1\t1\t\t4\t68fd1e64\tf0cf0024\t6f67f7e5\t41274cd7\t25c83c98\tfe6b92e5"
    "\t922afcc0\t0b153874\ta73ee510\t2b53e5fb\t4f1b46f3\t623049e6\td7020589\tb28479f6\te6c5b5cd\tc92f3b61\t07c540c4"
    "\tb04e4670\t21ddcdc9\t5840adea\t60f6221e\t\t3a171ecb\t43f13e8b\te8b83407\t731c3655",
    "1\t\t0\t1\t14\t767\t89\t4\t2\t245\t\t3\t3\t45\t287e684f\t0a519c5c\t02cf9876\tc18be181\t25c83c98\t7e0ccccf"
    "\tc78204a1\t0b153874\ta73ee510\t3b08e48b\t5f5e6091\t8fe001f4\taa655a2f\t07d13a8f\t6dc710ed\t36103458\t8efede7f"
    "\t3412118d\t\t\te587c466\tad3062eb\t3a171ecb\t3b183c5c\t\t",
]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load(path: Path):
    """The serving module and its manifest, after checking both files against their recorded SHA-256."""
    sidecar = json.loads(Path(str(path) + ".json").read_text())
    if sha256(path) != sidecar["sha256"]:
        raise SystemExit(f"{path}: SHA-256 differs from {path.name}.json (truncated or modified)")
    rows = sidecar["rows"]
    rows_file = path.parent / rows["file"]  # beside the model, wherever the process runs
    if sha256(rows_file) != rows["sha256"]:
        raise SystemExit(f"{rows_file}: SHA-256 differs from the manifest (modified or from another export)")
    extra = {MANIFEST: ""}
    if path.suffix == ".pt2":
        model = torch.export.load(str(path), extra_files=extra).module()
    else:
        model = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    manifest = json.loads(extra[MANIFEST])
    # the row buffer is stored empty; the rows file is mapped in its place (pages load as rows are looked up)
    mapped = torch.from_file(str(rows_file), shared=False, size=rows["bytes"], dtype=torch.uint8)
    if path.suffix == ".pt2":
        model.lookup.weights_host = mapped
    else:
        setattr(model, manifest["rows"]["buffer"], mapped)
    return model, manifest


def inputs(lines: list[str], manifest: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dense, values, lengths)`` of raw Criteo lines, as the job's reader makes them (see the docstring)."""
    if manifest.get("vocab_dir") or manifest.get("row_map"):
        raise SystemExit("this model maps ids through a vocabulary or a row map; serve it with "
                         "python -m dqrm.pipeline.predict")
    sizes = manifest["num_embeddings"]
    n_dense, n_sparse = manifest["dense_features"], len(sizes)
    dense, ids = [], [[] for _ in range(n_sparse)]  # ids[t][i]: row i's id in table t, or None
    for line in lines:
        fields = line.rstrip("\n").split("\t")
        if len(fields) == 1 + n_dense + n_sparse:
            fields = fields[1:]  # drop the label
        if len(fields) != n_dense + n_sparse:
            raise SystemExit(f"expected {n_dense + n_sparse} fields (or a label first), got {len(fields)}: {line!r}")
        dense.append([math.log1p(max(int(x), 0)) if x else 0.0 for x in fields[:n_dense]])
        for t, h in enumerate(fields[n_dense:]):
            ids[t].append(int(h, 16) % sizes[t] if h else None)
    values = [i for table in ids for i in table if i is not None]  # key-major: table after table
    lengths = [0 if i is None else 1 for table in ids for i in table]
    return (torch.tensor(dense, dtype=torch.float32), torch.tensor(values, dtype=torch.int64),
            torch.tensor(lengths, dtype=torch.int32))


def main() -> None:
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__.split("\n\n")[1])
    model, manifest = load(Path(sys.argv[1]))
    lines = Path(sys.argv[2]).read_text().splitlines() if len(sys.argv) == 3 else SAMPLE_LINES
    with torch.no_grad():
        probabilities = torch.sigmoid(model(*inputs(lines, manifest)))
    for p in probabilities.tolist():
        print(f"{p:.9f}")


if __name__ == "__main__":
    main()

"""dqrm's QAT in your own training loop: a TorchRec DLRM, sharded by DMP, prepared, trained, converted, exported.

    python examples/own_training_loop.py [--out DIR] [--steps N]

Nothing of ``dqrm.pipeline`` is used: the model, the sharding, the optimizers and the loop are TorchRec's and torch's;
dqrm contributes the verb (``dqrm.quant.api.quantize_``, prepare then convert) and the export
(``dqrm.quant.export.export``). It runs at world size 1 on gloo (one process, CPU, a few seconds); the same calls run
at any world size, every rank calling ``quantize_`` and rank 0 exporting. It prints the largest difference between
the logits the fake-quantized model evaluates and those the exported integer artifact serves.
"""

import argparse
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from dqrm.quant.api import QATConfig, QuantSpec, quantize_
from dqrm.quant.export import load_with_manifest, export

NUM_DENSE = 13
TABLE_ROWS = [10, 50, 100, 500, 1000, 2000, 5000, 10_000]  # one feature per table
FEATURES = [f"f{t}" for t in range(len(TABLE_ROWS))]
BATCH = 64


def random_batch(gen: torch.Generator, batch_size: int = BATCH) -> Batch:
    """Synthetic data in TorchRec's contract: dense features, a KJT of ids (0-3 per bag, key-major), 0/1 labels."""
    lengths = torch.randint(0, 4, (len(FEATURES) * batch_size,), generator=gen, dtype=torch.int32)
    rows = torch.tensor(TABLE_ROWS).repeat_interleave(batch_size).repeat_interleave(lengths.long())
    values = (torch.rand(rows.numel(), generator=gen) ** 3 * rows).long()  # skewed: small ids are frequent
    dense = torch.randn(batch_size, NUM_DENSE, generator=gen)
    labels = ((dense[:, 0] + dense[:, 1] * dense[:, 2]) > 0).float()
    return Batch(dense_features=dense, labels=labels,
                 sparse_features=KeyedJaggedTensor.from_lengths_sync(keys=FEATURES, values=values, lengths=lengths))


def build_model() -> DLRMTrain:
    tables = [EmbeddingBagConfig(name=f"t{t}", embedding_dim=16, num_embeddings=n, feature_names=[f])
              for t, (f, n) in enumerate(zip(FEATURES, TABLE_ROWS))]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))  # DMP materializes the shards
    return DLRMTrain(DLRM(embedding_bag_collection=ebc, dense_in_features=NUM_DENSE,
                          dense_arch_layer_sizes=[32, 16], over_arch_layer_sizes=[32, 1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for the artifact (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=20, help="training steps")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="dqrm-example-"))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    torch.manual_seed(0)

    model = build_model()
    # TorchRec's fused in-backward SGD for the tables (marked before sharding: the sharder reads the marks)
    apply_optimizer_in_backward(torch.optim.SGD, model.model.sparse_arch.parameters(), {"lr": 0.5})
    model = DistributedModelParallel(model, device=torch.device("cpu"))  # TorchRec's planner chooses the plan

    # 1. prepare: fake-quant on every table (one INT4 scale per table) and every Linear (INT4 per output row)
    spec = QuantSpec(embedding_bits=4, granularity="table", mlp_bits=4, scale_update_every=10)
    quantize_(model, QATConfig(spec=spec, step="prepare"), pg=dist.group.WORLD)

    # the dense optimizer is built after prepare; the tables' optimizer is already fused into the backward pass
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(model.named_parameters())),
                                  lambda params: torch.optim.SGD(params, lr=0.1))
    optimizer = CombinedOptimizer([model.fused_optimizer, dense])

    # 2. your own loop: TorchRec's DLRMTrain returns (loss, (loss, logits, labels))
    gen = torch.Generator().manual_seed(1)
    model.train()
    for step in range(args.steps):
        loss, _ = model(random_batch(gen))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")

    model.eval()
    held_out = [random_batch(gen, 256) for _ in range(2)]
    with torch.no_grad():
        fake_quant = torch.cat([model(b)[1][1] for b in held_out])  # what evaluation sees

    # 3. convert (collective: every rank calls it, rank 0 gets the integer DLRM) and export
    int_model = quantize_(model, QATConfig(spec=spec, step="convert"))
    path = export(int_model, FEATURES, out / "model_int4.pt", manifest={"num_embeddings": TABLE_ROWS})

    # 4. the artifact as a server loads it (checksums checked, rows file mapped) serves the evaluated logits
    for artifact in (path, path.with_suffix(".pt2")):  # TorchScript and the torch.export program beside it
        served, _ = load_with_manifest(artifact)
        with torch.no_grad():
            logits = torch.cat([served(b.dense_features, b.sparse_features.values(), b.sparse_features.lengths())
                                for b in held_out])
        diff = (logits - fake_quant).abs().max().item()
        print(f"{artifact.name}: max |artifact - fake-quant| logit difference {diff:.3e} over {logits.numel()} rows")
    print(f"artifact: {path} (+ {path.with_suffix('.rows').name})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

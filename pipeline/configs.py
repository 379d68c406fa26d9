"""Named experiments. Each returns a complete ``JobConfig``; the CLI picks one with ``--config NAME``."""

from __future__ import annotations

from typing import Callable

import dataclasses

from dqrm.datasets.synthetic import SyntheticConfig
from dqrm.quant.api import QuantSpec
from dqrm.pipeline.config import DataConfig, JobConfig, ModelConfig, OptimConfig

# MLPerf DLRM shapes (REFERENCE.md §3).
KAGGLE_CARDINALITIES = (1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
                        5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572)
DLRMV2_CARDINALITIES = (40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10, 2209,
                        11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36)
"""MLPerf DLRMv2's tables (Criteo 1TB, 40M cap), REFERENCE.md section 3."""
DLRMV2_CAP = 200_000
"""Rows per table in ``dlrm_v2``: 1.72M rows x 128 x 4 B = 0.88 GB of FP32 tables for both ranks (the full 40M cap
is 204M rows, 104 GB)."""
KAGGLE_SAMPLE_CARDINALITIES = (574, 523, 53717, 28553, 145, 12, 8302, 274, 4, 12994, 3981, 49112, 2905, 27, 5629,
                               40597, 11, 2737, 1296, 4, 45598, 13, 15, 13288, 53, 10123)
"""The sample's vocabulary sizes + 1 (``--split kaggle --vocab-min-count 1``: every id seen in its 117,548 training
rows, 280,487 rows in all); the job reads them from the vocabulary, these document the model without the data."""
TERABYTE_CARDINALITIES = (9980333, 36084, 17217, 7378, 20134, 3, 7112, 1442, 61, 9758201, 1333352, 313829, 10, 2208,
                          11156, 122, 4, 970, 14, 9994222, 7267859, 9946608, 415421, 12420, 101, 36)


def default() -> JobConfig:
    """INT4 QAT (the paper's scheme: per-table symmetric embeddings, per-row MLP weights) on the bundled synthetic
    data, with a DLRM small enough for two CPU cores. Global batch 128 and SGD as in the paper; the embedding
    learning rate is 10x the paper's so that 600k rows overfit within 1-2 epochs as Kaggle's 45M rows do at 0.1."""
    return JobConfig(name="default", optim=OptimConfig(lr=0.1, embedding_lr=1.0), run_dir="runs/default")


def default_fp32() -> JobConfig:
    """The default job without quantization: the FP32 baseline."""
    return dataclasses.replace(default(), name="default_fp32", quant_mode="fp32", run_dir="runs/default_fp32")


def default_int8() -> JobConfig:
    """INT8 QAT of tables and MLPs."""
    return dataclasses.replace(default(), name="default_int8", quant=QuantSpec(embedding_bits=8, mlp_bits=8),
                               run_dir="runs/default_int8")


def default_ptq4() -> JobConfig:
    """FP32 training, INT4 post-training quantization (no QAT) for contrast; also reports the FP32 metrics."""
    return dataclasses.replace(default(), name="default_ptq4", quant_mode="ptq", run_dir="runs/default_ptq4")


def default_int4_row() -> JobConfig:
    """INT4 QAT with FBGEMM's native per-row asymmetric grid instead of the paper's per-table one."""
    return dataclasses.replace(default(), name="default_int4_row", quant=QuantSpec(granularity="row"),
                               run_dir="runs/default_int4_row")


TINY_CARDINALITIES = (3, 4, 10, 14, 24, 27, 60, 100, 200, 300, 600, 1000, 1500, 2500, 5000, 8000, 100, 200, 300,
                      400, 500, 600, 700, 800, 900, 1000)


def tiny() -> JobConfig:
    """A seconds-long job on a small synthetic dataset, for smoke and end-to-end tests."""
    return JobConfig(
        name="tiny",
        model=ModelConfig(num_embeddings=TINY_CARDINALITIES, dense_arch=(32, 16), over_arch=(32, 1)),
        data=DataConfig(batch_size=128, eval_batch_size=1024,
                        synthetic=SyntheticConfig(num_train=16_384, num_val=4096, num_test=4096,
                                                  cardinalities=TINY_CARDINALITIES, row_group_size=4096)),
        epochs=2,
        optim=OptimConfig(lr=0.1, embedding_lr=1.0),
        quant=QuantSpec(scale_update_every=20),
        run_dir="runs/tiny",
    )


def kaggle() -> JobConfig:
    """INT4 QAT on Criteo Kaggle, MLPerf shapes: dim 16, bottom 13-512-256-64-16, top 512-256-1, batch 128 per trainer."""
    return JobConfig(
        name="kaggle",
        model=ModelConfig(embedding_dim=16, num_embeddings=KAGGLE_CARDINALITIES,
                          dense_arch=(512, 256, 64, 16), over_arch=(512, 256, 1)),
        data=DataConfig(data_dir="data/kaggle", batch_size=128, eval_batch_size=16384),
        quant=QuantSpec(scale_update_every=200),
        run_dir="runs/kaggle",
    )


def kaggle_sample() -> JobConfig:
    """INT4 QAT on the real 137k-row Criteo Kaggle sample (``../shared/data/criteo-real``), converted with
    ``--split kaggle --vocab-min-count 1`` into ``data/kaggle_sample`` (``make kaggle-sample``): every id seen in
    training gets a row (the table sizes come from the vocabulary), ``kaggle``'s MLPs and dimension drawn as
    facebookresearch/dlrm draws them (``model.mlp_init=dlrm``, as the reference this sample is compared with:
    ``bench/reference_curves.py``), global batch 256, SGD 0.1, 5 epochs."""
    return dataclasses.replace(
        kaggle(), name="kaggle_sample",
        model=dataclasses.replace(kaggle().model, num_embeddings=KAGGLE_SAMPLE_CARDINALITIES, mlp_init="dlrm"),
        data=DataConfig(data_dir="data/kaggle_sample", vocab_dir="data/kaggle_sample/vocab", batch_size=128,
                        eval_batch_size=16384),
        epochs=5, run_dir="runs/kaggle_sample")


def kaggle_sample_fp32() -> JobConfig:
    """``kaggle_sample`` without quantization."""
    return dataclasses.replace(kaggle_sample(), name="kaggle_sample_fp32", quant_mode="fp32",
                               run_dir="runs/kaggle_sample_fp32")


def terabyte() -> JobConfig:
    """INT4 QAT on Criteo Terabyte (10M cap), MLPerf shapes: dim 64, bottom 13-512-256-64, top 512-512-256-1, batch 2048."""
    return JobConfig(
        name="terabyte",
        model=ModelConfig(embedding_dim=64, num_embeddings=TERABYTE_CARDINALITIES,
                          dense_arch=(512, 256, 64), over_arch=(512, 512, 256, 1)),
        data=DataConfig(data_dir="data/terabyte", batch_size=2048, eval_batch_size=16384),
        epochs=1,
        quant=QuantSpec(scale_update_every=1000),
        run_dir="runs/terabyte",
    )


def terabyte_synthetic() -> JobConfig:
    """The ``terabyte`` model (49.1M rows, dim 64, 12.6 GB FP32) on generated data with the Terabyte cardinalities
    (Zipf ids, so that many rows are touched): 600 steps of global batch 4096 at world size 2, a checkpoint every
    250 steps, then export. What ``bench.scale_run`` runs on one 23 GB, 2-core machine."""
    rows_per_step = 2 * 2048
    return dataclasses.replace(
        terabyte(), name="terabyte_synthetic",
        data=DataConfig(data_dir="", batch_size=2048, eval_batch_size=16384,
                        synthetic=SyntheticConfig(num_train=600 * rows_per_step, num_val=32_768, num_test=65_536,
                                                  cardinalities=TERABYTE_CARDINALITIES)),
        checkpoint_every_steps=250, checkpoint_keep=1, run_dir="runs/terabyte_synthetic")


def kaggle_fp32() -> JobConfig:
    """Criteo Kaggle without quantization (the paper's FP32 row)."""
    return dataclasses.replace(kaggle(), name="kaggle_fp32", quant_mode="fp32", run_dir="runs/kaggle_fp32")


def terabyte_fp32() -> JobConfig:
    """Criteo Terabyte without quantization."""
    return dataclasses.replace(terabyte(), name="terabyte_fp32", quant_mode="fp32", run_dir="runs/terabyte_fp32")


def dlrm_v2() -> JobConfig:
    """MLPerf DLRMv2's model (TorchRec's ``DLRM_DCN``): 26 tables of dim 128, bottom MLP 13-512-256-128, 3 DCNv2
    cross layers of rank 512 over the 27 vectors (10.6M weights, quantized like the MLPs), top MLP
    1024-1024-512-256-1, INT4 QAT; the tables capped at ``DLRMV2_CAP`` rows so that 2 ranks hold them on this
    machine, on synthetic data with those cardinalities. The job's SGD by default (MLPerf trains it with Adagrad: ``--set
    optim.embedding=rowwise_adagrad optim.dense=adagrad``): 200 steps of global batch 2048, then export."""
    cards = tuple(min(n, DLRMV2_CAP) for n in DLRMV2_CARDINALITIES)
    return JobConfig(
        name="dlrm_v2",
        model=ModelConfig(arch="dcn", embedding_dim=128, num_embeddings=cards, dense_arch=(512, 256, 128),
                          over_arch=(1024, 1024, 512, 256, 1), dcn_num_layers=3, dcn_low_rank_dim=512),
        data=DataConfig(batch_size=1024, eval_batch_size=8192,
                        synthetic=SyntheticConfig(num_train=200 * 2048, num_val=16_384, num_test=32_768,
                                                  cardinalities=cards)),
        epochs=1,
        optim=OptimConfig(lr=0.1, embedding_lr=0.1),
        quant=QuantSpec(scale_update_every=100),
        run_dir="runs/dlrm_v2",
    )


def dlrm_v2_tiny() -> JobConfig:
    """``dlrm_v2``'s architecture (DLRM_DCN, INT4 QAT of tables, MLPs and cross layers) at ``tiny``'s sizes, for
    tests: dim 16, bottom 13-32-16, 2 cross layers of rank 8, top 32-1."""
    base = tiny()
    return dataclasses.replace(
        base, name="dlrm_v2_tiny",
        model=ModelConfig(arch="dcn", num_embeddings=TINY_CARDINALITIES, dense_arch=(32, 16), over_arch=(32, 1),
                          dcn_num_layers=2, dcn_low_rank_dim=8),
        run_dir="runs/dlrm_v2_tiny")


CONFIGS: dict[str, Callable[[], JobConfig]] = {
    f.__name__: f for f in (default, default_fp32, default_int8, default_ptq4, default_int4_row, tiny, kaggle,
                            kaggle_fp32, kaggle_sample, kaggle_sample_fp32, terabyte, terabyte_fp32,
                            terabyte_synthetic, dlrm_v2, dlrm_v2_tiny)}


def get_config(name: str) -> JobConfig:
    try:
        return CONFIGS[name]()
    except KeyError:
        raise ValueError(f"unknown config {name!r}; choose one of {', '.join(sorted(CONFIGS))}") from None

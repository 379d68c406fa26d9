"""Named experiments. Each returns a complete ``JobConfig``; the CLI picks one with ``--config NAME``."""

from __future__ import annotations

from typing import Callable

from datasets.synthetic import SyntheticConfig
from pipeline.config import DataConfig, JobConfig, ModelConfig

# MLPerf DLRM shapes (REFERENCE.md §3).
KAGGLE_CARDINALITIES = (1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
                        5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572)
TERABYTE_CARDINALITIES = (9980333, 36084, 17217, 7378, 20134, 3, 7112, 1442, 61, 9758201, 1333352, 313829, 10, 2208,
                          11156, 122, 4, 970, 14, 9994222, 7267859, 9946608, 415421, 12420, 101, 36)


def default() -> JobConfig:
    """The bundled synthetic data and a DLRM small enough for two CPU cores."""
    return JobConfig(name="default", run_dir="runs/default")


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
        run_dir="runs/tiny",
    )


def kaggle() -> JobConfig:
    """Criteo Kaggle, MLPerf shapes: dim 16, bottom 13-512-256-64-16, top 512-256-1, batch 128 per trainer."""
    return JobConfig(
        name="kaggle",
        model=ModelConfig(embedding_dim=16, num_embeddings=KAGGLE_CARDINALITIES,
                          dense_arch=(512, 256, 64, 16), over_arch=(512, 256, 1)),
        data=DataConfig(data_dir="data/kaggle", batch_size=128, eval_batch_size=16384),
        run_dir="runs/kaggle",
    )


def terabyte() -> JobConfig:
    """Criteo Terabyte (10M cap), MLPerf shapes: dim 64, bottom 13-512-256-64, top 512-512-256-1, batch 2048."""
    return JobConfig(
        name="terabyte",
        model=ModelConfig(embedding_dim=64, num_embeddings=TERABYTE_CARDINALITIES,
                          dense_arch=(512, 256, 64), over_arch=(512, 512, 256, 1)),
        data=DataConfig(data_dir="data/terabyte", batch_size=2048, eval_batch_size=16384),
        epochs=1,
        run_dir="runs/terabyte",
    )


CONFIGS: dict[str, Callable[[], JobConfig]] = {f.__name__: f for f in (default, tiny, kaggle, terabyte)}


def get_config(name: str) -> JobConfig:
    try:
        return CONFIGS[name]()
    except KeyError:
        raise ValueError(f"unknown config {name!r}; choose one of {', '.join(sorted(CONFIGS))}") from None

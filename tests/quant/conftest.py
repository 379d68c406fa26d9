"""A tiny integer DLRM converted in one process, and its export (TorchScript artifact, torch.export program and rows
file), for the tests of what is served (``test_export.py``, ``test_program.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dqrm.datasets.schema import FEATURE_NAMES
from dqrm.pipeline.model import build_dlrm
from dqrm.quant.api import QATConfig, QuantSpec, quantize_
from dqrm.quant.export import export
from tests.helpers import CARDS, MODEL


@pytest.fixture(scope="session")
def integer_dlrm():
    """The row grid needs no training to convert (no table scales), so the float model's initial state will do."""
    torch.manual_seed(0)
    model = build_dlrm(MODEL, torch.device("cpu"), table_device=torch.device("cpu"))
    return quantize_(model, QATConfig(spec=QuantSpec(granularity="row", mlp_bits=4), step="convert"))


@pytest.fixture(scope="session")
def exported(integer_dlrm, tmp_path_factory) -> Path:
    """``model_int4.pt`` with its ``.pt2`` and ``.rows`` beside it, no shipped files; tests must not modify it."""
    return export(integer_dlrm, FEATURE_NAMES, tmp_path_factory.mktemp("exported") / "model_int4.pt",
                  {"num_embeddings": list(CARDS)})


@pytest.fixture
def out_of_range_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(dense, values, lengths, i)``: 4 samples of one to three ids per bag (key-major lengths, as the reader
    makes them), every id in its table but ``values[i]``, which is past the end of table 0."""
    gen = torch.Generator().manual_seed(1)
    batch = 4
    lengths = torch.randint(1, 4, (len(CARDS) * batch,), generator=gen, dtype=torch.int32)
    tables = torch.repeat_interleave(torch.tensor(CARDS).repeat_interleave(batch), lengths.long())
    values = (torch.rand(len(tables), generator=gen) * tables).long()
    i = int(lengths[0]) - 1  # the last id of sample 0's bag in table 0
    values[i] = CARDS[0] + 4
    return torch.randn(batch, 13, generator=gen), values, lengths, i


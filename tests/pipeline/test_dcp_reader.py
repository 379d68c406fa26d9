"""The bounded DCP reader streams only what it can copy exactly and leaves the rest to DCP's own reader."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp

import dqrm.pipeline.dcp_reader as dcp_reader
from dqrm.pipeline.dcp_reader import BoundedFileSystemReader

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled, unavailable or uninitialized")


def _load_back(saved: dict[str, torch.Tensor], path, dtype: torch.dtype | None = None) -> tuple[dict, int]:
    """Save ``saved`` with DCP, load it into zeros (of ``dtype`` where given) through the bounded reader; the loaded
    tensors and how many items the reader streamed."""
    dcp.save(saved, checkpoint_id=str(path))
    dest = {k: torch.zeros(v.shape, dtype=dtype or v.dtype) for k, v in saved.items()}
    reader = BoundedFileSystemReader(str(path))
    dcp.load(dest, checkpoint_id=str(path), storage_reader=reader)
    return dest, reader.streamed_items


def test_a_transposed_save_goes_to_dcp_and_comes_back_as_columns(tmp_path):
    """DCP saves a transposed tensor with its strides; its record holds the rows of the original, so reading the
    record in order would give rows where the tensor has columns."""
    saved = {"transposed": torch.arange(9.0).view(3, 3).t(), "plain": torch.randn(5, 4)}
    assert not saved["transposed"].is_contiguous()
    loaded, streamed = _load_back(saved, tmp_path)
    assert torch.equal(loaded["transposed"], torch.tensor([[0.0, 3, 6], [1, 4, 7], [2, 5, 8]]))
    assert torch.equal(loaded["plain"], saved["plain"])
    assert streamed == 1  # the plain one


def test_bfloat16_tensors_stream_bit_for_bit(tmp_path):
    """numpy has no bfloat16, so the reader reads into the destination's bytes rather than into a numpy array."""
    saved = {"table": torch.randn(6, 3).to(torch.bfloat16), "bias": torch.randn(7).to(torch.bfloat16)}
    loaded, streamed = _load_back(saved, tmp_path)
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())
    assert streamed == 2


def test_a_dtype_the_load_converts_goes_to_dcp(tmp_path):
    """Saved FP32 loaded into bfloat16 needs a conversion, which DCP's reader does (copy_ rounds); bytes copied as
    they are would be wrong."""
    saved = {"table": torch.randn(6, 3), "bias": torch.randn(7)}
    loaded, streamed = _load_back(saved, tmp_path, dtype=torch.bfloat16)
    assert all(torch.equal(loaded[k], v.to(torch.bfloat16)) for k, v in saved.items())
    assert streamed == 0


def test_a_file_in_another_byte_order_goes_to_dcp(tmp_path, monkeypatch):
    """torch.save records the writer's byte order and torch.load swaps the bytes where it differs; the bounded copy
    does not swap, so it leaves such a file to DCP. Here the machine pretends to be big-endian."""
    monkeypatch.setattr(dcp_reader, "_NATIVE_BYTEORDER", b"big")
    saved = {"table": torch.randn(6, 3)}
    loaded, streamed = _load_back(saved, tmp_path)
    assert torch.equal(loaded["table"], saved["table"])
    assert streamed == 0

"""Silences library messages that every run would print and that say nothing about the run (entry points call
``quiet_library_noise`` first)."""

from __future__ import annotations

import logging
import warnings


def quiet_library_noise() -> None:
    """- torch.fx logs a deprecation notice the first time TorchRec calls ``is_fx_tracing`` (TorchRec's code, not
      ours; it changes nothing here).
    - PyTorch warns that FBGEMM's CPU dense TBE (data-parallel tables) has no registered autograd kernel and that
      backprop through it "may" be wrong: its gradients are checked here against a plain TorchRec model, bit for bit
      across world sizes and to 1e-5 against the straight-through reference (``tests/quant/test_embedding_qat.py``,
      ``tests/sharding/test_comm.py``).
    - ShardedTensor's deprecation notice: TorchRec's sharded state dict is made of them, and checkpoints and the
      shard-local export read the shards through them.
    - Two TorchScript notes printed while the exported model is scripted (about annotations in FBGEMM's and
      TorchRec's modules); the artifact is checked against the evaluated model after every export.
    - TorchRec's planner on its dry-run memory estimate (a heuristic reservation it plans to replace; our tables
      are far from the memory limits it guards) and, once per data-parallel table, that cache parameters do not
      apply to it (we set none).
    - DDP's deprecation of ``broadcast_buffers``, which TorchRec passes when it wraps the data-parallel parts."""
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    for name, record_filter in _LOG_FILTERS.items():  # the same objects each call: a logger keeps one of each
        logging.getLogger(name).addFilter(record_filter)
    warnings.filterwarnings("ignore", message=r"HeuristicalStorageReservation is known to cause issues",
                            category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"`broadcast_buffers` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"fbgemm::dense_embedding_codegen_lookup_function: an autograd kernel "
                                              r"was not registered")
    warnings.filterwarnings("ignore", message=r"Please use DTensor instead and we are deprecating ShardedTensor",
                            category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"The TorchScript type system doesn't support instance-level "
                                              r"annotations on empty non-base types")
    warnings.filterwarnings("ignore", message=r"TorchScript will treat type annotations of Tensor dtype-specific "
                                              r"subtypes")


class _Without(logging.Filter):
    """Drops the records whose message contains ``text``; the logger's other records pass."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


_LOG_FILTERS = {
    "torchrec.distributed.planner.storage_reservations": _Without("dense tensor size calculation in dry run"),
    "torchrec.distributed.utils": _Without("caching params will be ignored"),
}

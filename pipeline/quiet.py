"""Silences two library messages that every run would print and that say nothing about the run (entry points
call ``quiet_library_noise`` first)."""

from __future__ import annotations

import logging
import warnings


def quiet_library_noise() -> None:
    """- torch.fx logs a deprecation notice the first time TorchRec calls ``is_fx_tracing`` (TorchRec's code, not
      ours; it changes nothing here).
    - PyTorch warns that FBGEMM's CPU dense TBE (data-parallel tables) has no registered autograd kernel and that
      backprop through it "may" be wrong: its gradients are checked here against a plain TorchRec model, bit for bit
      across world sizes and to 1e-5 against the straight-through reference (``tests/quant/test_embedding_qat.py``,
      ``tests/sharding/test_comm.py``)."""
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"fbgemm::dense_embedding_codegen_lookup_function: an autograd kernel "
                                              r"was not registered")

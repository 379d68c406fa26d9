"""The torch.export program (``model_int4.pt2``) as served: its logits are the TorchScript artifact's bit for bit,
and it leaves its caller's tensors alone. (On trained models of every grid and width, loaded in a fresh process:
``tests/quant/test_embedding_qat.py``.)"""

from __future__ import annotations

import torch

from dqrm.quant.export import load_with_manifest
from dqrm.quant.program import program_path
from tests.helpers import CARDS


def test_program_leaves_the_callers_ids_alone(exported, out_of_range_batch):
    """FBGEMM's bounds check sets an out-of-range id to 0 in place; exported, that write reaches the caller's
    ``values`` unless the program checks a copy. The logits stay the artifact's, the id read as row 0."""
    dense, values, lengths, i = out_of_range_batch
    inputs = [dense.clone(), values.clone(), lengths.clone()]
    program, _ = load_with_manifest(program_path(exported))
    artifact, _ = load_with_manifest(exported)
    with torch.no_grad():
        served = program(*inputs)
        assert torch.equal(inputs[1], values) and values[i] == CARDS[0] + 4  # still out of range
        assert torch.equal(inputs[0], dense) and torch.equal(inputs[2], lengths)
        assert torch.equal(program(*inputs), served)
        zeroed = values.clone()
        zeroed[i] = 0
        assert torch.equal(program(dense, zeroed, lengths), served)  # what FBGEMM's bounds check reads
        assert torch.equal(artifact(dense, values.clone(), lengths), served)

"""The torch.export program (``model_int4.pt2``) as served: its logits are the TorchScript artifact's bit for bit,
and it leaves its caller's tensors alone. (On trained models of every grid and width, loaded in a fresh process:
``tests/quant/test_embedding_qat.py``.)"""

from __future__ import annotations

import torch

from dqrm.quant.export import load_with_manifest
from dqrm.quant.program import program_path
from tests.helpers import served_leaving_inputs_alone


def test_program_leaves_the_callers_ids_alone(exported, out_of_range_batch):
    """FBGEMM's bounds check sets an out-of-range id to 0 in place; exported, that write reaches the caller's
    ``values`` unless the program checks a copy. The logits stay the artifact's, the id read as row 0."""
    program, _ = load_with_manifest(program_path(exported))
    artifact, _ = load_with_manifest(exported)
    served = served_leaving_inputs_alone(program, out_of_range_batch)
    dense, values, lengths, _ = out_of_range_batch
    with torch.no_grad():
        assert torch.equal(artifact(dense, values.clone(), lengths), served)

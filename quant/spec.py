"""``QuantSpec``: the integer grid a model is trained for (QAT) and converted to (FBGEMM rows, integer MLPs)."""

from __future__ import annotations

import dataclasses

from dqrm.quant.fake_quant import SUPPORTED_BITS

MLP_COMPUTE = ("float32", "bfloat16")


@dataclasses.dataclass(kw_only=True)
class QuantSpec:
    """The integer grid a model is trained for and converted to."""

    embedding_bits: int = 4
    """Bits of every embedding table (2, 4 or 8; 0 keeps tables FP32)."""
    granularity: str = "table"
    """'table': the paper's symmetric per-table scale; 'row': FBGEMM's asymmetric per-row scale and bias."""
    scale_update_every: int = 200
    """Training steps between recomputations of the per-table scale (table granularity)."""
    table_bits: dict[str, int] = dataclasses.field(default_factory=dict)
    """Per-table bit widths overriding embedding_bits, e.g. ``--set quant.table_bits=t_cat_3:8,t_cat_5:2``."""
    mlp_bits: int = 4
    """Bits of the MLP weights, one scale per output row (4 or 8; 0 keeps MLPs FP32)."""
    mlp_compute: str = "float32"
    """What the MLP GEMMs compute in, in training, evaluation and the artifact alike: 'float32', or 'bfloat16'
    (activations, weights and biases rounded to bfloat16, fp32 accumulation inside the kernel; the last layer, whose
    one output is the logit, stays float32). bfloat16 serves faster on CPUs with AVX512-BF16 or AMX and on GPUs, and
    the artifact then runs the very kernel training evaluated (``quant.mlp_qat``)."""
    row_alignment: int = 1
    """Bytes every exported table row (fp16 scale and bias, then codes) is padded to. 1 is FBGEMM's CPU default; on
    CPU it measured faster than TorchRec's 16 at INT8 and INT4 and within 4 % at INT2 (bench/row_alignment.py), and
    16 pads INT4 rows of dimension 16 from 12 to 16 bytes; set 16 for an artifact served by FBGEMM's CUDA kernels."""

    budget_bytes: int = 0
    """Bytes the served artifact may take (tables with scale, bias and padding, MLPs, the row map): each table's
    bits and kept rows are then chosen by measured sensitivity (``quant.budget``); 0 = no budget."""
    budget_ratio: float = 0.0
    """The budget as a fraction of the FP32 model's bytes (e.g. ``--set quant.budget_ratio=0.0833`` for 1/12); 0 = none. Not with budget_bytes."""
    budget_warmup_steps: int = 1000
    """Training steps (INT8 QAT) before the budget search measures each table's sensitivity."""
    budget_eval_rows: int = 16384
    """Validation rows each sensitivity measurement scores (all ranks together)."""

    def __post_init__(self) -> None:
        if self.budget_bytes < 0 or not 0.0 <= self.budget_ratio < 1.0:
            raise ValueError(f"budget_bytes must be >= 0 and budget_ratio in [0, 1), got {self.budget_bytes} and "
                             f"{self.budget_ratio}")
        if self.budget_bytes and self.budget_ratio:
            raise ValueError("set one of budget_bytes and budget_ratio, not both")
        if self.budget_warmup_steps < 1 or self.budget_eval_rows < 1:
            raise ValueError(f"budget_warmup_steps and budget_eval_rows must be >= 1, got {self.budget_warmup_steps} "
                             f"and {self.budget_eval_rows}")
        for name, b in [("embedding_bits", self.embedding_bits), *self.table_bits.items()]:
            if b != 0 and b not in SUPPORTED_BITS:
                raise ValueError(f"{name}: {b} bits unsupported; FBGEMM offers {SUPPORTED_BITS} (or 0 for FP32)")
        if self.mlp_bits not in (0, 4, 8):
            raise ValueError(f"mlp_bits must be 0, 4 or 8, got {self.mlp_bits}")
        if self.mlp_compute not in MLP_COMPUTE:
            raise ValueError(f"mlp_compute must be one of {MLP_COMPUTE}, got {self.mlp_compute!r}")
        if self.mlp_compute != "float32" and not self.mlp_bits:
            raise ValueError(f"mlp_compute={self.mlp_compute} needs integer MLP weights (mlp_bits 4 or 8): the "
                             f"bfloat16 layers are the fake-quantized ones")
        if self.granularity not in ("table", "row"):
            raise ValueError(f"granularity must be 'table' or 'row', got {self.granularity!r}")
        if self.row_alignment < 1 or self.row_alignment & (self.row_alignment - 1):
            raise ValueError(f"row_alignment must be a power of two, got {self.row_alignment}")
        if self.scale_update_every < 1:
            raise ValueError(f"scale_update_every must be >= 1, got {self.scale_update_every}")

    @property
    def has_budget(self) -> bool:
        return bool(self.budget_bytes or self.budget_ratio)

    def bits_for(self, table: str) -> int:
        return self.table_bits.get(table, self.embedding_bits)

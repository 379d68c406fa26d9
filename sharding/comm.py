"""``CommConfig``: how gradients and embeddings travel between ranks, and the verbs that apply it to a sharded DLRM.

* model-parallel all-to-alls: TorchRec's qcomms (``QCommsConfig``), FP16 or INT8, chosen by ``CommConfig.qcomms``
  for the gradients (backward) and ``CommConfig.qcomms_forward`` for the pooled embeddings (forward, off by default:
  a compressed forward also compresses evaluation, so the served model would no longer be the evaluated one):
  ``sharders_for``;
* data-parallel embedding tables: only the rows a batch touched (``sharding.touched_rows``), optionally INT8
  (``dp_tables``);
* MLP gradients: the stock FP16 hook, or INT8 with error feedback, sent by all-gather (``sharding.ddp_hooks``) or by
  reduce-scatter and all-gather (``sharding.int8_allreduce``) (``dense``).

``compress_gradients`` registers those hooks. The DDP objects they attach to are private attributes of DMP and of
the sharded EBC; this module is the only one that reaches them (besides ``sharding.tbe`` for the kernels).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dqrm.sharding.byte_counter import ByteCounter
from dqrm.sharding.ddp_hooks import Fp32AllReduceCount, Int8ErrorFeedbackHook, fp16_hook
from dqrm.sharding.int8_allreduce import Int8ReduceScatterHook
from dqrm.sharding.tbe import find_tbes
from dqrm.sharding.touched_rows import TouchedRowsHook

QCOMMS = ("none", "fp16", "int8")
DP_TABLES = ("dense", "touched", "touched_int8")
DENSE = ("fp32", "fp16", "int8_ef", "int8_rs_ag")


@dataclasses.dataclass(kw_only=True)
class CommConfig:
    """How gradients and embeddings travel between ranks."""

    qcomms: str = "none"
    """Precision of TorchRec's model-parallel all-to-alls of embedding gradients (backward): none (FP32), fp16, int8."""
    qcomms_forward: str = "none"
    """Precision of the forward all-to-alls (pooled embeddings): none (FP32), fp16 or int8. Anything but none also
    quantizes what evaluation sees, which the exported model does not reproduce."""
    dp_tables: str = "dense"
    """Data-parallel tables' gradients: dense (DDP all-reduce), touched (only touched rows, lossless),
    touched_int8 (touched rows, INT8 with each rank's own step per row: every touched row moves, a rare row with a
    small gradient as much as a frequent one with a large gradient, each within half its own step)."""
    dp_whole_max_rows: int = 1024
    """With touched-row exchange: a data-parallel kernel holding at most this many rows (all its tables together) is
    all-reduced whole instead (0: every kernel exchanges touched rows). A batch touches most rows of such small
    tables, so their touched rows are about as many bytes as the whole gradient, and the exchange's two collectives
    cost more than one small all-reduce (the Kaggle plan's 7 data-parallel tables, 101 rows: about 10% of a step)."""
    dense: str = "fp32"
    """MLP gradients: fp32 (DDP all-reduce), fp16 (stock hook), int8_ef (per-row INT8 with error feedback, one
    all-gather: saves 8/W x at W ranks, nothing from W = 8), int8_rs_ag (the same codec through an INT8
    reduce-scatter and all-gather, error feedback in both roundings: about 4x fewer bytes at any W)."""
    count_bytes: bool = True
    """Count the bytes each rank hands to collectives (reported per training step in the summary)."""

    def __post_init__(self) -> None:
        for name, allowed in (("qcomms", QCOMMS), ("qcomms_forward", QCOMMS), ("dp_tables", DP_TABLES),
                              ("dense", DENSE)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"comm.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.dp_whole_max_rows < 0:
            raise ValueError(f"comm.dp_whole_max_rows must be at least 0, got {self.dp_whole_max_rows}")


def sharders_for(cfg: CommConfig, device: torch.device) -> list:
    """TorchRec sharders carrying the qcomms codecs (the planner and DMP must get the same list)."""
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.fbgemm_qcomm_codec import CommType, QCommsConfig, get_qcomm_codecs_registry
    from torchrec.distributed.sharding_plan import get_default_sharders

    if cfg.qcomms == "none" and cfg.qcomms_forward == "none":
        return get_default_sharders()
    precision = {"none": CommType.FP32, "fp16": CommType.FP16, "int8": CommType.INT8}
    registry = get_qcomm_codecs_registry(QCommsConfig(forward_precision=precision[cfg.qcomms_forward],
                                                      backward_precision=precision[cfg.qcomms]), device=device)
    return [EmbeddingBagCollectionSharder(qcomm_codecs_registry=registry)]


def check_qcomms(cfg: CommConfig, plan_rows: list[dict]) -> None:
    """Refuse the combinations TorchRec cannot run, before any collective hangs on them."""
    if "int8" in (cfg.qcomms, cfg.qcomms_forward) and any(r["sharding"] in ("row_wise", "table_row_wise")
                                                          for r in plan_rows):
        raise NotImplementedError("comm.qcomms(_forward)=int8 is unsupported with row-wise tables (TorchRec's INT8 "
                                  "codec fails on the row-wise reduce-scatter); use fp16 or table-wise placement")


def _dense_ddp(model: nn.Module) -> DistributedDataParallel | None:
    wrapped = getattr(model, "_dmp_wrapped_module", None)
    return wrapped if isinstance(wrapped, DistributedDataParallel) else None


def _dp_table_ddps(model: nn.Module) -> list[DistributedDataParallel]:
    out = []
    for module in model.modules():
        lookups = getattr(module, "_lookups", None)
        if isinstance(lookups, list):
            out += [lk for lk in lookups if isinstance(lk, DistributedDataParallel)]
    return out


def compress_gradients(model: nn.Module, cfg: CommConfig, counter: ByteCounter | None = None) -> list:
    """Register the DDP comm hooks ``cfg`` asks for on a DMP model (call once, before training; an FP32 exchange
    keeps DDP's own all-reduce, counted beside it when ``counter`` is given); returns the hooks that keep state: the
    INT8 error-feedback hook, either kind (checkpointed with the model), and the touched-rows hooks. Collective with
    int8_rs_ag (it makes the group its all-gathers use)."""
    hooks: list[Int8ErrorFeedbackHook | TouchedRowsHook] = []
    dense = _dense_ddp(model)
    if dense is not None:
        if cfg.dense == "fp16":
            dense.register_comm_hook(dense.process_group, fp16_hook(counter))
        elif cfg.dense == "int8_ef":
            int8 = Int8ErrorFeedbackHook(counter, dict(dense.module.named_parameters()))
            dense.register_comm_hook(dense.process_group, int8.__call__)
            hooks.append(int8)
        elif cfg.dense == "int8_rs_ag":
            gather_group = dist.new_group(dist.get_process_group_ranks(dense.process_group or dist.group.WORLD))
            int8 = Int8ReduceScatterHook(counter, dict(dense.module.named_parameters()), gather_group=gather_group)
            dense.register_comm_hook(dense.process_group, int8.__call__)
            hooks.append(int8)
        elif counter is not None:
            Fp32AllReduceCount(counter, "all_reduce fp32 (MLP)", dense)
    layouts = {}
    for lay in find_tbes(model):
        weights = getattr(lay.tbe, "weights", None)
        if isinstance(weights, torch.Tensor):
            layouts[id(weights)] = lay
    for ddp in _dp_table_ddps(model):
        if cfg.dp_tables == "dense":
            if counter is not None:
                Fp32AllReduceCount(counter, "all_reduce fp32 (DP tables)", ddp)
        else:
            own = {id(p): layouts[id(p)] for p in ddp.module.parameters() if id(p) in layouts}
            own = {k: lay for k, lay in own.items() if sum(lay.local_rows) > cfg.dp_whole_max_rows}
            hook = TouchedRowsHook(own, cfg.dp_tables == "touched_int8", counter)
            ddp.register_comm_hook(ddp.process_group, hook.__call__)
            hooks.append(hook)
    return hooks

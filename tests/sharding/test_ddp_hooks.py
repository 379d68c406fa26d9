"""Counting the FP32 all-reduce leaves DDP's own all-reduce in place (no comm hook: DDP scales a gradient by 1/W in
one of two ways, which round differently unless W is a power of two, and keeps doing so) and counts one all-reduce
of every gradient per synced backward, none under ``no_sync``, at world sizes 2 and 3 (gloo). The INT8 hooks'
error-feedback residuals resume at another world size through the job's Checkpointer, carried over as their mean."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.dist_utils import run_distributed

STEPS = 3
# How the gradients reach DDP's buckets: (gradient_as_bucket_view, how the optimizer clears them between steps).
# TorchRec's DMP has bucket views and its CombinedOptimizer zeroes in place; "mixed" drops one parameter's gradient
# and zeroes the others', so one bucket holds gradients of both kinds.
MODES = [(True, "zero"), (True, "none"), (True, "mixed"), (False, "zero")]


def _grads(rank, world_size, counted: bool, bucket_view: bool, clear: str) -> tuple[list[torch.Tensor], dict]:
    from torch.nn.parallel import DistributedDataParallel

    from dqrm.sharding.byte_counter import ByteCounter
    from dqrm.sharding.ddp_hooks import Fp32AllReduceCount

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    ddp = DistributedDataParallel(net, gradient_as_bucket_view=bucket_view, bucket_cap_mb=0.01)  # several buckets
    counter = ByteCounter()
    if counted:
        Fp32AllReduceCount(counter, "all_reduce fp32 (MLP)", ddp)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(rank)
    out = []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=clear == "none")
        if clear == "mixed":
            net[0].weight.grad = None
        ddp(torch.randn(32, 64, generator=gen)).square().sum().backward()
        out += [p.grad.clone() for p in net.parameters()]
        opt.step()
    with ddp.no_sync():  # a backward that does not all-reduce is not counted
        ddp(torch.randn(32, 64, generator=gen)).sum().backward()
    return out, dict(counter.bytes)


def _compare(rank, world_size) -> dict:
    """Per mode, how many gradient values (all steps, all parameters) differ with the counter and without, and the
    counts of each."""
    out = {}
    for bucket_view, clear in MODES:
        plain, plain_bytes = _grads(rank, world_size, False, bucket_view, clear)
        counted, counted_bytes = _grads(rank, world_size, True, bucket_view, clear)
        out[bucket_view, clear] = (sum(int((a != b).sum()) for a, b in zip(plain, counted)), plain_bytes,
                                   counted_bytes)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_fp32_count_leaves_ddp_alone_and_counts_each_synced_backward(world):
    n = 2 * (64 * 64 + 64)  # gradient elements, float32
    for per_mode in run_distributed(_compare, world_size=world):
        for mode, (differ, plain_bytes, counted_bytes) in per_mode.items():
            assert differ == 0, mode
            assert plain_bytes == {}
            assert counted_bytes == {"all_reduce fp32 (MLP)": pytest.approx(STEPS * 2 * (world - 1) * 4 * n / world)}


# INT8 error-feedback residuals through the job's Checkpointer at another world size.

KINDS = ("int8_ef", "int8_rs_ag")


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("dqrm.sharding") or record.levelno >= logging.WARNING:  # not "resumed from ..."
            self.messages.append(record.getMessage())


def _int8_ddp(kind: str, world_size: int):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from dqrm.sharding.ddp_hooks import Int8ErrorFeedbackHook
    from dqrm.sharding.int8_allreduce import Int8ReduceScatterHook

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 4))
    ddp = DistributedDataParallel(net)
    if kind == "int8_ef":
        hook = Int8ErrorFeedbackHook(None, dict(net.named_parameters()))
    else:
        hook = Int8ReduceScatterHook(None, dict(net.named_parameters()),
                                     gather_group=dist.new_group(list(range(world_size))))
    ddp.register_comm_hook(None, hook.__call__)
    return ddp, hook, torch.optim.SGD(net.parameters(), lr=0.1)


def _residuals(hook) -> dict[str, torch.Tensor]:
    """This rank's carried errors by parameter name."""
    return {key.partition(".")[2]: value.clone() for key, value in hook.state_dict().items()}


def _job(rank, world_size, resume_from: str | None, save_to: str):
    """Per hook kind, a short job: resumes from ``resume_from`` (if given; written at another world size), trains
    two steps, checkpoints into ``save_to``; then a fresh job at this world size resumes from that checkpoint.
    Returns the residuals after each resume and at the save, and what the resumes logged about them."""
    from dqrm.pipeline.checkpoint import Checkpointer

    messages = _Messages()
    for name in ("dqrm.sharding", "dqrm.pipeline"):
        logging.getLogger(name).addHandler(messages)
        logging.getLogger(name).setLevel(logging.INFO)
    gen = torch.Generator().manual_seed(100 * world_size + rank)
    out = {}
    for kind in KINDS:
        ddp, hook, opt = _int8_ddp(kind, world_size)
        got = {}
        if resume_from is not None:
            messages.messages.clear()
            ckpt = Checkpointer(Path(resume_from) / kind, extra={"comm_int8_ef": hook})
            ckpt.load(ckpt.latest(), ddp, opt)
            got["resumed"], got["resume_log"] = _residuals(hook), list(messages.messages)
        for _ in range(2):
            opt.zero_grad()
            nn.functional.mse_loss(ddp(torch.randn(16, 13, generator=gen)), torch.rand(16, 4, generator=gen)).backward()
            opt.step()
        got["saved"] = _residuals(hook)
        path = Checkpointer(Path(save_to) / kind, extra={"comm_int8_ef": hook}).save(2, ddp, opt, {})
        ddp, hook, opt = _int8_ddp(kind, world_size)
        messages.messages.clear()
        Checkpointer(Path(save_to) / kind, extra={"comm_int8_ef": hook}).load(path, ddp, opt)
        got["same_world"], got["same_world_log"] = _residuals(hook), list(messages.messages)
        out[kind] = got
    return out


def test_int8_residuals_carry_over_when_the_world_shrinks_and_grows(tmp_path):
    # What the applied gradients still owe is the mean over ranks of the carried errors: every rank of the resumed
    # job carries that mean, whichever way the world size changed; at the same world size each rank its own.
    first = run_distributed(_job, None, str(tmp_path / "a"), world_size=3)
    shrunk = run_distributed(_job, str(tmp_path / "a"), str(tmp_path / "b"), world_size=2)
    grown = run_distributed(_job, str(tmp_path / "b"), str(tmp_path / "c"), world_size=3)
    for before, after in ((first, shrunk), (shrunk, grown)):
        for kind in KINDS:
            saved = [r[kind]["saved"] for r in before]
            owed = {name: torch.stack([s[name] for s in saved]).double().mean(0) for name in saved[0]}
            assert all((s[name] != owed[name].float()).any() for s in saved for name in ("0.weight", "2.weight"))
            for rank, r in enumerate(after):
                for name, value in owed.items():
                    torch.testing.assert_close(r[kind]["resumed"][name].double(), value, rtol=1e-6, atol=1e-9)
                assert r[kind]["resume_log"] == (
                    [f"INT8 error-feedback residuals saved by {len(before)} ranks carried over to {len(after)} as "
                     f"their mean"] if rank == 0 else []), (kind, rank)
    for run in (first, shrunk, grown):
        for r in run:
            for kind in KINDS:
                assert r[kind]["same_world"].keys() == r[kind]["saved"].keys()
                assert all(torch.equal(r[kind]["same_world"][k], v) for k, v in r[kind]["saved"].items()), kind
                assert r[kind]["same_world_log"] == []

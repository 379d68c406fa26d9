"""Emulated links (``bench.links``) and the link bench's fit: ranks in their own network namespaces talk over their
veth links (where root can make them), and the crossover is where the fitted step times cross."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from bench.comm_links import crossover, describe, fit, variants_for
from bench.links import Links, unavailable
from tests.dist_utils import run_distributed


def test_fit_and_crossover():
    rates = [1.0, 2.0, 10.0, 25.0]
    a, b = fit(rates, [5 + 40 / r for r in rates])
    assert (a, b) == pytest.approx((5, 40))
    # base: 5 ms + 40 ms/(rate in Gbit/s); compressed: 8 ms + 10: equal at 40 - 10 = 30 / (8 - 5) -> 10 Gbit/s
    assert crossover((5, 40), (8, 10)) == {"faster": "below", "gbit": pytest.approx(10)}
    # less compute but more bytes: faster on links above (50 - 40) / (5 - 4) = 10 Gbit/s
    assert crossover((5, 40), (4, 50)) == {"faster": "above", "gbit": pytest.approx(10)}
    assert crossover((5, 40), (4, 10)) == {"faster": "always", "gbit": None}
    assert crossover((5, 40), (6, 50)) == {"faster": "never", "gbit": None}
    assert [describe(crossover((5, 40), other)) for other in ((8, 10), (4, 50), (4, 10), (6, 50))] == [
        "faster below 10.0 Gbit/s", "faster above 10.0 Gbit/s", "faster at every link speed", "never faster"]
    assert set(variants_for("default", None)) == {"uncompressed", "touched FP32", "touched INT8", "fully compressed",
                                                  "fully compressed, MLP by INT8 reduce-scatter"}
    assert list(variants_for("kaggle", ["fully compressed"])) == ["uncompressed", "fully compressed"]


def test_without_root_the_reason_is_given():
    reason = unavailable()
    if os.geteuid() != 0:
        assert reason is not None and "root" in reason
    elif reason is not None:
        assert "namespace" in reason or "command" in reason


def _over_links(rank, world_size):
    x = torch.full((1000,), float(rank + 1))
    dist.all_reduce(x)
    with open("/proc/self/net/dev") as f:
        devices = {line.split(":")[0].strip() for line in f.read().splitlines()[2:]}
    return float(x[0]), os.environ["GLOO_SOCKET_IFNAME"], sorted(devices)


def test_ranks_talk_over_their_own_links():
    reason = unavailable()
    if reason:
        pytest.skip(f"emulated links cannot be made here: {reason}")
    with Links(2, 1.0) as net:
        out = run_distributed(_over_links, world_size=2, links=net)
    # each rank sees only its own namespace's devices: loopback and its end of its link
    assert out == [(3.0, "r0", ["lo", "r0"]), (3.0, "r1", ["lo", "r1"])]
    # the namespaces (and their devices) are gone with the context
    assert all(not os.path.exists(f"/proc/{pid}") for pid in net.pids)

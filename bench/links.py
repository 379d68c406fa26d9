"""Emulated network links for the communication benches: each rank in its own network namespace, joined to a
switch by a veth pair whose two ends are rate-limited, so that every rank has its own full-duplex link of the given
rate to the others (one rate limit on a shared loopback would be one queue for all ranks together).

Topology: a switch namespace holding a bridge; per rank a namespace holding ``lo`` and the rank end ``r<i>``
(address 10.77.0.<i+1>/24) of a veth pair whose other end ``s<i>`` is a bridge port. With a rate, a token bucket
(``tc qdisc ... tbf``) limits each end: ``r<i>`` what the rank sends, ``s<i>`` what it receives. ``netem`` is not
available on these machines, so links add no latency beyond the kernel's. The veths' MTU is 64 KiB, as loopback's:
emulating 1500-byte frames costs these 2 cores more per byte than the rates being emulated (unlimited veth: about
8 Gbit/s at MTU 1500, 17 at 64 KiB, measured while other work shared the cores), so the measured rate of every link
is reported next to the configured one (``measure_rate``); rates the cores cannot reach are not emulated.

Needs root (network namespaces, ``ip``, ``tc``): ``unavailable()`` says why not, and nothing here touches the
machine's own interfaces (every device is created inside the new namespaces). Written here: no library builds
this topology.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import time

SUBNET = "10.77.0"
MTU = 65535
CLONE_NEWNET = 0x40000000


def unavailable() -> str | None:
    """Why emulated links cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "emulated links need root (network namespaces and tc); run the bench as root, or without --link"
    for tool in ("unshare", "nsenter", "ip", "tc"):
        if shutil.which(tool) is None:
            return f"emulated links need the {tool!r} command, which is not installed"
    try:
        subprocess.run(["unshare", "--net", "true"], check=True, capture_output=True)
    except subprocess.CalledProcessError as e:
        return f"cannot create a network namespace (unshare --net: {e.stderr.decode().strip()})"
    return None


def burst_bytes(gbit: float) -> int:
    """The token bucket's depth: 0.1 ms at the rate, at least 256 KiB (tbf drops a frame larger than its bucket,
    and the frames here are up to 64 KiB): a shallow bucket keeps a short message from going out faster than the
    rate."""
    return max(256 * 1024, int(gbit * 1e9 / 8 * 1e-4))


class Links:
    """``world_size`` ranks, each on its own link of ``gbit`` Gbit/s (None: not limited) to a switch. A context
    manager: the namespaces live while it is open. Picklable (it holds the namespaces' anchor pids), so that
    spawned workers can ``enter`` their rank's namespace."""

    def __init__(self, world_size: int, gbit: float | None) -> None:
        self.world_size, self.gbit = world_size, gbit
        self.pids: list[int] = []  # switch, then one per rank
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> "Links":
        reason = unavailable()
        if reason:
            raise RuntimeError(reason)
        try:
            self._procs = [subprocess.Popen(["unshare", "--net", "sleep", "infinity"])
                           for _ in range(self.world_size + 1)]
            self.pids = [p.pid for p in self._procs]
            _wait_for_namespaces(self.pids)
            switch = self.pids[0]
            _in(switch, "ip link set lo up && ip link add br0 type bridge && ip link set br0 up")
            for r in range(self.world_size):
                pid = self.pids[r + 1]
                _in(switch, f"ip link add s{r} mtu {MTU} type veth peer name r{r} mtu {MTU} netns {pid} && "
                            f"ip link set s{r} master br0 && ip link set s{r} up")
                _in(pid, f"ip link set lo up && ip addr add {self.address(r)}/24 dev r{r} && ip link set r{r} up")
                if self.gbit is not None:
                    tbf = f"tbf rate {self.gbit}gbit burst {burst_bytes(self.gbit)} latency 100ms"
                    _in(switch, f"tc qdisc add dev s{r} root {tbf}")
                    _in(pid, f"tc qdisc add dev r{r} root {tbf}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for p in self._procs:  # the namespaces, and every device in them, go with their last process
            p.kill()
            p.wait()
        self._procs = []

    def __getstate__(self) -> dict:
        return {"world_size": self.world_size, "gbit": self.gbit, "pids": self.pids, "_procs": []}

    def address(self, rank: int) -> str:
        return f"{SUBNET}.{rank + 1}"

    def enter(self, rank: int) -> str:
        """Move the calling process into ``rank``'s namespace and point gloo at its link; returns the address of
        rank 0 (the rendezvous)."""
        with open(f"/proc/{self.pids[rank + 1]}/ns/net") as f:
            if ctypes.CDLL(None, use_errno=True).setns(f.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into rank {rank}'s network namespace failed")
        os.environ["GLOO_SOCKET_IFNAME"] = f"r{rank}"
        return self.address(0)

    def measure_rate(self, seconds: float = 2.0) -> float:
        """Gbit/s one TCP stream gets from rank 0 to rank 1 over their links (what the emulation delivers)."""
        receiver = subprocess.Popen(
            ["nsenter", f"--net=/proc/{self.pids[2]}/ns/net", sys.executable, "-c", _RECEIVER, self.address(1)],
            stdout=subprocess.PIPE, text=True)
        time.sleep(0.3)
        subprocess.run(["nsenter", f"--net=/proc/{self.pids[1]}/ns/net", sys.executable, "-c", _SENDER,
                        self.address(1), str(seconds)], check=True)
        return float(receiver.communicate(timeout=60)[0])


_RECEIVER = """
import socket, sys, time
s = socket.socket(); s.bind((sys.argv[1], 5601)); s.listen(1); c, _ = s.accept(); n, t = 0, None
while True:
    d = c.recv(1 << 20)
    if not d:
        break
    t = t or time.perf_counter()
    n += len(d)
print(n * 8 / (time.perf_counter() - t) / 1e9)
"""
_SENDER = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], 5601), timeout=30); b = b"x" * (1 << 20)
end = time.perf_counter() + float(sys.argv[2])
while time.perf_counter() < end:
    s.sendall(b)
s.close()
"""


def _in(pid: int, command: str) -> None:
    done = subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", "sh", "-c", command], capture_output=True,
                          text=True)
    if done.returncode:
        raise RuntimeError(f"emulated links: {command!r} failed: {done.stderr.strip()}")


def _wait_for_namespaces(pids: list[int], timeout: float = 10.0) -> None:
    """``unshare`` creates the namespace and then runs ``sleep``: wait until each anchor is in a new namespace."""
    own = os.readlink("/proc/self/ns/net")
    end = time.monotonic() + timeout
    while any(os.readlink(f"/proc/{p}/ns/net") == own for p in pids):
        if time.monotonic() > end:
            raise RuntimeError("emulated links: the network namespaces did not come up within 10 s")
        time.sleep(0.02)

"""Wall time and peak memory of each phase of a job, per rank (``logs/phases_rank{R}.json``), for ``bench.scale_run``.

A phase's peak is the kernel's resident-set high-water mark (``VmHWM``), reset at the phase's start by writing 5 to
``/proc/self/clear_refs``; where that is not possible (not Linux) the peak is the lifetime one and says so. Phases
may nest (a checkpoint save inside training): the high-water mark is folded into every open phase before each reset.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)


def status_bytes(field: str, pid: int | str = "self") -> int | None:
    """A memory field of ``/proc/PID/status`` (``VmRSS``, ``VmHWM``: the resident set, its high-water mark) in
    bytes; ``None`` where it cannot be read (not Linux, a process that has exited)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    """Set this process's ``VmHWM`` to its current resident set (False where the kernel does not allow it)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# Who restarts a failed job, and where it counts: `pipeline.launch` (local runs), torchrun's own restarts, and
# Slurm's requeue (torchx's Slurm jobs requeue themselves while their restart budget lasts).
RESTART_COUNTS = ("DQRM_ATTEMPT", "TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT")


def attempt() -> int:
    """This job's attempt, counted from 0: restarts so far, whoever made them."""
    return sum(int(os.environ.get(name) or 0) for name in RESTART_COUNTS)


class PhaseLog:
    """``with phases("export"): ...`` records seconds, peak and end RSS of the block; ``save()`` writes them."""

    def __init__(self, path: Path | None) -> None:
        """Entries of earlier attempts of the job (restarts after a failure) already in ``path`` are kept."""
        self.path = path
        self.attempt = attempt()
        self.phases: list[dict] = []
        if path is not None and path.is_file():
            try:
                self.phases = [e for e in json.loads(path.read_text()) if e.get("attempt", 0) < self.attempt]
            except (ValueError, AttributeError):
                log.warning("%s unreadable; starting it anew", path)
        self._open: list[list[int]] = []  # running peak (bytes) of each open phase, outermost first

    def _fold_peak(self) -> None:
        hwm = status_bytes("VmHWM") or 0
        for running in self._open:
            running[0] = max(running[0], hwm)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self._fold_peak()
        reset = reset_peak()
        start_rss, t0 = status_bytes("VmRSS"), time.perf_counter()
        running = [0]
        self._open.append(running)
        try:
            yield
        finally:
            self._fold_peak()
            self._open.pop()
            entry = {"phase": name, "attempt": self.attempt, "seconds": time.perf_counter() - t0,
                     "peak_rss_bytes": running[0] or None,
                     "start_rss_bytes": start_rss, "end_rss_bytes": status_bytes("VmRSS"),
                     "peak_is_per_phase": reset}
            self.phases.append(entry)
            if entry["peak_rss_bytes"] is not None:
                log.info("phase %s: %.1f s, peak RSS %.2f GB", name, entry["seconds"], entry["peak_rss_bytes"] / 1e9)
            self.save()

    def save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.phases, indent=2))

"""The profiler window of a job (``--profile-steps A:B``): ``torch.profiler`` records training steps A..B-1 (counted
from 0 over the whole job) on every rank, CPU and, where present, CUDA, with shapes and memory, into
``RUN_DIR/profile``: ``rankR.<ns>.pt.trace.json``, a Chrome trace that Perfetto (ui.perfetto.dev) and TensorBoard's
profiler plugin open, and ``rankR_top_ops.txt``, the ops that took the most time (rank 0 also logs it).

Each recorded step is a ``train_step#N`` range in the trace. The step before A, where there is one, warms the
profiler up unrecorded. Whatever the job does between two steps of the window (an epoch's evaluation and checkpoint)
is recorded too; a job that ends inside the window writes what it recorded and says so.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule, tensorboard_trace_handler

log = logging.getLogger(__name__)

PROFILE_DIR = "profile"
"""Where a job's traces go, inside its run dir."""
TOP_OPS = 15
"""Rows of the top-ops table."""


class ProfileWindow:
    """Wraps each training step (``with window.step(n): ...``) and profiles those inside ``window``."""

    def __init__(self, window: tuple[int, int] | None, out_dir: Path, rank: int) -> None:
        self.window, self.out_dir, self.rank = window, Path(out_dir), rank
        self._prof: profile | None = None
        self._recorded: list[int] = []
        self.done = window is None
        self.trace: Path | None = None
        """The trace file, once written."""

    def step(self, step: int):
        """A context for training step ``step`` (counted from 0): recorded inside the window, free outside."""
        if self.done:
            return contextlib.nullcontext()
        start, stop = self.window
        if self._prof is None:
            if step >= stop:  # a job resumed after the window
                log.warning("--profile-steps %d:%d: this job starts at step %d, after the window; no profile written",
                            start, stop, step)
                self.done = True
            if not start - 1 <= step < stop:
                return contextlib.nullcontext()
            self._begin(step)
        return _Step(self, step)

    def _begin(self, step: int) -> None:
        start, stop = self.window
        warmup = 1 if step < start else 0
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._prof = profile(activities=activities, record_shapes=True, profile_memory=True,
                             schedule=schedule(wait=0, warmup=warmup, active=stop - step - warmup, repeat=1),
                             on_trace_ready=self._ready)
        self._prof.__enter__()

    def _after(self, step: int) -> None:
        """A step of the window finished: the profiler moves on, and after the schedule's last active step writes
        the trace (``_ready``), which ends the window."""
        if step >= self.window[0]:
            self._recorded.append(step)
        self._prof.step()
        if self.trace is not None:
            self._finish()

    def _finish(self) -> None:
        self._prof.__exit__(None, None, None)
        self._prof, self.done = None, True

    def _ready(self, prof: profile) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        before = set(self.out_dir.glob(f"rank{self.rank}.*.pt.trace.json"))
        tensorboard_trace_handler(str(self.out_dir), worker_name=f"rank{self.rank}")(prof)
        self.trace = max(set(self.out_dir.glob(f"rank{self.rank}.*.pt.trace.json")) - before)
        sort = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        steps = f"steps {self._recorded[0]} to {self._recorded[-1]}" if self._recorded else "no step"
        table = prof.key_averages().table(sort_by=sort, row_limit=TOP_OPS)
        top = self.out_dir / f"rank{self.rank}_top_ops.txt"
        top.write_text(f"rank {self.rank}, training {steps} (--profile-steps {self.window[0]}:{self.window[1]}), "
                       f"sorted by {sort}\n{table}\n")
        if self.rank == 0:
            log.info("profile of training %s written to %s (open it in ui.perfetto.dev); top ops in %s:\n%s",
                     steps, self.trace, top, table)

    def close(self) -> None:
        """At the end of training: a window not finished writes what it recorded, and says why it is short."""
        if self.done:
            return
        start, stop = self.window
        if self._prof is None:
            log.warning("--profile-steps %d:%d: no step of the window ran (the job ended before step %d); no profile "
                        "written", start, stop, start)
        elif not self._recorded:
            log.warning("--profile-steps %d:%d: the job ended before step %d; no profile written", start, stop, start)
            self._finish()
        else:
            log.warning("--profile-steps %d:%d: the job ended after step %d; the profile holds steps %d to %d",
                        start, stop, self._recorded[-1], self._recorded[0], self._recorded[-1])
            self._finish()
        self.done = True


class _Step:
    """One training step inside the window: a ``train_step#N`` range; the profiler steps on when it succeeds (a
    StopIteration at an epoch's end is no step, though its short range stays in the trace)."""

    def __init__(self, window: ProfileWindow, step: int) -> None:
        self.window, self.step = window, step
        self._range = record_function(f"train_step#{step}")

    def __enter__(self) -> None:
        self._range.__enter__()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._range.__exit__(exc_type, exc, tb)
        if exc_type is None:
            self.window._after(self.step)
        return False

"""The campaign's judgement, with no I/O: a run summary compared with the reference's without what depends on time
(or on the attempt), what was observed turned into an outcome, the outcome held against the expected one, and
which checkpoints a fault lost."""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import Any

from bench.faults.catalog import Expect

# Keys of summary.json that measure a run rather than its result: wall times, rates, and the bytes per step
# averaged over the steps this attempt ran (a resumed epoch averages fewer steps).
TIMING_KEYS = frozenset({"train_seconds", "samples_per_s", "search_seconds", "warmup_seconds",
                         "wall_seconds_this_attempt", "comm_bytes_per_step"})


def comparable(summary: Any, places: dict[str, str]) -> Any:
    """``summary`` without ``TIMING_KEYS`` (at any depth), every string with the paths in ``places`` (path ->
    placeholder, e.g. the run dir -> ``<run>``) replaced, so two runs in different folders compare equal."""
    if isinstance(summary, dict):
        return {k: comparable(v, places) for k, v in summary.items() if k not in TIMING_KEYS}
    if isinstance(summary, list):
        return [comparable(v, places) for v in summary]
    if isinstance(summary, str):
        for path, placeholder in sorted(places.items(), key=lambda kv: -len(kv[0])):
            summary = summary.replace(path, placeholder)
    return summary


def differences(a: Any, b: Any, at: str = "") -> list[str]:
    """Dotted paths where ``a`` and ``b`` (comparable summaries) differ, with both values; exact equality."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                out.append(f"{at}.{k}: {'missing' if k not in a else a[k]!r} vs {'missing' if k not in b else b[k]!r}")
            else:
                out.extend(differences(a[k], b[k], f"{at}.{k}"))
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{at}: {len(a)} items vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{at}[{i}]")]
    return [] if a == b else [f"{at or '.'}: {a!r} vs {b!r}"]


class Outcome(enum.Enum):
    RESUMED_SAME = "resumed: same numbers"
    FELL_BACK_SAME = "fell back: same numbers"
    REFUSED = "stopped: error: names the file"
    REFUSED_RESUMED_SAME = "stopped: error: names the file; after repair: same numbers"
    REFUSED_UNNAMED = "stopped: no error: line naming the file"
    CRASHED = "stopped with a traceback, no error: line"
    FINISHED_SAME = "exit 0, same numbers, fault not reported"
    FINISHED_DIFFERENT = "exit 0, different numbers"
    RECOVERY_FAILED = "rerun failed"
    RECOVERY_DIFFERENT = "rerun: different numbers"
    HUNG = "did not end in time"
    NOT_INJECTED = "harness: fault not injected"


ACCEPTED = {
    Expect.RESUMES: {Outcome.RESUMED_SAME},
    Expect.FALLS_BACK: {Outcome.FELL_BACK_SAME},
    Expect.REFUSES: {Outcome.REFUSED},
    Expect.REFUSES_THEN_RESUMES: {Outcome.REFUSED_RESUMED_SAME},
}
SILENTLY_WRONG = {Outcome.FINISHED_DIFFERENT, Outcome.RECOVERY_DIFFERENT}


@dataclasses.dataclass(frozen=True)
class Observation:
    """What one fault's runs showed. ``rc``: the faulted command's exit status (None: it did not end in time);
    ``errors``: its ``error:`` lines (the launcher's generic "training job failed" line left out); ``traceback``:
    a Python traceback in a worker's or predict's output; ``fell_back``: the job reported a checkpoint unusable
    and fell back; ``diff``: differences of its summary from the reference's (None: no summary compared);
    ``recovery_rc`` and ``recovery_diff``: the same for the rerun after the fault (None: no rerun); ``damaged``:
    a file was damaged on purpose before the run (an exit 0 then means it was used unnoticed)."""

    injected: bool = True
    rc: int | None = 0
    errors: tuple[str, ...] = ()
    traceback: bool = False
    fell_back: bool = False
    diff: tuple[str, ...] | None = None
    recovery_rc: int | None = None
    recovery_diff: tuple[str, ...] | None = None
    names: str = ""
    damaged: bool = False


def names_it(errors: tuple[str, ...], names: str) -> bool:
    return bool(names) and any(names in e for e in errors)


def classify(obs: Observation) -> Outcome:
    """The outcome of a fault from what its runs showed."""
    if not obs.injected:
        return Outcome.NOT_INJECTED
    if obs.rc is None:
        return Outcome.HUNG
    if obs.rc == 0:
        if obs.diff:
            return Outcome.FINISHED_DIFFERENT
        return Outcome.FELL_BACK_SAME if obs.fell_back else Outcome.FINISHED_SAME
    if obs.recovery_rc is None:  # nothing rerun: judged on how it stopped
        if names_it(obs.errors, obs.names):
            return Outcome.REFUSED
        return Outcome.CRASHED if obs.traceback and not obs.errors else Outcome.REFUSED_UNNAMED
    if obs.recovery_rc != 0:
        return Outcome.RECOVERY_FAILED
    if obs.recovery_diff:
        return Outcome.RECOVERY_DIFFERENT
    if obs.names:  # a fault that should stop with an error line before the repair
        if names_it(obs.errors, obs.names):
            return Outcome.REFUSED_RESUMED_SAME
        return Outcome.CRASHED if obs.traceback and not obs.errors else Outcome.REFUSED_UNNAMED
    return Outcome.RESUMED_SAME


def silently_wrong(outcome: Outcome, obs: Observation) -> bool:
    """Exit 0 with other numbers, or a file damaged on purpose and used without an error."""
    return outcome in SILENTLY_WRONG or (obs.damaged and outcome is Outcome.FINISHED_SAME)


def as_expected(expect: Expect, outcome: Outcome) -> bool:
    return outcome in ACCEPTED[expect]


_STEP = re.compile(r"step_(\d+)(?:-(\d+))?")


def checkpoint_order(name: str) -> tuple[int, int]:
    m = _STEP.fullmatch(name)
    if not m:
        raise ValueError(f"not a checkpoint name: {name}")
    return int(m.group(1)), int(m.group(2) or 1)


def lost_checkpoints(before: set[str], after: dict[str, bool]) -> list[str]:
    """Checkpoints whole before a fault (``before``) that are gone or damaged after it (``after``: name ->
    whether it verifies) with no newer whole one in their place."""
    whole_after = [checkpoint_order(n) for n, ok in after.items() if ok]
    newest = max(whole_after, default=None)
    return sorted((n for n in before if not after.get(n) and (newest is None or newest <= checkpoint_order(n))),
                  key=checkpoint_order)

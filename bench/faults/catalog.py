"""The faults of the campaign, as data: each one says where it starts (a fresh run dir, a job interrupted after two
checkpoints, a finished run), in which phase and how it strikes, and the outcome expected of it, all written before
any run. The random point inside a phase comes from the fault's seed, so a fault's run can be repeated."""

from __future__ import annotations

import dataclasses
import enum
import signal


class Phase(enum.Enum):
    """Where in a job (or around it) a fault strikes."""

    DATA = "data (generating the synthetic splits)"
    BUDGET = "budget search"
    BUILD = "build + shard"
    RESUME_LOAD = "resume load"
    TRAIN = "training"
    CHECKPOINT_SAVE = "checkpoint save, while writing"
    EXPORT_ROWS = "export, while writing the rows file"
    EXPORT_MODULE = "export, serving module"
    CHECK = "the job's reload-and-score check"
    AT_REST = "between runs (files on disk)"
    SERVE = "predict (a fresh process)"


class Start(enum.Enum):
    """The run dir a fault starts from."""

    FRESH = "a new run dir"
    FRESH_DATA = "a new run dir and a new data cache (the data are generated)"
    INTERRUPTED = "a job killed at step 360 (checkpoints at steps 240 and 320)"
    FINISHED = "a finished run (checkpoints, exported artifact)"


class Expect(enum.Enum):
    """The outcome a fault must have."""

    RESUMES = "the job fails (exit != 0); rerun, it resumes and ends with the reference numbers"
    FALLS_BACK = "the job reports the damaged checkpoint, falls back and ends with the reference numbers"
    REFUSES = "stops with exit != 0 and a one-line error: naming the file; nothing else lost"
    REFUSES_THEN_RESUMES = "stops with a one-line error: naming the file; after the repair a rerun ends with the " \
                           "reference numbers"


# ---- actions: how a fault strikes ----

@dataclasses.dataclass(frozen=True)
class Kill:
    """A signal to one rank's worker (``rank`` None: drawn from the seed), or to the launcher's whole process group
    (what a scheduler or a terminal does)."""

    sig: signal.Signals = signal.SIGKILL
    rank: int | None = None
    group: bool = False

    def describe(self) -> str:
        who = "the launcher's process group" if self.group else \
            "a rank (drawn)" if self.rank is None else f"rank {self.rank}"
        return f"{self.sig.name} to {who}"


@dataclasses.dataclass(frozen=True)
class FillDisk:
    """The run dir is a tmpfs of ``mb`` MB; at the point the disk is filled to the last byte (repair: the filler
    is deleted)."""

    mb: int = 1200

    def describe(self) -> str:
        return f"run dir on a {self.mb} MB tmpfs, filled up"


@dataclasses.dataclass(frozen=True)
class SmallDisk:
    """The run dir is a tmpfs of ``mb`` MB from the start (repair: remounted with ``grow_mb``)."""

    mb: int
    grow_mb: int = 1200

    def describe(self) -> str:
        return f"run dir on a {self.mb} MB tmpfs"


@dataclasses.dataclass(frozen=True)
class ReadOnly:
    """A read-only bind mount over ``RUN_DIR/sub`` (the run dir itself for ""), at the point (repair: unmounted).
    ``chmod`` would not stop root."""

    sub: str = ""

    def describe(self) -> str:
        return f"read-only bind mount over {'RUN_DIR/' + self.sub if self.sub else 'the run dir'}"


@dataclasses.dataclass(frozen=True)
class Damage:
    """Damage the files matching ``pattern`` (a glob under the run dir, ``{newest}`` standing for the newest
    checkpoint's folder) before the run: ``truncate`` to a share of their size drawn from the seed, ``bitflip`` one
    bit at an offset drawn from the seed (within the value of JSON key ``key`` when given, a digit flipped to
    another digit so that the JSON stays valid)."""

    pattern: str
    how: str  # "truncate" | "bitflip"
    key: str = ""

    def __post_init__(self) -> None:
        if self.how not in ("truncate", "bitflip"):
            raise ValueError(f"Damage.how must be truncate or bitflip, got {self.how!r}")

    def describe(self) -> str:
        where = f" in the value of {self.key!r}" if self.key else ""
        return f"{self.how} {self.pattern}{where}"


Action = Kill | FillDisk | SmallDisk | ReadOnly | Damage


@dataclasses.dataclass(frozen=True)
class Fault:
    """One fault: where it starts, where it strikes, how, and what must come of it. ``names``: what the error line
    must mention (a file or folder name), for the outcomes that stop."""

    name: str
    phase: Phase
    action: Action
    expect: Expect
    seed: int
    start: Start = Start.FRESH
    names: str = ""
    """What the error line must mention; ``{run_dir}`` stands for the fault's run dir."""
    save: int = 0
    """For a checkpoint-save fault: which save of the job (1 = the first) it strikes."""
    serve: str = "model_int4.pt"
    """For a SERVE fault: the artifact ``pipeline.predict`` is given."""
    terabyte: bool = False
    """On the ``terabyte_synthetic`` model (``--terabyte``)."""

    def __post_init__(self) -> None:
        if self.expect in (Expect.REFUSES, Expect.REFUSES_THEN_RESUMES) and not self.names:
            raise ValueError(f"{self.name}: an outcome that stops must say what its error names")
        if self.phase is Phase.CHECKPOINT_SAVE and self.save < 1:
            raise ValueError(f"{self.name}: a checkpoint-save fault needs the save it strikes (save >= 1)")
        if isinstance(self.action, Damage) and self.phase not in (Phase.AT_REST, Phase.SERVE):
            raise ValueError(f"{self.name}: damage is done at rest or before serving")
        if self.phase in (Phase.AT_REST, Phase.SERVE) and not isinstance(self.action, (Damage, ReadOnly)):
            raise ValueError(f"{self.name}: at rest, a fault damages a file or makes the run dir read-only")
        if self.phase is Phase.SERVE and self.start is not Start.FINISHED:
            raise ValueError(f"{self.name}: a serving fault needs a finished run")


K, T = signal.SIGKILL, signal.SIGTERM
CKPT = "checkpoints"
NEWEST = "checkpoints/{newest}/"
RUN = "{run_dir}"
FAULTS: tuple[Fault, ...] = (
    # SIGKILL of one rank at a random point in each phase: the rerun resumes to the reference numbers.
    Fault("kill_data", Phase.DATA, Kill(K, rank=0), Expect.RESUMES, 11, Start.FRESH_DATA),
    Fault("kill_budget_search", Phase.BUDGET, Kill(K), Expect.RESUMES, 12),
    Fault("kill_build", Phase.BUILD, Kill(K), Expect.RESUMES, 13),
    Fault("kill_resume_load", Phase.RESUME_LOAD, Kill(K), Expect.RESUMES, 14, Start.INTERRUPTED),
    Fault("kill_train_rank0", Phase.TRAIN, Kill(K, rank=0), Expect.RESUMES, 15),
    Fault("kill_train_rank1", Phase.TRAIN, Kill(K, rank=1), Expect.RESUMES, 16),
    Fault("kill_save2_rank0", Phase.CHECKPOINT_SAVE, Kill(K, rank=0), Expect.RESUMES, 17, save=2),
    Fault("kill_save3_rank1", Phase.CHECKPOINT_SAVE, Kill(K, rank=1), Expect.RESUMES, 18, save=3),
    Fault("kill_save5_drawn", Phase.CHECKPOINT_SAVE, Kill(K), Expect.RESUMES, 19, save=5),
    Fault("kill_export_rows_rank0", Phase.EXPORT_ROWS, Kill(K, rank=0), Expect.RESUMES, 20),
    Fault("kill_export_rows_rank1", Phase.EXPORT_ROWS, Kill(K, rank=1), Expect.RESUMES, 21),
    Fault("kill_export_module", Phase.EXPORT_MODULE, Kill(K, rank=0), Expect.RESUMES, 22),
    Fault("kill_check", Phase.CHECK, Kill(K, rank=0), Expect.RESUMES, 23),
    # A finished run rerun (it re-exports) and killed while exporting: the finished artifact must survive.
    Fault("kill_reexport_rows", Phase.EXPORT_ROWS, Kill(K, rank=0), Expect.RESUMES, 24, Start.FINISHED),
    Fault("kill_reexport_module", Phase.EXPORT_MODULE, Kill(K, rank=0), Expect.RESUMES, 25, Start.FINISHED),
    # SIGTERM: a preempted rank, and the whole job stopped by a scheduler.
    Fault("term_train_rank1", Phase.TRAIN, Kill(T, rank=1), Expect.RESUMES, 26),
    Fault("term_group_train", Phase.TRAIN, Kill(T, group=True), Expect.RESUMES, 27),
    Fault("term_save4_rank0", Phase.CHECKPOINT_SAVE, Kill(T, rank=0), Expect.RESUMES, 28, save=4),
    # The disk fills up (the error must name the run dir or a file in it: whichever write fails first).
    Fault("disk_full_precheck", Phase.CHECKPOINT_SAVE, SmallDisk(420), Expect.REFUSES_THEN_RESUMES, 29,
          names=RUN, save=3),
    Fault("disk_full_save3", Phase.CHECKPOINT_SAVE, FillDisk(), Expect.REFUSES_THEN_RESUMES, 30, names=RUN,
          save=3),
    Fault("disk_full_export_rows", Phase.EXPORT_ROWS, FillDisk(), Expect.REFUSES_THEN_RESUMES, 31,
          names=RUN),
    Fault("disk_full_export_module", Phase.EXPORT_MODULE, FillDisk(), Expect.REFUSES_THEN_RESUMES, 32,
          names=RUN),
    # The run dir (or its checkpoints) made read-only.
    Fault("readonly_run_dir_at_start", Phase.AT_REST, ReadOnly(), Expect.REFUSES_THEN_RESUMES, 33,
          Start.INTERRUPTED, names=RUN),
    Fault("readonly_checkpoints_train", Phase.TRAIN, ReadOnly(CKPT), Expect.REFUSES_THEN_RESUMES, 34,
          names=RUN),
    Fault("readonly_run_dir_export", Phase.EXPORT_ROWS, ReadOnly(), Expect.REFUSES_THEN_RESUMES, 35,
          names=RUN),
    # Damaged checkpoints (of the interrupted job): reported, skipped, and the previous one resumed.
    Fault("ckpt_shard0_truncated", Phase.AT_REST, Damage(NEWEST + "__0_0.distcp", "truncate"), Expect.FALLS_BACK,
          36, Start.INTERRUPTED),
    Fault("ckpt_shard1_bitflip", Phase.AT_REST, Damage(NEWEST + "__1_0.distcp", "bitflip"), Expect.FALLS_BACK,
          37, Start.INTERRUPTED),
    Fault("ckpt_metadata_bitflip", Phase.AT_REST, Damage(NEWEST + ".metadata", "bitflip"), Expect.FALLS_BACK,
          38, Start.INTERRUPTED),
    Fault("ckpt_manifest_truncated", Phase.AT_REST, Damage(NEWEST + "manifest.json", "truncate"),
          Expect.FALLS_BACK, 39, Start.INTERRUPTED),
    Fault("ckpt_manifest_bitflip_loss", Phase.AT_REST, Damage(NEWEST + "manifest.json", "bitflip", key="loss_sum"),
          Expect.FALLS_BACK, 40, Start.INTERRUPTED),
    Fault("ckpt_all_shards_truncated", Phase.AT_REST, Damage("checkpoints/step_*/__0_0.distcp", "truncate"),
          Expect.FALLS_BACK, 41, Start.INTERRUPTED),
    # Damaged files a resumed job reads besides its checkpoints: the budget's row map and choice.
    Fault("run_row_map_truncated", Phase.AT_REST, Damage("row_map.npz", "truncate"), Expect.REFUSES, 42,
          Start.INTERRUPTED, names="row_map.npz"),
    Fault("run_row_map_bitflip", Phase.AT_REST, Damage("row_map.npz", "bitflip"), Expect.REFUSES, 43,
          Start.INTERRUPTED, names="row_map.npz"),
    Fault("run_budget_json_truncated", Phase.AT_REST, Damage("budget.json", "truncate"), Expect.REFUSES, 44,
          Start.INTERRUPTED, names="budget.json"),
    # A damaged artifact given to predict: refused, naming the file.
    Fault("serve_rows_truncated", Phase.SERVE, Damage("model_int4.rows", "truncate"), Expect.REFUSES, 45,
          Start.FINISHED, names="model_int4.rows"),
    Fault("serve_rows_bitflip", Phase.SERVE, Damage("model_int4.rows", "bitflip"), Expect.REFUSES, 46,
          Start.FINISHED, names="model_int4.rows"),
    Fault("serve_program_rows_bitflip", Phase.SERVE, Damage("model_int4.rows", "bitflip"), Expect.REFUSES, 47,
          Start.FINISHED, names="model_int4.rows", serve="model_int4.pt2"),
    Fault("serve_row_map_truncated", Phase.SERVE, Damage("model_int4.rowmap.npz", "truncate"), Expect.REFUSES,
          48, Start.FINISHED, names="model_int4.rowmap.npz"),
    Fault("serve_row_map_bitflip", Phase.SERVE, Damage("model_int4.rowmap.npz", "bitflip"), Expect.REFUSES, 49,
          Start.FINISHED, names="model_int4.rowmap.npz"),
    Fault("serve_manifest_truncated", Phase.SERVE, Damage("model_int4.pt.json", "truncate"), Expect.REFUSES, 50,
          Start.FINISHED, names="model_int4.pt"),
    Fault("serve_manifest_bitflip", Phase.SERVE, Damage("model_int4.pt.json", "bitflip"), Expect.REFUSES, 51,
          Start.FINISHED, names="model_int4.pt"),
    Fault("serve_module_bitflip", Phase.SERVE, Damage("model_int4.pt", "bitflip"), Expect.REFUSES, 52,
          Start.FINISHED, names="model_int4.pt"),
    Fault("serve_program_truncated", Phase.SERVE, Damage("model_int4.pt2", "truncate"), Expect.REFUSES, 53,
          Start.FINISHED, names="model_int4.pt2", serve="model_int4.pt2"),
    # The terabyte_synthetic model (--terabyte: ~7 GB per rank, 12.6 GB per checkpoint).
    Fault("tb_kill_train_rank1", Phase.TRAIN, Kill(K, rank=1), Expect.RESUMES, 60, terabyte=True),
    Fault("tb_kill_save2_rank0", Phase.CHECKPOINT_SAVE, Kill(K, rank=0), Expect.RESUMES, 61, save=2,
          terabyte=True),
)

# A smoke subset: one of each kind of action and start.
QUICK = ("kill_train_rank1", "kill_save2_rank0", "disk_full_export_rows", "readonly_checkpoints_train",
         "ckpt_shard1_bitflip", "serve_rows_bitflip")


def by_name(names: list[str], *, terabyte: bool = False) -> list[Fault]:
    """The faults named (all of them, but the terabyte ones unless asked, for an empty list), in catalogue
    order; an unknown name raises."""
    known = {f.name: f for f in FAULTS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown fault(s): {', '.join(unknown)} (--list shows them)")
    if names:
        return [f for f in FAULTS if f.name in names]
    return [f for f in FAULTS if terabyte or not f.terabyte]

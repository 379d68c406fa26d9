"""The fault campaign's pure pieces: every fault is well formed with its expected outcome written in code, outcomes
are classified as stated on constructed observations, and summaries compare equal when only timings differ."""

from __future__ import annotations

import random

import pytest

from bench.faults.catalog import FAULTS, QUICK, Damage, Expect, Fault, Kill, Phase, ReadOnly, Start, by_name
from bench.faults.harness import _flip_point, error_lines, has_traceback
from bench.faults.judge import Observation, Outcome, as_expected, classify, comparable, differences, \
    lost_checkpoints, silently_wrong


def test_fault_list_is_well_formed():
    names = [f.name for f in FAULTS]
    assert len(names) == len(set(names))
    default = [f for f in FAULTS if not f.terabyte]
    assert len(default) >= 30
    for f in FAULTS:
        assert isinstance(f.expect, Expect) and isinstance(f.phase, Phase) and isinstance(f.start, Start)
        assert f.action.describe()
    seeds = [f.seed for f in FAULTS]
    assert len(seeds) == len(set(seeds)), "each fault draws its own random point"
    # the list: a SIGKILL in each phase, SIGTERM, disk full at a save and at export, damaged files, read-only
    killed = {f.phase for f in default if isinstance(f.action, Kill) and f.action.sig.name == "SIGKILL"}
    assert {Phase.DATA, Phase.BUDGET, Phase.BUILD, Phase.TRAIN, Phase.CHECKPOINT_SAVE, Phase.EXPORT_ROWS,
            Phase.CHECK} <= killed
    assert any(isinstance(f.action, Kill) and f.action.sig.name == "SIGTERM" for f in default)
    full = {f.phase for f in default if f.name.startswith("disk_full")}
    assert {Phase.CHECKPOINT_SAVE, Phase.EXPORT_ROWS} <= full
    damaged = " ".join(f.action.pattern for f in default if isinstance(f.action, Damage))
    for part in (".distcp", "model_int4.rows", "row_map.npz", "rowmap.npz", "manifest.json", "model_int4.pt.json"):
        assert part in damaged
    assert any(isinstance(f.action, ReadOnly) for f in default)
    assert set(QUICK) <= set(names)


def test_faults_that_stop_say_what_the_error_names():
    with pytest.raises(ValueError, match="names"):
        Fault("x", Phase.AT_REST, Damage("row_map.npz", "truncate"), Expect.REFUSES, 1, Start.INTERRUPTED)
    with pytest.raises(ValueError, match="save"):
        Fault("x", Phase.CHECKPOINT_SAVE, Kill(), Expect.RESUMES, 1)
    with pytest.raises(ValueError):
        Fault("x", Phase.TRAIN, Damage("row_map.npz", "truncate"), Expect.FALLS_BACK, 1)
    with pytest.raises(ValueError, match="how"):
        Damage("row_map.npz", "shred")


def test_by_name():
    assert [f.name for f in by_name(["kill_build", "kill_data"])] == ["kill_data", "kill_build"]  # catalogue order
    assert not any(f.terabyte for f in by_name([]))
    assert any(f.terabyte for f in by_name([], terabyte=True))
    with pytest.raises(ValueError, match="nope"):
        by_name(["nope"])


@pytest.mark.parametrize("obs, outcome", [
    (Observation(injected=False), Outcome.NOT_INJECTED),
    (Observation(rc=None), Outcome.HUNG),
    (Observation(rc=1, recovery_rc=0, recovery_diff=()), Outcome.RESUMED_SAME),
    (Observation(rc=1, recovery_rc=0, recovery_diff=(".epochs[1].train_loss: 1 vs 2",)), Outcome.RECOVERY_DIFFERENT),
    (Observation(rc=1, recovery_rc=1), Outcome.RECOVERY_FAILED),
    (Observation(rc=0, diff=(), fell_back=True), Outcome.FELL_BACK_SAME),
    (Observation(rc=0, diff=()), Outcome.FINISHED_SAME),
    (Observation(rc=0, diff=(".export.test.auc: 0.7 vs 0.8",), fell_back=True), Outcome.FINISHED_DIFFERENT),
    (Observation(rc=1, errors=("error: /r/row_map.npz: not a readable row map",), names="row_map.npz"),
     Outcome.REFUSED),
    (Observation(rc=1, errors=("error: something else",), names="row_map.npz"), Outcome.REFUSED_UNNAMED),
    (Observation(rc=1, traceback=True, names="row_map.npz"), Outcome.CRASHED),
    (Observation(rc=1, errors=("error: no space in /r/checkpoints",), names="checkpoints", recovery_rc=0,
                 recovery_diff=()), Outcome.REFUSED_RESUMED_SAME),
    (Observation(rc=1, traceback=True, names="checkpoints", recovery_rc=0, recovery_diff=()), Outcome.CRASHED),
])
def test_classify(obs, outcome):
    assert classify(obs) is outcome


def test_expected_and_silently_wrong():
    assert as_expected(Expect.RESUMES, Outcome.RESUMED_SAME)
    assert not as_expected(Expect.RESUMES, Outcome.FINISHED_SAME)
    assert as_expected(Expect.REFUSES_THEN_RESUMES, Outcome.REFUSED_RESUMED_SAME)
    assert not as_expected(Expect.REFUSES_THEN_RESUMES, Outcome.CRASHED)
    assert silently_wrong(Outcome.FINISHED_DIFFERENT, Observation())
    assert silently_wrong(Outcome.RECOVERY_DIFFERENT, Observation())
    assert silently_wrong(Outcome.FINISHED_SAME, Observation(damaged=True))  # a damaged file used unnoticed
    assert not silently_wrong(Outcome.FINISHED_SAME, Observation())
    assert not silently_wrong(Outcome.CRASHED, Observation(damaged=True))


def _summary(run: str, seconds: float, auc: float) -> dict:
    return {"config": "default", "wall_seconds_this_attempt": seconds,
            "epochs": [{"epoch": 1, "train_loss": 0.57, "train_seconds": seconds, "samples_per_s": 1e4 / seconds,
                        "comm_bytes_per_step": {"total": seconds}, "test": {"auc": auc}}],
            "budget": {"search_seconds": seconds, "warmup_seconds": seconds, "evaluations": 165},
            "export": {"path": f"{run}/model_int4.pt", "test": {"auc": auc}}, "test_files": ["/d/test.parquet"]}


def test_summaries_compare_without_timings_and_paths():
    a = comparable(_summary("/runs/a", 10.0, 0.73), {"/runs/a": "<run>", "/d": "<data>"})
    b = comparable(_summary("/runs/b", 12.5, 0.73), {"/runs/b": "<run>", "/d": "<data>"})
    assert differences(a, b) == []
    assert a["export"]["path"] == "<run>/model_int4.pt"
    c = comparable(_summary("/runs/b", 12.5, 0.7300001), {"/runs/b": "<run>", "/d": "<data>"})
    assert differences(a, c) == [".epochs[0].test.auc: 0.73 vs 0.7300001", ".export.test.auc: 0.73 vs 0.7300001"]
    assert differences({"x": [1, 2]}, {"x": [1]}) == [".x: 2 items vs 1"]
    assert differences({"x": 1}, {}) == [".x: 1 vs 'missing'"]


def test_lost_checkpoints():
    before = {"step_00000080", "step_00000160"}
    # pruned after a newer whole one: nothing lost
    assert lost_checkpoints(before, {"step_00000160": True, "step_00000240": True}) == []
    # the newest whole one damaged, no newer one
    assert lost_checkpoints(before, {"step_00000080": True, "step_00000160": False}) == ["step_00000160"]
    # gone, only an older one left
    assert lost_checkpoints(before, {"step_00000080": True}) == ["step_00000160"]
    # a second write of a step is newer than the first
    assert lost_checkpoints({"step_00000160"}, {"step_00000160-2": True}) == []
    assert lost_checkpoints(before, {}) == ["step_00000080", "step_00000160"]


def test_output_parsing():
    text = ("train/0 [0]:2026 INFO x\n"
            "train/0 [0]:error: /r/row_map.npz: not a readable row map\n"
            "train/0 [1]:[rank1]: Traceback (most recent call last)\n"
            "error: training job failed (exit 1); rank logs are in /r/torchx and /r/logs\n")
    assert error_lines(text) == ("error: /r/row_map.npz: not a readable row map",)
    # the launcher's line counts where it diagnoses the run dir
    diagnosed = "error: training job failed (exit 1); /r: the disk is full; free space; rank logs are in /tmp/x"
    assert error_lines(diagnosed) == (diagnosed,)
    assert has_traceback(text, workers_only=True)
    assert not has_traceback("train/0 Traceback (most recent call last)", workers_only=True)  # torchrun's own
    assert has_traceback("Traceback (most recent call last)", workers_only=False)
    assert has_traceback("torchx 2026 INFO x\nTraceback (most recent call last)", workers_only=True)  # torchx's


def test_bitflip_in_a_json_number_keeps_it_a_number():
    data = bytearray(b'{"progress": {"in_epoch": {"batches_done": 80, "loss_sum": 45.1875}}}')
    for seed in range(20):
        offset, bit = _flip_point(data, "loss_sum", random.Random(seed))
        flipped = bytearray(data)
        flipped[offset] ^= 1 << bit
        assert flipped != data and chr(flipped[offset]).isdigit()
        assert data.index(b"45.1875") <= offset < data.index(b"45.1875") + 7

"""TensorBoard events and the profiler window of a job, read back with tensorboard's own event reader: the logged
evaluations are ``summary.json``'s, the wire bytes the byte counter's, a constructed grid logs its known clip share,
and the profiler records the steps asked for."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dqrm.datasets.schema import FEATURE_NAMES
from dqrm.datasets.synthetic import ensure_synthetic
from dqrm.pipeline import train
from dqrm.pipeline.cli import build_config, parse_args
from dqrm.pipeline.observe import TENSORBOARD_DIR, Observer
from dqrm.pipeline.profile import PROFILE_DIR
from dqrm.pipeline.qat_stats import GridStats
from dqrm.quant.api import QATConfig, QuantSpec, embedding_quantizer, quantize_
from tests.dist_utils import run_distributed
from tests.helpers import CARDS, batches, mixed_placements, sharded_model

STEPS, EVERY, EVAL_EVERY, PROFILE = 10, 4, 6, (2, 5)


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the event files in ``log_dir``, as (step, value) pairs."""
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def f32(x: float) -> float:
    """What an event file holds of ``x`` (a float32)."""
    return float(np.float32(x))


def _spawned(rank, world_size, run_dir, cache, constructed):
    """The job, then, in the same two processes and on the job's data, the constructed grids of both granularities
    (one spawn for the module)."""
    import os

    os.environ["DQRM_CACHE_DIR"] = str(cache)
    cfg = build_config(parse_args([
        "--config", "tiny", "--epochs", "1", "--limit-train-batches", str(STEPS), "--limit-eval-batches", "1",
        "--run-dir", str(run_dir), "--profile-steps", f"{PROFILE[0]}:{PROFILE[1]}",
        "--set", f"observe.log_every_steps={EVERY}", f"eval_every_steps={EVAL_EVERY}", "comm.count_bytes=true"]))
    summary = train.run_rank(cfg, rank, world_size, torch.device("cpu"))
    data = ensure_synthetic(cfg.data.synthetic) / "train.parquet"
    for granularity, log_dir in constructed.items():
        _constructed(rank, world_size, data, granularity, log_dir)
    return summary, data


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """The real job (pipeline.train's stages) at world size 2 on gloo: one epoch of 10 steps, a TensorBoard log every
    4 steps, a validation every 6, the profiler over steps 2 to 4; and the constructed grids' event dirs."""
    base = tmp_path_factory.mktemp("observe")
    constructed = {g: base / f"constructed_{g}" for g in ("table", "row")}
    out = run_distributed(_spawned, base / "run", base / "cache", constructed, world_size=2)
    return {"run_dir": base / "run", "summaries": [s for s, _ in out], "data": out[0][1], **constructed}


@pytest.fixture(scope="module")
def job(spawned):
    return spawned["run_dir"], spawned["summaries"]


def test_logged_evaluations_are_the_summarys(job):
    run_dir, _ = job
    logged = scalars(run_dir / TENSORBOARD_DIR)
    summary = json.loads((run_dir / "summary.json").read_text())
    epoch, mid = summary["epochs"][0], summary["eval_history"]
    assert [m["step"] for m in mid] == [EVAL_EVERY] and epoch["step"] == STEPS
    for name in ("auc", "accuracy", "logloss"):
        assert logged[f"val/{name}"] == [(EVAL_EVERY, f32(mid[0]["val"][name])), (STEPS, f32(epoch["val"][name]))]
        assert logged[f"test/{name}"] == [(STEPS, f32(epoch["test"][name]))]
    # only rank 0 writes
    assert len(list((run_dir / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 1


def test_logged_bytes_are_the_byte_counters_and_the_loss_is_both_ranks(job):
    """Every 4 steps and at the epoch's end (steps 4, 8, 10): the steps since the previous log. Weighted by their
    steps, the logged bytes per step are the epoch's figure of the counter in summary.json, kind by kind, and the
    logged losses are the mean of the two ranks' epoch losses."""
    run_dir, summaries = job
    logged = scalars(run_dir / TENSORBOARD_DIR)
    steps = {4: 4, 8: 4, 10: 2}
    sent = summaries[0]["epochs"][0]["comm_bytes_per_step"]
    kinds = {t.split("/", 1)[1] for t in logged if t.startswith("comm_bytes_per_step/")}
    assert kinds == set(sent) and "all_to_all (model-parallel)" in kinds and "total" in kinds
    for kind, per_step in sent.items():
        series = logged[f"comm_bytes_per_step/{kind}"]
        assert [s for s, _ in series] == list(steps)
        assert sum(v * steps[s] for s, v in series) / STEPS == pytest.approx(per_step, rel=1e-6), kind
    losses = logged["train/loss"]
    both = (summaries[0]["epochs"][0]["train_loss"] + summaries[1]["epochs"][0]["train_loss"]) / 2
    assert summaries[0]["epochs"][0]["train_loss"] != summaries[1]["epochs"][0]["train_loss"]
    assert sum(v * steps[s] for s, v in losses) / STEPS == pytest.approx(both, rel=1e-6)
    assert [s for s, _ in logged["train/samples_per_s"]] == list(steps)
    assert all(v > 0 for _, v in logged["train/samples_per_s"])
    assert logged["lr/embedding"] == [(s, 1.0) for s in steps] and logged["lr/mlp"] == [(s, f32(0.1)) for s in steps]


def test_qat_tags_cover_every_table(job):
    run_dir, _ = job
    logged = scalars(run_dir / TENSORBOARD_DIR)
    for t in range(26):
        scale = logged[f"qat_scale/t_cat_{t}"]
        clip, error = logged[f"qat_clip_share/t_cat_{t}"], logged[f"qat_quant_error/t_cat_{t}"]
        assert [s for s, _ in clip] == [4, 8, 10] and all(0 <= v <= 1 for _, v in clip)
        for (_, s), (_, c), (_, e) in zip(scale, clip, error):
            assert s > 0 and 0 < e
            if c == 0:  # nothing clipped: every value within half a step of the grid
                assert e <= s / 2 * (1 + 1e-6)


def test_profile_window_holds_the_steps_asked_for(job):
    run_dir, _ = job
    for rank in (0, 1):
        traces = list((run_dir / PROFILE_DIR).glob(f"rank{rank}.*.pt.trace.json"))
        assert len(traces) == 1
        events = json.loads(traces[0].read_text())["traceEvents"]
        steps = sorted(e["name"] for e in events if e.get("name", "").startswith("train_step#"))
        assert steps == [f"train_step#{s}" for s in range(*PROFILE)]
        assert any(e.get("name") == "aten::addmm" and e["args"].get("Input Dims") for e in events)  # shapes
        assert any(e.get("name") == "[memory]" for e in events)  # memory
        top = (run_dir / PROFILE_DIR / f"rank{rank}_top_ops.txt").read_text()
        assert f"training steps {PROFILE[0]} to {PROFILE[1] - 1}" in top and "Self CPU" in top


def test_a_resumed_job_keeps_the_events_up_to_its_checkpoint(tmp_path):
    """An attempt logs steps 4 and 8, evaluates at 8 (its checkpoint) and dies after logging step 12; the job resumed
    from step 8 logs 12 again: the reader keeps the evaluation and the losses up to 8 and only the new step 12."""
    cfg = build_config(parse_args(["--config", "tiny", "--run-dir", str(tmp_path), "--set", "quant_mode=fp32",
                                   "observe.log_every_steps=4"]))

    def attempt(start, stop, loss):
        observer = Observer.for_job(cfg, None, None, rank=0, world_size=1, device=torch.device("cpu"), counter=None,
                                    start_step=start)
        for step in range(start + 1, stop + 1):
            observer.step_done(step, torch.tensor(loss, dtype=torch.float64))
            if step == 8:
                observer.log_eval("val", {"auc": 0.7, "accuracy": 0.8, "logloss": 0.5}, step)
        observer.close()

    attempt(0, 12, 1.0)
    attempt(8, 12, 2.0)
    logged = scalars(tmp_path / TENSORBOARD_DIR)
    assert logged["train/loss"] == [(4, 1.0), (8, 1.0), (12, 2.0)]
    assert logged["val/auc"] == [(8, f32(0.7))]


@pytest.mark.parametrize("value", ["5:2", "3", "a:b", "-1:4", "2:2"])
def test_a_malformed_profile_window_is_refused(value, capsys):
    # --fields: a window accepted by mistake prints the fields (exit 0) instead of training
    assert train.main(["--config", "tiny", f"--profile-steps={value}", "--fields"]) == 2
    err = capsys.readouterr().err
    assert f"--profile-steps {value!r}" in err and "START:STOP" in err and "100:110" in err


# A constructed grid: the rows looked up get a pattern with a known number of clipped values per row, every other
# row all clipped values; the table scale is set to 1/7 (alpha 1, INT4). Only the looked-up rows may count.
DIM, TOP, BOTTOM, INSIDE, ELSEWHERE = 16, 2.0, -2.0, 0.3, 5.0


def clipped_in(t: int) -> int:
    return t % 9  # table t's looked-up rows each hold t % 9 values beyond the grid's ends


def _looked_up(data, world_size) -> dict[str, torch.Tensor]:
    """Per table, the rows the first batch of every rank looks up."""
    out = {f"t_{f}": [] for f in FEATURE_NAMES}
    for r in range(world_size):
        kjt = batches(data, 64, rank=r, world_size=world_size, limit=1)[0].sparse_features
        for f in FEATURE_NAMES:
            out[f"t_{f}"].append(kjt[f].values())
    return {t: torch.cat(v).unique() for t, v in out.items()}


def _pattern(t: int, granularity: str, rows: torch.Tensor, n: int) -> torch.Tensor:
    """Table t's new weights: the looked-up ``rows`` hold the pattern, every other row ``ELSEWHERE``."""
    if granularity == "row":  # each looked-up row spans its own range; the others a far wider one
        w = torch.linspace(-1, 1, DIM).repeat(n, 1) * 100
        w[rows] = torch.linspace(-1, 1, DIM) * (0.1 * (1 + rows % 7)).unsqueeze(1).float()
        return w
    k = clipped_in(t)
    row = torch.full((DIM,), INSIDE)
    row[: k // 2], row[k // 2: k] = TOP, BOTTOM
    w = torch.full((n, DIM), ELSEWHERE)
    w[rows] = row
    return w


def _constructed(rank, world_size, data, granularity, log_dir):
    """A sharded model of every placement, one training forward, then the constructed weights and scale; one log."""
    placements = mixed_placements(world_size, with_column_wise=granularity == "table")
    model, _ = sharded_model(world_size, placements)
    quantize_(model, QATConfig(spec=QuantSpec(granularity=granularity), step="prepare"), pg=dist.group.WORLD)
    quantizer = embedding_quantizer(model)
    observer = Observer(log_dir, every=1, rows_per_step=128, rank=rank, world_size=world_size,
                        device=torch.device("cpu"), grid=GridStats(quantizer))
    model.train()
    loss, _ = model(batches(data, 64, rank=rank, world_size=world_size, limit=1)[0])
    rows = _looked_up(data, world_size)
    written = set()
    with torch.no_grad():  # each rank writes the part of each table it holds (state_dict views share its storage)
        for key, value in model.state_dict().items():
            if ".embedding_bags." in key:
                t = int(key.split(".")[-2].split("_")[-1])
                full = _pattern(t, granularity, rows[f"t_cat_{t}"], CARDS[t])
                for shard in value.local_shards() if hasattr(value, "local_shards") else [None]:
                    if shard is None:  # a data-parallel table: the whole table on every rank
                        value.copy_(full)
                        continue
                    (r0, c0), (n, m) = shard.metadata.shard_offsets, shard.tensor.shape
                    shard.tensor.copy_(full[r0:r0 + n, c0:c0 + m])
                written.add(t)
    assert written == set(range(26))
    quantizer.alpha.fill_(1.0)
    observer.step_done(1, loss.detach().double())
    observer.close()


def test_constructed_clipping_logs_the_known_clip_share_and_error(spawned):
    logged = scalars(spawned["table"])
    scale = float(torch.tensor(1 / 7).half())  # alpha 1 at INT4: fp16(alpha / 7), bias -8 * scale
    bias = -8 * scale
    fq = lambda w: min(max(round((w - bias) / scale), 0), 15) * scale + bias  # noqa: E731
    for t in range(26):
        k = clipped_in(t)
        assert logged[f"qat_scale/t_cat_{t}"] == [(1, f32(scale))]
        assert logged[f"qat_clip_share/t_cat_{t}"] == [(1, f32(k / DIM))], t
        error = (k // 2 * abs(fq(TOP) - TOP) + (k - k // 2) * abs(fq(BOTTOM) - BOTTOM)
                 + (DIM - k) * abs(fq(INSIDE) - INSIDE)) / DIM
        assert logged[f"qat_quant_error/t_cat_{t}"][0][1] == pytest.approx(error, rel=1e-6), t


def test_row_grid_logs_the_scale_range_of_the_rows_looked_up(spawned):
    logged = scalars(spawned["row"])
    rows = _looked_up(spawned["data"], 2)
    for t in range(26):
        w = _pattern(t, "row", rows[f"t_cat_{t}"], CARDS[t])[rows[f"t_cat_{t}"]]
        bias = w.amin(1).half().float()
        scales = ((w.amax(1) - bias) / 15).half().float()  # FBGEMM's row scale, from its definition
        assert logged[f"qat_scale_min/t_cat_{t}"] == [(1, f32(scales.min()))], t
        assert logged[f"qat_scale_max/t_cat_{t}"] == [(1, f32(scales.max()))], t
        assert logged[f"qat_clip_share/t_cat_{t}"] == [(1, 0.0)]

"""The benches' run cache reuses a summary only for the key that produced it, resumes unfinished runs, and refuses to
cache runs of uncommitted code (the launcher is a stand-in that writes a summary; git is stubbed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import run_cache
from bench.run_cache import DONE_FILE, KEY_FILE, DirtyTree, RunKey


class FakeLauncher:
    """Writes ``summary.json`` into the run dir the command names; fails when told to."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.fail = False

    def __call__(self, cmd: list[str]) -> int:
        self.calls.append(cmd)
        if self.fail:
            return 1
        run_dir = Path(cmd[cmd.index("--run-dir") + 1])
        train = cmd[cmd.index("--") + 1:]
        summary = {"config": train[train.index("--config") + 1], "train_args": train, "call": len(self.calls)}
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return 0


@pytest.fixture
def repo(monkeypatch):
    """A clean tree at commit ``c1`` unless a test changes it."""
    state = {"commit": "c1" * 20, "dirty": []}
    monkeypatch.setattr(run_cache, "head_commit", lambda: state["commit"])
    monkeypatch.setattr(run_cache, "dirty_paths", lambda: list(state["dirty"]))
    return state


def test_second_call_reuses_and_the_seed_reaches_the_job(tmp_path, repo):
    launch = FakeLauncher()
    first = run_cache.run("tiny", ["--epochs", "1"], seed=3, root=tmp_path, launch=launch)
    again = run_cache.run("tiny", ["--epochs", "1"], seed=3, root=tmp_path, launch=launch)
    assert len(launch.calls) == 1 and not first.reused and again.reused and again.summary == first.summary
    assert first.summary["train_args"] == ["--config", "tiny", "--epochs", "1", "--set", "seed=3"]
    assert first.run_dir == tmp_path / repo["commit"] / first.key.dirname()
    assert json.loads((first.run_dir / KEY_FILE).read_text()) == first.key.as_dict()


@pytest.mark.parametrize("change", [{"seed": 1}, {"args": ["--epochs", "2"]}, {"config": "default"}, {"nproc": 1},
                                   {"commit": "c2" * 20}])
def test_any_other_key_launches_its_own_run(tmp_path, repo, change):
    launch = FakeLauncher()
    base = {"config": "tiny", "args": ["--epochs", "1"], "seed": 0, "nproc": 2}
    first = run_cache.run(**{k: v for k, v in base.items()}, root=tmp_path, launch=launch)
    repo["commit"] = change.get("commit", repo["commit"])
    other = run_cache.run(**{**base, **{k: v for k, v in change.items() if k != "commit"}}, root=tmp_path,
                          launch=launch)
    assert len(launch.calls) == 2 and not other.reused and other.run_dir != first.run_dir


def test_a_summary_it_did_not_record_is_never_reused(tmp_path, repo):
    launch = FakeLauncher()
    key = RunKey(config="tiny", seed=0, nproc=2, commit=repo["commit"])
    run_dir = tmp_path / key.commit / key.dirname()
    run_dir.mkdir(parents=True)
    (run_dir / KEY_FILE).write_text(json.dumps(key.as_dict()))
    (run_dir / "summary.json").write_text(json.dumps({"config": "tiny", "foreign": True}))  # no bench_done.json
    got = run_cache.run("tiny", root=tmp_path, launch=launch)
    assert len(launch.calls) == 1 and "foreign" not in got.summary and (run_dir / DONE_FILE).is_file()
    (run_dir / "summary.json").write_text(json.dumps({"config": "tiny", "edited": True}))  # rewritten after it
    got = run_cache.run("tiny", root=tmp_path, launch=launch)
    assert len(launch.calls) == 2 and "edited" not in got.summary


def test_a_directory_of_another_key_or_unknown_files_is_refused(tmp_path, repo):
    launch = FakeLauncher()
    first = run_cache.run("tiny", root=tmp_path, launch=launch)
    other = {**first.key.as_dict(), "seed": 9}
    (first.run_dir / KEY_FILE).write_text(json.dumps(other))
    with pytest.raises(RuntimeError, match="records another run"):
        run_cache.run("tiny", root=tmp_path, launch=launch)
    stray = tmp_path / repo["commit"] / RunKey(config="tiny", seed=1, commit=repo["commit"]).dirname()
    stray.mkdir(parents=True)
    (stray / "summary.json").write_text("{}")
    with pytest.raises(RuntimeError, match="not made by this cache"):
        run_cache.run("tiny", seed=1, root=tmp_path, launch=launch)


def test_a_failed_run_is_resumed_in_the_same_run_dir(tmp_path, repo):
    launch = FakeLauncher()
    launch.fail = True
    with pytest.raises(RuntimeError, match="rerunning the bench resumes it"):
        run_cache.run("tiny", root=tmp_path, launch=launch)
    launch.fail = False
    got = run_cache.run("tiny", root=tmp_path, launch=launch)
    assert len(launch.calls) == 2 and launch.calls[0] == launch.calls[1] and not got.reused
    assert run_cache.run("tiny", root=tmp_path, launch=launch).reused


def test_uncommitted_code_is_refused_or_run_uncached(tmp_path, repo):
    launch = FakeLauncher()
    repo["dirty"] = ["pipeline/train.py"]
    with pytest.raises(DirtyTree, match="pipeline/train.py"):
        run_cache.run("tiny", root=tmp_path, launch=launch)
    assert not launch.calls
    a = run_cache.run("tiny", root=tmp_path, launch=launch, allow_dirty=True)
    b = run_cache.run("tiny", root=tmp_path, launch=launch, allow_dirty=True)
    assert len(launch.calls) == 2 and not a.cached and not b.reused and a.run_dir != b.run_dir
    assert json.loads((a.run_dir / KEY_FILE).read_text())["dirty_paths"] == ["pipeline/train.py"]
    repo["dirty"] = []
    assert not run_cache.run("tiny", root=tmp_path, launch=launch).reused  # uncached runs are never found


def test_code_edited_during_a_run_is_not_recorded(tmp_path, repo):
    def launch_and_edit(cmd):
        repo["dirty"] = ["quant/export.py"]
        return FakeLauncher()(cmd)

    with pytest.raises(DirtyTree, match="changed while"):
        run_cache.run("tiny", root=tmp_path, launch=launch_and_edit)
    key = RunKey(config="tiny", commit=repo["commit"])
    assert not (tmp_path / key.commit / key.dirname() / DONE_FILE).exists()

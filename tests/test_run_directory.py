"""A run directory appears whole at the first checkpoint, replaces an earlier run whole, and refuses an --out
holding anything else (the SIGKILL cases are in test_resume.py)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

import gpu_ann.run_directory as run_directory
import gpu_ann.training as training
from gpu_ann.checkpoint import CheckpointError, fingerprint, load_checkpoint, load_data, load_resume_state
from gpu_ann.data.table import RatingsTable

RUN_FILES = ["config.toml", "curves.png", "data.npz", "last.pt", "metrics.jsonl", "model.pt"]


def table(seed=0, n_users=30, n_items=20) -> RatingsTable:
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), 5).astype(np.int32)
    items = np.concatenate([rng.choice(n_items, 5, replace=False) for _ in range(n_users)]).astype(np.int32)
    return RatingsTable(users, items, None, None, np.arange(n_users), np.arange(n_items), None, source=f"t{seed}")


def config(out, **kw) -> training.TrainConfig:
    settings = dict(backend="cpu", batch_size=8, hidden=(8, 8, 8), max_steps=6, eval_every=3, eval_batches=1)
    return training.TrainConfig(out=str(out), **{**settings, **kw})


def contents(directory) -> dict[str, bytes]:
    """Every file under ``directory`` by relative path, with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def earlier(tmp_path):
    """A finished earlier run in ``tmp_path/run``, with a TensorBoard folder as ``--tensorboard`` leaves one."""
    out = tmp_path / "run"
    training.train(config(out, seed=1), table(seed=1))
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events.out").write_bytes(b"earlier scalars")
    return out


class Crash(Exception):
    pass


@pytest.fixture(params=["data.npz", "last.pt"])
def crash_in_first_checkpoint(request, monkeypatch):
    """Make the first checkpoint fail after writing its first file (data.npz) or its last (last.pt)."""
    name = {"data.npz": "save_data", "last.pt": "save_resume_state"}[request.param]
    real = getattr(training, name)

    def write_then_crash(directory, *args):
        real(directory, *args)
        assert (directory / request.param).is_file()  # the file really was written, in the staging directory
        raise Crash

    monkeypatch.setattr(training, name, write_then_crash)


def test_a_failed_first_checkpoint_leaves_no_run_directory(tmp_path, crash_in_first_checkpoint):
    with pytest.raises(Crash):
        training.train(config(tmp_path / "run"), table())
    assert list(tmp_path.iterdir()) == []  # no run directory, and no staging directory beside it


def test_a_failed_first_checkpoint_leaves_the_earlier_run_as_it_was(earlier, crash_in_first_checkpoint):
    before = contents(earlier)
    with pytest.raises(Crash):
        training.train(config(earlier), table())
    assert contents(earlier) == before
    assert [p.name for p in earlier.parent.iterdir()] == ["run"]
    assert load_resume_state(earlier).data_fingerprint == fingerprint(table(seed=1))  # still the earlier run


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "set-aside-rename"])
def test_a_new_run_replaces_an_earlier_one_whole(earlier, monkeypatch, exchange):
    real_exchange = run_directory._exchange
    exchanged = []

    def recording_exchange(a, b):
        exchanged.append(real_exchange(a, b))
        return exchanged[-1]

    monkeypatch.setattr(run_directory, "_exchange", recording_exchange)
    if not exchange:  # a system without renameat2: the earlier run is renamed aside first
        monkeypatch.setattr(run_directory, "_renameat2", lambda: None)
    stale = earlier.parent / ".run.partial-killed"  # left by a process killed in an earlier first checkpoint
    stale.mkdir()
    (stale / "data.npz").write_bytes(b"half a run")
    new = table(seed=2)
    result = training.train(config(earlier, seed=2, max_steps=9), new)
    assert exchanged == [exchange]
    assert sorted(p.name for p in earlier.parent.iterdir()) == ["run"]  # no staging, set-aside or stale directory
    assert sorted(p.name for p in earlier.iterdir()) == RUN_FILES  # the earlier run's tensorboard/ went with it
    table_back, _ = load_data(earlier)
    assert fingerprint(table_back) == fingerprint(new)
    state = load_resume_state(earlier)
    assert state.step == 9 and state.config["seed"] == 2 and state.finished
    lines = (earlier / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(result.history) == 3  # only the new run's evaluations
    load_checkpoint(earlier, new)
    # The new run resumes: continue it from its last state to 12 steps.
    payload = torch.load(earlier / "last.pt", weights_only=True)
    payload["config"]["max_steps"], payload["finished"] = 12, False
    torch.save(payload, earlier / "last.pt")
    assert training.resume_run(earlier).steps == 12
    assert len((earlier / "metrics.jsonl").read_text().splitlines()) == 4


def test_the_exchange_swaps_two_directories_in_one_call(tmp_path):
    if not run_directory._renameat2():
        pytest.skip("no renameat2 in this C library: the set-aside rename is used (tested above)")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("in a")
    (b / "y").write_text("in b")
    assert run_directory._exchange(a, b)
    assert [p.name for p in a.iterdir()] == ["y"] and [p.name for p in b.iterdir()] == ["x"]


def test_an_out_with_foreign_files_is_refused_before_anything_is_read(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("notes.txt", "top100.parquet", "model.pt", ".model.pt.abc123.tmp"):
        (out / name).write_text(name)
    before = contents(out)
    # --data names no file: reading it would be a DataError, so the refusal comes first.
    cfg = dataclasses.replace(config(out), data=str(tmp_path / "missing.csv"))
    with pytest.raises(CheckpointError) as e:
        training.train(cfg)
    assert str(e.value) == (
        f"{out}: holds notes.txt, top100.parquet, which a training run does not write; a new run replaces its "
        "--out directory as a whole, so give a new or empty --out, move those files, or continue the run there "
        "with --resume"
    )
    assert contents(out) == before and [p.name for p in tmp_path.iterdir()] == ["run"]
    for k in range(5):
        (out / f"extra{k}.csv").write_text("")
    with pytest.raises(CheckpointError, match=r": holds extra0\.csv, extra1\.csv, extra2\.csv, extra3\.csv, "
                                              r"extra4\.csv and 2 more, which"):  # fmt: skip
        training.train(cfg)


def test_an_out_that_is_a_file_a_link_or_the_current_directory_is_refused(tmp_path, monkeypatch):
    missing = str(tmp_path / "missing.csv")
    file = tmp_path / "file"
    file.write_text("not a directory")
    with pytest.raises(CheckpointError) as e:
        training.train(dataclasses.replace(config(file), data=missing))
    assert str(e.value) == f"{file}: --out exists and is not a directory"
    (tmp_path / "target").mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "target")
    with pytest.raises(CheckpointError) as e:
        training.train(dataclasses.replace(config(link), data=missing))
    assert str(e.value) == f"{link}: --out is a symbolic link; give the directory it points to"
    monkeypatch.chdir(tmp_path / "target")
    for out in (".", ".."):
        with pytest.raises(CheckpointError) as e:
            training.train(dataclasses.replace(config(out), data=missing))
        assert str(e.value) == (
            f"{out}: --out is the current directory or one above it; a new run replaces its --out as a whole, "
            "so give a directory below it, such as runs/NAME"
        )
    assert sorted(os.listdir(tmp_path)) == ["file", "link", "target"] and os.listdir(tmp_path / "target") == []


def test_the_command_line_names_the_foreign_files(tmp_path, capsys):
    from gpu_ann.cli import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "top100.parquet").write_bytes(b"PAR1")
    assert main(["train", "--data", str(tmp_path / "missing.csv"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"gpu-ann train: error: {out}: holds top100.parquet, which a training run does not write" in err


def test_a_run_directory_gets_the_permissions_of_a_plain_mkdir(tmp_path):
    umask = os.umask(0o027)
    try:
        training.train(config(tmp_path / "run"), table())
    finally:
        os.umask(umask)
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o750

"""Resume: a run killed with SIGKILL, between or during checkpoint writes, ends bit-identical."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gpu_ann.checkpoint import PAUSE_ENV, load_resume_state

ARGS = [
    "--backend",
    "cpu",
    "--batch-size",
    "16",
    "--hidden",
    "16,16,16",
    "--max-steps",
    "60",
    "--eval-every",
    "5",
    "--eval-batches",
    "2",
    "--patience",
    "100",
    "--seed",
    "7",
]


@pytest.fixture(scope="module")
def ratings(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "ratings.csv"
    rng = np.random.default_rng(0)
    lines = ["user,item,rating"] + [
        f"u{u},i{i},{rng.integers(1, 6)}" for u in range(80) for i in rng.choice(40, size=10, replace=False)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def gpu_ann(*args, env=None, **kw):
    command = [sys.executable, "-m", "gpu_ann", "train", *args]
    return subprocess.Popen(
        command, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw
    )


@pytest.fixture(scope="module")
def uninterrupted(ratings, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    proc = gpu_ann("--data", str(ratings), "--out", str(out), *ARGS)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    return out


def wait_for(condition, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read()}"
        time.sleep(0.02)
    raise AssertionError("condition not reached")


def state_step(out: Path) -> int:
    try:
        return load_resume_state(out).step
    except Exception:
        return -1


def assert_same_run(a: Path, b: Path):
    sa, sb = load_resume_state(a), load_resume_state(b)
    assert sa.finished and sb.finished and sa.step == sb.step == 60
    for name, tensor in sa.model_state.items():
        assert torch.equal(tensor, sb.model_state[name]), name  # bit-identical weights
    assert [r["validation_loss"] for r in sa.history] == [r["validation_loss"] for r in sb.history]
    assert (a / "metrics.jsonl").read_text().count("\n") == (b / "metrics.jsonl").read_text().count("\n") == 12
    assert torch.equal(
        torch.load(a / "model.pt", weights_only=True)["model_state"]["out.weight"],
        torch.load(b / "model.pt", weights_only=True)["model_state"]["out.weight"],
    )


@pytest.mark.slow
def test_killed_between_checkpoint_writes_then_resumed(ratings, uninterrupted, tmp_path):
    out = tmp_path / "run"
    proc = gpu_ann("--data", str(ratings), "--out", str(out), *ARGS)
    wait_for(lambda: state_step(out) >= 20, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load_resume_state(out).step < 60
    resumed = gpu_ann("--resume", str(out))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert_same_run(uninterrupted, out)


@pytest.mark.slow
def test_killed_during_a_checkpoint_write_then_resumed(ratings, uninterrupted, tmp_path):
    out = tmp_path / "run"
    # Each checkpoint file waits 0.3 s between its temporary file and the rename: kill in that window.
    proc = gpu_ann("--data", str(ratings), "--out", str(out), *ARGS, env={PAUSE_ENV: "0.3"})
    wait_for(lambda: state_step(out) >= 10 and any(out.glob(".last.pt.*.tmp")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(out.glob(".*.tmp"))  # the write really was cut short
    load_resume_state(out)  # the previous state is whole
    resumed = gpu_ann("--resume", str(out))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert not any(out.glob(".*.tmp"))
    assert_same_run(uninterrupted, out)


RUN_FILES = ["config.toml", "curves.png", "data.npz", "last.pt", "metrics.jsonl", "model.pt"]


def staging(out: Path) -> list[Path]:
    """The staging directories of a first checkpoint into ``out`` (see gpu_ann.run_directory)."""
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


def contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def earlier_run(ratings, out: Path) -> dict[str, bytes]:
    """A finished run of another seed in ``out``; returns its files."""
    proc = gpu_ann("--data", str(ratings), "--out", str(out), *ARGS, "--max-steps", "10", "--seed", "8")
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    return contents(out)


@pytest.mark.slow
@pytest.mark.parametrize("reused", [False, True], ids=["new-out", "over-an-earlier-run"])
def test_killed_inside_the_first_checkpoint_leaves_no_run_or_the_earlier_one(ratings, tmp_path, reused):
    out = tmp_path / "run"
    before = earlier_run(ratings, out) if reused else None
    # Each checkpoint file waits 0.3 s before its rename: kill once data.npz, the first of six, is staged.
    proc = gpu_ann("--data", str(ratings), "--out", str(out), *ARGS, env={PAUSE_ENV: "0.3"})
    wait_for(lambda: any((p / "data.npz").is_file() for p in staging(out)), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    [left] = staging(out)
    assert not (left / "last.pt").exists()  # the first checkpoint really was cut short
    if reused:
        assert contents(out) == before  # the earlier run, untouched, and still resumable (it is finished)
        again = gpu_ann("--resume", str(out))
        assert again.wait(timeout=300) == 0, again.stderr.read()
        assert load_resume_state(out).step == 10 and load_resume_state(out).config["seed"] == 8
    else:
        assert not out.exists()
        again = gpu_ann("--resume", str(out))
        assert again.wait(timeout=300) == 2 and "last.pt: not found" in again.stderr.read()
    # The next run into the same --out completes and removes what the killed one left.
    proc = gpu_ann("--data", str(ratings), "--out", str(out), *ARGS)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert staging(out) == [] and sorted(p.name for p in out.iterdir()) == RUN_FILES
    state = load_resume_state(out)
    assert state.finished and state.step == 60 and state.config["seed"] == 7


@pytest.mark.slow
@pytest.mark.parametrize("reused", [False, True], ids=["new-out", "over-an-earlier-run"])
def test_killed_right_after_the_first_checkpoint_then_resumed(ratings, uninterrupted, tmp_path, reused):
    out = tmp_path / "run"
    if reused:
        earlier_run(ratings, out)

    def first_checkpoint_in_place():
        try:
            return load_resume_state(out).config["seed"] == 7
        except Exception:
            return False

    # The first checkpoint is renamed into place at step 5; the next one waits for step 10 and its pauses.
    proc = gpu_ann("--data", str(ratings), "--out", str(out), *ARGS, env={PAUSE_ENV: "0.3"})
    wait_for(first_checkpoint_in_place, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Complete at step 5 (the step-10 checkpoint may have begun a temporary file: the resume removes it).
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".tmp")) == RUN_FILES
    assert load_resume_state(out).step == 5
    resumed = gpu_ann("--resume", str(out))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert_same_run(uninterrupted, out)  # 12 metrics lines: nothing of the earlier run is left


def test_resuming_a_finished_run_takes_no_step(uninterrupted):
    before = load_resume_state(uninterrupted)
    proc = gpu_ann("--resume", str(uninterrupted))
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    after = load_resume_state(uninterrupted)
    assert after.step == before.step == 60
    assert all(torch.equal(before.model_state[k], after.model_state[k]) for k in before.model_state)


@pytest.mark.parametrize("crash_at", [12, 20])  # 12 batches an epoch: at an epoch boundary, and mid-epoch
def test_in_process_crash_right_after_a_saved_state_resumes_identically(tmp_path, monkeypatch, crash_at):
    import gpu_ann.training as training
    from gpu_ann.data.table import RatingsTable

    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(40), 6).astype(np.int32)
    items = np.concatenate([rng.choice(30, 6, replace=False) for _ in range(40)]).astype(np.int32)
    table = RatingsTable(users, items, None, None, np.arange(40), np.arange(30), None, source="tiny")
    cfg = training.TrainConfig(
        backend="cpu", batch_size=16, hidden=(8, 8, 8), max_steps=30, eval_every=4, eval_batches=1, patience=100, seed=2
    )
    whole = tmp_path / "whole"
    training.train(training.dataclasses.replace(cfg, out=str(whole)), table)

    class Crash(Exception):
        pass

    real = training.save_resume_state

    def save_then_crash(run_dir, state):
        real(run_dir, state)
        if state.step == crash_at:
            raise Crash

    cut = tmp_path / "cut"
    monkeypatch.setattr(training, "save_resume_state", save_then_crash)
    with pytest.raises(Crash):
        training.train(training.dataclasses.replace(cfg, out=str(cut)), table)
    monkeypatch.setattr(training, "save_resume_state", real)
    state = load_resume_state(cut)
    assert state.step == crash_at and state.batch_in_epoch == crash_at - 12 * state.epoch
    training.resume_run(cut)
    assert_same_run_in_process(whole, cut)


def assert_same_run_in_process(a: Path, b: Path):
    sa, sb = load_resume_state(a), load_resume_state(b)
    assert sa.finished and sb.finished and sa.step == sb.step == 30
    assert all(torch.equal(sa.model_state[k], sb.model_state[k]) for k in sa.model_state)
    assert [r["step"] for r in sa.history] == [r["step"] for r in sb.history]
    assert [r["validation_loss"] for r in sa.history] == [r["validation_loss"] for r in sb.history]


def test_resume_with_another_number_of_ranks_is_refused(tmp_path):
    import gpu_ann.training as training
    from gpu_ann.checkpoint import STATE_FILE, CheckpointError
    from gpu_ann.data.table import RatingsTable

    users = np.repeat(np.arange(20), 5).astype(np.int32)
    items = (np.arange(100) % 17).astype(np.int32)
    table = RatingsTable(users, items, None, None, np.arange(20), np.arange(17), None, source="tiny")
    cfg = training.TrainConfig(backend="cpu", batch_size=8, hidden=(8, 8, 8), max_steps=6, eval_every=3,
                               eval_batches=1, out=str(tmp_path / "run"))  # fmt: skip
    training.train(cfg, table)
    state = torch.load(tmp_path / "run" / STATE_FILE, weights_only=True)
    assert state["world_size"] == 1
    state["world_size"], state["finished"] = 2, False  # as if two torchrun ranks had written it
    torch.save(state, tmp_path / "run" / STATE_FILE)
    with pytest.raises(CheckpointError, match=r"trained with 2 rank\(s\) and is resumed with 1"):
        training.resume_run(tmp_path / "run")


def _lazy_table():
    from gpu_ann.data.table import RatingsTable

    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(40), 6).astype(np.int32)
    items = np.concatenate([rng.choice(30, 6, replace=False) for _ in range(40)]).astype(np.int32)
    return RatingsTable(users, items, None, None, np.arange(40), np.arange(30), None, source="tiny")


def test_resume_keeps_the_saved_runs_lazy_tables_when_auto_would_now_choose_others(tmp_path, monkeypatch):
    # auto makes this run's output layer lazy (16 + 8 rows a step of 30). If the rule changes between the
    # save and the resume (here: it would choose nothing), the resumed run must still update what it saved.
    import dataclasses

    import gpu_ann.run_setup as run_setup
    import gpu_ann.training as training

    cfg = training.TrainConfig(
        backend="cpu", batch_size=16, hidden=(8, 8, 8), max_steps=12, eval_every=4, eval_batches=1, patience=100,
        seed=3, input_path="sparse", softmax="sampled", negatives=8, optimizer="auto",
    )  # fmt: skip
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    training.train(dataclasses.replace(cfg, out=str(whole)), _lazy_table())
    assert load_resume_state(whole).optimizer_state["lazy_names"] == ["out.weight", "out.bias"]

    class Crash(Exception):
        pass

    real = training.save_resume_state

    def save_then_crash(run_dir, state):
        real(run_dir, state)
        if state.step == 8:
            raise Crash

    monkeypatch.setattr(training, "save_resume_state", save_then_crash)
    with pytest.raises(Crash):
        training.train(dataclasses.replace(cfg, out=str(cut)), _lazy_table())
    monkeypatch.setattr(training, "save_resume_state", real)
    monkeypatch.setattr(run_setup, "lazy_tables", lambda *args, **kwargs: ())  # the rule as it might read one day
    training.resume_run(cut)
    a, b = load_resume_state(whole), load_resume_state(cut)
    assert a.finished and b.finished and a.step == b.step == 12
    assert b.optimizer_state["lazy_names"] == ["out.weight", "out.bias"]
    assert all(torch.equal(a.model_state[k], b.model_state[k]) for k in a.model_state)


def test_adam_refuses_lazy_adams_state_with_a_message():
    from gpu_ann.model import CandidateGenerator

    model = CandidateGenerator(30, (8, 8, 8))
    lazy = model.configure_optimizer(1e-2, ("out.weight", "out.bias")).state_dict()
    with pytest.raises(
        ValueError, match=r"lazy Adam's \(lazy tables \['out.weight', 'out.bias'\]\); this optimiser is Adam"
    ):
        model.configure_optimizer(1e-2, ()).load_state_dict(lazy)

"""Training end to end on a small real slice, checkpoints, and recommendations."""

import numpy as np
import pytest
import torch

from gpu_ann.checkpoint import CheckpointError, load_checkpoint, load_data
from gpu_ann.data.readers import load_bundled_anime
from gpu_ann.data.table import RatingsTable
from gpu_ann.recommend import Recommender, UnknownId
from gpu_ann.training import TrainConfig, train


def real_slice(table: RatingsTable, n_users: int, n_items: int) -> RatingsTable:
    """The first ``n_users`` users' interactions with the ``n_items`` most popular of their items."""
    keep = table.user < n_users
    top = np.argsort(-np.bincount(table.item[keep], minlength=table.n_items), kind="stable")[:n_items]
    keep &= np.isin(table.item, top)
    items, item = np.unique(table.item[keep], return_inverse=True)
    return RatingsTable(
        user=table.user[keep],
        item=item.astype(np.int32),
        rating=table.rating[keep],
        timestamp=None,
        user_ids=table.user_ids[:n_users],
        item_ids=table.item_ids[items],
        item_titles=table.item_titles[items],
        source=table.source + f" ({n_users} users x {n_items} items)",
    )


@pytest.fixture(scope="module")
def slice_table():
    # About 100k real interactions: enough to learn something in a few seconds on two cores.
    return real_slice(load_bundled_anime(), 2000, 500)


@pytest.fixture(scope="module")
def trained(slice_table, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(
        backend="cpu",
        out=str(out),
        batch_size=256,
        hidden=(64, 128, 64),
        lr=2e-3,
        eval_every=50,
        eval_batches=4,
        max_epochs=2,
        seed=3,
    )
    return train(cfg, slice_table), out


def test_short_run_beats_the_popularity_baseline(trained):
    result, _ = trained
    assert np.isfinite(result.popularity_validation_loss)
    # Better than predicting every held-out item from training popularity, on the whole validation split.
    assert result.final_validation_loss < result.popularity_validation_loss - 0.1, result
    losses = [h["validation_loss"] for h in result.history]
    assert min(losses) < losses[0]


def test_checkpoint_round_trip_restores_weights_config_and_id_maps(trained, slice_table):
    result, out = trained
    ckpt = load_checkpoint(out, slice_table)
    assert list(ckpt.config["hidden"]) == [64, 128, 64] and ckpt.config["lr"] == 2e-3
    assert ckpt.best_validation_loss == pytest.approx(min(h["validation_loss"] for h in result.history))
    table, assignment = load_data(out)
    np.testing.assert_array_equal(table.item_ids, slice_table.item_ids)
    np.testing.assert_array_equal(table.user_ids, slice_table.user_ids)
    np.testing.assert_array_equal(table.item_titles, slice_table.item_titles)
    # The stored split reproduces the seeded 80/10/10 split of the same table.
    from gpu_ann.splits import random_split

    _, expected = random_split(slice_table, (0.8, 0.1, 0.1), seed=3)
    np.testing.assert_array_equal(assignment, expected)
    from gpu_ann.config import read_toml

    assert read_toml(out / "config.toml", "train")["seed"] == 3
    # Adam's state comes back and loads into a fresh optimiser of the same model.
    from gpu_ann.model import CandidateGenerator

    model = CandidateGenerator(slice_table.n_items, (64, 128, 64))
    model.load_state_dict(ckpt.model_state)
    optimizer = model.configure_optimizer(2e-3)
    optimizer.load_state_dict(ckpt.optimizer_state)
    assert optimizer.state_dict()["state"][0]["step"].item() == ckpt.step
    saved = torch.load(out / "model.pt", weights_only=True)["model_state"]
    for name, tensor in ckpt.model_state.items():
        assert torch.equal(saved[name], tensor)


def test_checkpoint_from_other_data_is_refused(trained, slice_table):
    _, out = trained
    other = real_slice(load_bundled_anime(), 300, 500)
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_checkpoint(out, other)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(out / "nowhere")


def test_recommend_excludes_seen_items_and_returns_raw_ids_and_titles(trained, slice_table):
    _, out = trained
    rec = Recommender(out)
    user_raw = str(slice_table.user_ids[5])
    recs = rec.for_user(user_raw, k=15)
    assert [r.rank for r in recs] == list(range(1, 16))
    seen_raw = set(slice_table.item_ids[slice_table.item[slice_table.user == 5]].tolist())
    title_of = dict(zip(slice_table.item_ids.tolist(), slice_table.item_titles.tolist()))
    for r in recs:
        assert r.item_id not in seen_raw
        assert r.title == title_of[r.item_id] and r.title
    scores = [r.score for r in recs]
    assert scores == sorted(scores, reverse=True)
    # The same ranking as scoring the user's whole row with the model directly.
    X = np.zeros((1, slice_table.n_items + 3), np.float32)
    row = np.unique(slice_table.item[slice_table.user == 5])
    X[0, row] = 1 / len(row)
    f = len(row) / slice_table.n_items
    X[0, -3:] = [f, np.sqrt(f), f * f]
    with torch.no_grad():
        logits = rec.model(torch.from_numpy(X))[0].numpy()
    logits[row] = -np.inf
    expected = slice_table.item_ids[np.argsort(-logits, kind="stable")[:15]].tolist()
    assert [r.item_id for r in recs] == expected
    with pytest.raises(UnknownId, match="not in the run's data"):
        rec.for_user("no-such-user")


def tiny_table(n_users=40, n_items=30, per_user=6, seed=0):
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), per_user).astype(np.int32)
    items = np.concatenate([rng.choice(n_items, per_user, replace=False) for _ in range(n_users)]).astype(np.int32)
    return RatingsTable(
        user=users,
        item=items,
        rating=None,
        timestamp=None,
        user_ids=np.arange(n_users) + 100,
        item_ids=np.arange(n_items) + 500,
        item_titles=None,
        source="tiny",
    )


def test_early_stopping_after_patience_evaluations_without_improvement(tmp_path):
    # lr = 0: the weights never change, so no evaluation after the first improves on it.
    cfg = TrainConfig(
        backend="cpu",
        out=str(tmp_path),
        batch_size=16,
        hidden=(4, 4, 4),
        lr=0.0,
        eval_every=2,
        eval_batches=2,
        patience=3,
        max_epochs=50,
    )
    result = train(cfg, tiny_table())
    assert [h["step"] for h in result.history] == [2, 4, 6, 8]
    assert result.steps == 8
    assert len({h["validation_loss"] for h in result.history}) == 1
    assert load_checkpoint(tmp_path).step == 2  # the best (first) model, not a later equal one


def test_max_steps_and_sampling_with_replacement(tmp_path):
    cfg = TrainConfig(
        backend="cpu",
        out=str(tmp_path),
        batch_size=16,
        hidden=(4, 4, 4),
        eval_every=5,
        eval_batches=1,
        max_steps=7,
        sampling="replacement",
    )
    result = train(cfg, tiny_table())
    assert result.steps == 7 and [h["step"] for h in result.history] == [5, 7]


def test_diverging_run_raises_and_leaves_no_run_directory(tmp_path, monkeypatch):
    import gpu_ann.training as train_module
    from gpu_ann.objective import Objective

    monkeypatch.setattr(Objective, "summed_cross_entropy", lambda self, batch: torch.tensor(float("nan")))
    cfg = TrainConfig(
        backend="cpu",
        out=str(tmp_path / "run"),
        batch_size=16,
        hidden=(4, 4, 4),
        lr=0.5,
        eval_every=2,
        eval_batches=1,
        max_steps=4,
    )
    with pytest.raises(train_module.TrainingDiverged, match="validation loss is nan at step 2; try a lower --lr"):
        train(cfg, tiny_table())
    assert not (tmp_path / "run").exists()


def test_a_failed_checkpoint_write_keeps_the_previous_file_whole(tmp_path, monkeypatch):
    from gpu_ann import checkpoint as ck

    cfg = TrainConfig(
        backend="cpu", out=str(tmp_path), batch_size=16, hidden=(4, 4, 4), max_steps=2, eval_every=2, eval_batches=1
    )
    train(cfg, tiny_table())
    before = (tmp_path / "model.pt").read_bytes()

    def crash_midway(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", crash_midway)
    state = load_checkpoint(tmp_path)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(tmp_path, state)
    assert (tmp_path / "model.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.toml",
        "curves.png",
        "data.npz",
        "last.pt",
        "metrics.jsonl",
        "model.pt",
    ]


def test_metrics_jsonl_and_curves_png_are_written_per_evaluation(trained):
    import json

    result, out = trained
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [h["step"] for h in result.history]
    for r, h in zip(records, result.history):
        assert r["validation_loss"] == pytest.approx(h["validation_loss"])
        assert r["train_loss"] == pytest.approx(h["train_loss"])
        assert r["samples_per_s"] > 0 and r["elapsed_s"] > 0 and r["epoch"] in (0, 1)
        assert r["popularity_validation_loss"] == pytest.approx(result.popularity_validation_loss)
    assert [r["improved"] for r in records][0] is True
    assert records[-1]["best_validation_loss"] == pytest.approx(result.best_validation_loss)
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image  # matplotlib depends on pillow

    with Image.open(out / "curves.png") as image:
        assert image.size == (700, 420)
        # Not a blank canvas: the curves and the baseline put several colours on it.
        assert len(image.convert("RGB").getcolors(maxcolors=1_000_000)) > 20


def test_tensorboard_logging_writes_the_same_scalars(tmp_path, monkeypatch):
    import sys
    import types

    written = []

    class FakeWriter:  # stands in for torch.utils.tensorboard.SummaryWriter (tensorboard is optional)
        def __init__(self, log_dir):
            written.append(("dir", log_dir))

        def add_scalar(self, tag, value, step):
            written.append((tag, step, value))

        def flush(self):
            pass

        def close(self):
            written.append(("closed",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    cfg = TrainConfig(
        backend="cpu",
        out=str(tmp_path),
        batch_size=16,
        hidden=(4, 4, 4),
        max_steps=4,
        eval_every=2,
        eval_batches=1,
        tensorboard=True,
    )
    result = train(cfg, tiny_table())
    assert written[0] == ("dir", str(tmp_path / "tensorboard")) and written[-1] == ("closed",)
    scalars = [w for w in written if len(w) == 3]
    assert [(tag, step) for tag, step, _ in scalars] == [
        (tag, step) for step in (2, 4) for tag in ("train_loss", "validation_loss", "samples_per_s")
    ]
    assert [v for tag, _, v in scalars if tag == "validation_loss"] == [h["validation_loss"] for h in result.history]


def test_logged_throughput_counts_the_training_steps_not_the_evaluation(tmp_path, monkeypatch):
    # Each evaluation batch sleeps 1 s: an evaluation (one fixed batch per split) takes at least 2 s, while 5
    # steps of this tiny model take milliseconds (up to 70 ms measured on a loaded 2-core machine). Counted in
    # the window, the evaluation at step 10 would cap the logged throughput at 5 x 16 / 2 = 40 samples/s.
    import time

    from gpu_ann.objective import Objective

    real = Objective.summed_cross_entropy

    def slow(self, batch):
        time.sleep(1.0)
        return real(self, batch)

    monkeypatch.setattr(Objective, "summed_cross_entropy", slow)
    cfg = TrainConfig(out=str(tmp_path / "run"), backend="cpu", hidden=(8, 8, 8), batch_size=16, max_steps=10,
                      eval_every=5, eval_batches=1, patience=100)  # fmt: skip
    result = train(cfg, tiny_table())
    first, second = result.history
    assert (first["step"], second["step"]) == (5, 10)
    # Twice the cap: a loaded machine has taken 430 ms for the 5 steps (184 samples/s), the evaluation alone 2 s.
    assert second["samples_per_s"] > 2 * 40, second

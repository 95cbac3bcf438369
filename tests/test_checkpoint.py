"""A checkpoint refused for other data or another model shape says what differs, word for word."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from gpu_ann.checkpoint import (
    MODEL_FILE,
    STATE_FILE,
    CheckpointError,
    load_checkpoint,
    load_resume_state,
)
from gpu_ann.data.table import RatingsTable
from gpu_ann.training import TrainConfig, resume_run, train


def table(n_users=20, n_items=17, seed=0, user_ids=None, item_ids=None, source="tiny") -> RatingsTable:
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), 5).astype(np.int32)
    items = np.concatenate([rng.choice(n_items, 5, replace=False) for _ in range(n_users)]).astype(np.int32)
    return RatingsTable(
        users, items, None, None,
        np.arange(n_users) + 100 if user_ids is None else np.asarray(user_ids),
        np.arange(n_items) + 500 if item_ids is None else np.asarray(item_ids),
        None, source=source,
    )  # fmt: skip


def run(out, data, hidden=(8, 8, 8)):
    cfg = TrainConfig(backend="cpu", out=str(out), batch_size=8, hidden=hidden, max_steps=6, eval_every=3,
                      eval_batches=1, patience=100)  # fmt: skip
    train(cfg, data)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run ``a`` (20 users, 17 items, hidden 8,8,8), ``b`` on other data (19 x 16), ``c`` on a's data, wider."""
    root = tmp_path_factory.mktemp("runs")
    return {
        "a": run(root / "a", table()),
        "b": run(root / "b", table(19, 16, seed=1, source="other")),
        "c": run(root / "c", table(), hidden=(8, 16, 8)),
    }


@pytest.fixture
def a(runs, tmp_path):
    """A copy of run ``a`` to change."""
    return shutil.copytree(runs["a"], tmp_path / "a")


def message(excinfo) -> str:
    return str(excinfo.value)


def rewrite(path, **changes):
    payload = torch.load(path, weights_only=True)
    for key, value in changes.items():
        if value is None:
            payload.pop(key)
        else:
            payload[key] = value
    torch.save(payload, path)


def fp(path) -> str:
    return torch.load(path, weights_only=True)["data_fingerprint"]


def test_other_sizes_are_named_with_both_numbers(runs):
    other = table(19, 16, seed=1, source="other.csv")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(runs["a"], other)
    path = runs["a"] / MODEL_FILE
    assert message(e) == (
        f"{path}: trained on other data than other.csv: n_users 20 in the checkpoint vs 19 in the data; "
        f"n_items 17 in the checkpoint vs 16 in the data (fingerprint {fp(path)} vs {fp(runs['b'] / MODEL_FILE)})"
    )


def test_the_same_sizes_with_other_ids_say_which_ids_differ(runs):
    path = runs["a"] / MODEL_FILE
    reordered = table(user_ids=np.arange(20)[::-1] + 100)  # the same users, in another order
    with pytest.raises(CheckpointError, match=r"trained on other data than tiny: the same 20 users but other user "
                                              r"ids or another order \(fingerprint "):  # fmt: skip
        load_checkpoint(runs["a"], reordered)
    both = table(user_ids=np.arange(20) + 1, item_ids=np.arange(17) + 1)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(runs["a"], both)
    assert message(e).startswith(
        f"{path}: trained on other data than tiny: the same 20 users but other user ids or another order; "
        "the same 17 items but other item ids or another order (fingerprint "
    )


def test_a_version_1_file_loads_and_its_refusal_uses_the_output_layer(a):
    path = a / MODEL_FILE
    v2 = load_checkpoint(a, table())
    assert v2.data_summary["n_users"] == 20 and v2.data_summary["n_items"] == 17
    rewrite(path, format_version=1, data_summary=None)  # as gpu-ann wrote it before data_summary existed
    ckpt = load_checkpoint(a, table())
    assert ckpt.data_summary is None and ckpt.step == v2.step
    assert all(torch.equal(ckpt.model_state[k], v2.model_state[k]) for k in v2.model_state)
    with pytest.raises(CheckpointError, match=r"other data than other: n_items 17 in the checkpoint vs 16 in the "
                                              r"data \(fingerprint"):  # fmt: skip
        load_checkpoint(a, table(19, 16, seed=1, source="other"))
    # Only n_items can be read from a version 1 file's weights: with the same number, the message says so.
    with pytest.raises(CheckpointError, match=r"other data than tiny: other users or items \(the checkpoint is of "
                                              r"format version 1, which stores no sizes\) \(fingerprint"):  # fmt: skip
        load_checkpoint(a, table(user_ids=np.arange(20) + 1))


def test_an_unknown_format_version_is_named(a):
    rewrite(a / MODEL_FILE, format_version=3)
    rewrite(a / STATE_FILE, format_version=None)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(a)
    assert message(e) == f"{a / MODEL_FILE}: format version 3, this gpu-ann reads versions 1 and 2"
    with pytest.raises(CheckpointError) as e:
        load_resume_state(a)
    assert message(e) == f"{a / STATE_FILE}: format version None, this gpu-ann reads versions 1 and 2"


def test_weights_of_another_shape_than_their_config_name_the_hidden_sizes(a):
    payload = torch.load(a / MODEL_FILE, weights_only=True)
    rewrite(a / MODEL_FILE, config={**payload["config"], "hidden": [8, 16, 8]})
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(a)
    assert message(e) == (
        f"{a / MODEL_FILE}: a model of another shape: hidden (8,8,8) in the weights vs (8,16,8) in its config"
    )
    state = torch.load(a / STATE_FILE, weights_only=True)
    rewrite(a / STATE_FILE, config={**state["config"], "hidden": [4, 8, 8]})
    with pytest.raises(CheckpointError) as e:
        load_resume_state(a)
    assert message(e) == (
        f"{a / STATE_FILE}: a model of another shape: hidden (8,8,8) in the weights vs (4,8,8) in its config"
    )


def test_resume_refuses_data_npz_of_other_data_naming_the_sizes(a, runs):
    shutil.copy(runs["b"] / "data.npz", a / "data.npz")
    rewrite(a / STATE_FILE, finished=False)
    with pytest.raises(CheckpointError) as e:
        resume_run(a)
    assert message(e) == (
        f"{a}: last.pt and data.npz come from different data: n_users 20 in last.pt vs 19 in data.npz; "
        "n_items 17 in last.pt vs 16 in data.npz"
    )
    rewrite(a / STATE_FILE, format_version=1, data_summary=None)  # a version 1 last.pt: n_items from its weights
    with pytest.raises(CheckpointError) as e:
        resume_run(a)
    assert message(e) == f"{a}: last.pt and data.npz come from different data: n_items 17 in last.pt vs 16 in data.npz"


def test_resume_refuses_a_model_pt_of_other_data_or_another_shape(a, runs):
    rewrite(a / STATE_FILE, finished=False)
    before = (a / STATE_FILE).read_bytes()
    shutil.copy(runs["c"] / MODEL_FILE, a / MODEL_FILE)  # same data, hidden (8,16,8): consistent with itself
    with pytest.raises(CheckpointError) as e:
        resume_run(a)
    assert message(e) == (
        f"{a / MODEL_FILE}: a model of another shape: hidden (8,16,8) in the weights vs (8,8,8) in last.pt"
    )
    shutil.copy(runs["b"] / MODEL_FILE, a / MODEL_FILE)
    with pytest.raises(CheckpointError) as e:
        resume_run(a)
    assert message(e).startswith(
        f"{a / MODEL_FILE}: trained on other data than tiny: n_users 19 in the checkpoint vs 20 in the data; "
        "n_items 16 in the checkpoint vs 17 in the data (fingerprint "
    )
    assert (a / STATE_FILE).read_bytes() == before  # refused before any step


def test_scoring_and_recommending_print_what_differs(a, runs, tmp_path, capsys):
    from gpu_ann.cli import main

    shutil.copy(runs["b"] / MODEL_FILE, a / MODEL_FILE)
    out = tmp_path / "top.csv"
    assert main(["score", "--checkpoint", str(a), "--out", str(out), "--backend", "cpu"]) == 2
    err = capsys.readouterr().err
    assert (
        f"gpu-ann score: error: {a / MODEL_FILE}: trained on other data than tiny: n_users 19 in the checkpoint "
        "vs 20 in the data; n_items 16 in the checkpoint vs 17 in the data (fingerprint "
    ) in err
    assert not out.exists()
    assert main(["recommend", "--checkpoint", str(a), "--user", "100"]) == 2
    assert "n_items 16 in the checkpoint vs 17 in the data" in capsys.readouterr().err

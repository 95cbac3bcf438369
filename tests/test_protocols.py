"""The split protocols, each against hand-built expectations."""

import numpy as np
import pytest

from gpu_ann.data.table import DataError, RatingsTable
from gpu_ann.splits import FOLD_IN, TEST, TRAIN, VALIDATION, make_split, splits_from_assignment


def table_with(counts, n_items=50, timestamps=False, seed=0):
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(len(counts)), counts).astype(np.int32)
    items = np.concatenate([rng.choice(n_items, c, replace=False) for c in counts]).astype(np.int32)
    ts = rng.permutation(len(users)).astype(np.int64) if timestamps else None
    return RatingsTable(users, items, None, ts, np.arange(len(counts)), np.arange(n_items), None, source="t")


def per_user_codes(table, assignment, u):
    return np.bincount(assignment[table.user == u], minlength=4).tolist()


def test_per_user_holds_out_a_share_of_each_eligible_users_items():
    t = table_with([10, 20, 4, 5, 1])
    splits, a = make_split(t, "per-user", (0.8, 0.1, 0.1), seed=3, min_items=5)
    assert per_user_codes(t, a, 0) == [8, 1, 1, 0]
    assert per_user_codes(t, a, 1) == [16, 2, 2, 0]
    assert per_user_codes(t, a, 2) == [4, 0, 0, 0]  # fewer than 5 items: all in training
    assert per_user_codes(t, a, 3) == [3, 1, 1, 0]  # round(0.5) = 0 -> at least 1
    assert per_user_codes(t, a, 4) == [1, 0, 0, 0]
    _, again = make_split(t, "per-user", (0.8, 0.1, 0.1), seed=3, min_items=5)
    np.testing.assert_array_equal(a, again)
    _, other = make_split(t, "per-user", (0.8, 0.1, 0.1), seed=4, min_items=5)
    assert not np.array_equal(a, other)
    assert len(splits.validation) == 1 + 2 + 1 and len(splits.fold_in) == 0


def test_leave_last_takes_each_users_latest_items_by_timestamp():
    t = table_with([6, 3, 2, 7], timestamps=True)
    splits, a = make_split(t, "leave-last", leave_last=1)
    for u in range(4):
        mine = np.flatnonzero(t.user == u)
        by_time = mine[np.argsort(t.timestamp[mine], kind="stable")]
        if len(mine) >= 3:
            assert a[by_time[-1]] == TEST and a[by_time[-2]] == VALIDATION
            assert (a[by_time[:-2]] == TRAIN).all()
        else:
            assert (a[mine] == TRAIN).all()
    _, a2 = make_split(t, "leave-last", leave_last=2)
    assert per_user_codes(t, a2, 0) == [2, 2, 2, 0] and per_user_codes(t, a2, 1) == [3, 0, 0, 0]


def test_leave_last_ties_keep_file_order_and_needs_timestamps():
    t = table_with([4])
    t.timestamp = np.array([5, 9, 9, 1], np.int64)
    _, a = make_split(t, "leave-last")
    assert a.tolist() == [TRAIN, VALIDATION, TEST, TRAIN]  # equal times: the later row is later
    with pytest.raises(DataError, match="needs timestamps"):
        make_split(table_with([5]), "leave-last")


def test_held_out_users_are_kept_out_of_training_with_fold_in_inputs():
    counts = [10] * 20 + [5] * 10
    t = table_with(counts)
    splits, a = make_split(t, "users", (0.8, 0.1, 0.1), seed=1, fold_in=0.8)
    roles = {}
    for u in range(len(counts)):
        codes = set(a[t.user == u].tolist())
        if codes == {TRAIN}:
            roles[u] = "train"
        else:
            assert TRAIN not in codes
            scored = VALIDATION if VALIDATION in codes else TEST
            assert codes <= {FOLD_IN, scored}
            n = counts[u]
            assert per_user_codes(t, a, u)[FOLD_IN] == round(0.8 * n)
            roles[u] = "validation" if scored == VALIDATION else "test"
    assert sorted(roles.values()).count("train") == 24 and list(roles.values()).count("validation") == 3
    inputs = splits.inputs
    assert len(inputs) == len(splits.train) + len(splits.fold_in)
    assert set(zip(splits.validation.user.tolist(), splits.validation.item.tolist())).isdisjoint(
        zip(inputs.user.tolist(), inputs.item.tolist())
    )
    rebuilt = splits_from_assignment(t, a)
    np.testing.assert_array_equal(rebuilt.fold_in.item, splits.fold_in.item)


def test_unknown_protocol():
    with pytest.raises(ValueError, match="unknown protocol 'odd'"):
        make_split(table_with([5]), "odd")


def test_training_and_ranking_under_the_held_out_users_protocol(tmp_path):
    from gpu_ann.evaluate import evaluate_run
    from gpu_ann.training import TrainConfig, train

    t = table_with([12] * 60, n_items=40)
    cfg = TrainConfig(
        backend="cpu",
        out=str(tmp_path),
        protocol="users",
        batch_size=32,
        hidden=(8, 8, 8),
        max_steps=4,
        eval_every=2,
        eval_batches=2,
    )
    result = train(cfg, t)
    assert result.steps == 4
    r = evaluate_run(tmp_path, "test", backend="cpu", ks=(5,))
    assert r["ranking"]["model"]["users"] == 6  # 10% of 60 users, each with 12 - round(9.6) = 2 scored items
    assert r["samples"] == 6 * 2
    # A held-out user's fold-in items are its input and are excluded from its ranking: with them removed,
    # recall@5 could not be computed on those items.
    _, a = make_split(t, "users", (0.8, 0.1, 0.1), seed=0, fold_in=0.8)
    assert np.bincount(a, minlength=4)[FOLD_IN] == 12 * 10


def test_every_user_keeps_a_training_item_and_every_held_out_user_an_item_to_score():
    t = table_with([1, 2, 3, 1, 2, 6] * 5)
    _, a = make_split(t, "per-user", (0.5, 0.25, 0.25), seed=0, min_items=1)
    for u in range(t.n_users):
        assert per_user_codes(t, a, u)[TRAIN] >= 1
    _, a = make_split(t, "users", (0.4, 0.3, 0.3), seed=0, fold_in=0.9)
    for u in range(t.n_users):
        codes = per_user_codes(t, a, u)
        if codes[TRAIN] == 0:
            assert codes[VALIDATION] + codes[TEST] >= 1


def test_a_split_given_as_files_is_joined_with_merged_ids(tmp_path, capsys):
    from gpu_ann.checkpoint import load_data
    from gpu_ann.cli import main

    rng = np.random.default_rng(0)
    rows = {name: [] for name in ("train", "validation", "test")}
    for u in range(50):
        items = rng.choice(30, 8, replace=False)
        rows["train"] += [(u, i) for i in items[:6]]
        rows["validation"].append((u, items[6]))
        rows["test"].append((u, items[7]))
    rows["validation"].append((999, 77))  # a user and an item that training has never seen
    paths = {}
    for name, pairs in rows.items():
        paths[name] = tmp_path / f"{name}.csv"
        paths[name].write_text("user,item\n" + "".join(f"{u},{i}\n" for u, i in pairs))
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--train",
            str(paths["train"]),
            "--validation",
            str(paths["validation"]),
            "--test",
            str(paths["test"]),
            "--backend",
            "cpu",
            "--out",
            str(out),
            "--batch-size",
            "32",
            "--hidden",
            "8,8,8",
            "--max-steps",
            "4",
            "--eval-every",
            "2",
            "--eval-batches",
            "1",
        ]
    )
    assert code == 0, capsys.readouterr().err
    table, assignment = load_data(out)
    assert np.bincount(assignment, minlength=3).tolist() == [300, 51, 50]
    assert 999 in table.user_ids.tolist() and 77 in table.item_ids.tolist()
    # Every (user, item) pair comes back in its file's split, in raw ids.
    for code, name in enumerate(("train", "validation", "test")):
        got = set(
            zip(
                table.user_ids[table.user[assignment == code]].tolist(),
                table.item_ids[table.item[assignment == code]].tolist(),
            )
        )
        assert got == set(rows[name])


def test_split_files_with_int_and_text_ids_compare_as_text():
    from gpu_ann.splits import splits_from_tables

    a = RatingsTable(
        np.array([0, 1], np.int32),
        np.array([0, 1], np.int32),
        None,
        None,
        np.array([1, 2]),
        np.array([10, 20]),
        None,
        source="a",
    )
    b = RatingsTable(
        np.array([0], np.int32),
        np.array([0], np.int32),
        None,
        None,
        np.array(["2"]),
        np.array(["x"]),
        np.array(["Title X"]),
        source="b",
    )
    table, splits, assignment = splits_from_tables(a, b)
    assert table.user_ids.tolist() == ["1", "2"] and table.item_ids.tolist() == ["10", "20", "x"]
    assert table.item_titles.tolist() == ["", "", "Title X"]
    assert assignment.tolist() == [TRAIN, TRAIN, VALIDATION]
    assert splits.validation.user.tolist() == [1] and splits.validation.item.tolist() == [2]


def test_an_item_only_in_held_out_files_is_no_label_but_ranked_and_counted_like_any_other(tmp_path):
    import torch

    from gpu_ann.checkpoint import load_checkpoint, load_data
    from gpu_ann.evaluate import evaluate_run
    from gpu_ann.model import CandidateGenerator
    from gpu_ann.scoring import score_run
    from gpu_ann.training import TrainConfig, train

    rng = np.random.default_rng(0)
    rows = {name: [] for name in ("train", "validation", "test")}
    for u in range(40):
        items = rng.choice(20, 7, replace=False)
        rows["train"] += [(u, i) for i in items[:6]]
        rows["validation"].append((u, 99 if u < 10 else items[6]))  # item 99: ten users' only held-out item
        rows["test"].append((u, 99 if u >= 30 else items[6]))
    paths = []
    for name, pairs in rows.items():
        paths.append(tmp_path / f"{name}.csv")
        paths[-1].write_text("user,item\n" + "".join(f"{u},{i}\n" for u, i in pairs))
    cfg = TrainConfig(backend="cpu", out=str(tmp_path / "run"), train_file=str(paths[0]), validation_file=str(paths[1]),
                      test_file=str(paths[2]), batch_size=16, hidden=(8, 8, 8), max_steps=20, eval_every=10,
                      eval_batches=1, input_path="dense")  # fmt: skip
    train(cfg)
    table, assignment = load_data(tmp_path / "run")
    z = table.item_ids.tolist().index(99)
    assert table.n_items == 21 and not np.any(table.item[assignment == TRAIN] == z)  # never a training label
    # Training: no input row holds it, so its embedding keeps its initial value; the full softmax only pushes its
    # output down.
    torch.manual_seed(cfg.seed)
    initial = CandidateGenerator(table.n_items, cfg.hidden).state_dict()
    trained = load_checkpoint(tmp_path / "run").model_state
    assert torch.equal(trained["embed.item_table"][z], initial["embed.item_table"][z])
    assert not torch.equal(trained["embed.item_table"][0], initial["embed.item_table"][0])
    assert trained["out.bias"][z] < initial["out.bias"][z]
    # Evaluation: its ten validation interactions count in the loss and as held-out items of recall. With K the
    # whole catalogue every unmasked item is in the list, so recall@21 is 1 only if item 99 is ranked too.
    r = evaluate_run(tmp_path / "run", "validation", backend="cpu", ks=(21,))
    assert r["samples"] == 40 and np.isfinite(r["loss"])
    assert r["ranking"]["model"]["users"] == 40 and r["ranking"]["model"]["recall@21"] == 1.0
    # Scoring: it is in every scored user's top 21 (none has it as an input item).
    summary = score_run(tmp_path / "run", tmp_path / "top.csv", k=21, split="test", backend="cpu")
    lines = (tmp_path / "top.csv").read_text().splitlines()[1:]
    assert summary.users == 40 and sum(line.split(",")[2] == "99" for line in lines) == 40

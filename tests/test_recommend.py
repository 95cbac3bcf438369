"""Recommending for a new user given as items (no retraining), ties, and the recommend command."""

import numpy as np
import pytest
import torch

from gpu_ann.cli import main
from gpu_ann.data.readers import load_bundled_anime
from gpu_ann.data.table import RatingsTable
from gpu_ann.recommend import AmbiguousTitle, Recommender, UnknownId
from gpu_ann.training import TrainConfig, train


def anime_slice(n_users: int, n_items: int) -> RatingsTable:
    """The first users' interactions with the most popular of their items, with real titles."""
    from test_train import real_slice

    return real_slice(load_bundled_anime(), n_users, n_items)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    table = anime_slice(250, 120)
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(
        backend="cpu", out=str(out), batch_size=128, hidden=(16, 32, 16), eval_every=15, eval_batches=2, max_steps=30
    )
    train(cfg, table)
    return table, out


def hand_ranking(model, n_items: int, row: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Item indices and scores of the top ``k``, computed with numpy from the README's input definition."""
    row = np.unique(row).astype(np.int64)
    w = max(len(row), 1)  # the kernel's convention: w = 1 for an empty row
    X = np.zeros((1, n_items + 3), np.float32)
    X[0, row] = 1 / w
    f = w / n_items
    X[0, -3:] = [f, np.sqrt(f), f * f]
    with torch.no_grad():
        logits = model(torch.from_numpy(X))[0].numpy().copy()
    logits[row] = -np.inf
    order = np.argsort(-logits, kind="stable")[: min(k, n_items - len(row))]
    return order, logits[order]


def test_for_items_equals_the_hand_computation(run):
    table, out = run
    rec = Recommender(out)
    chosen = np.array([3, 17, 40, 41, 99])
    entries = [str(table.item_ids[i]) for i in chosen[:3]] + [str(t) for t in table.item_titles[chosen[3:]]]
    recs = rec.for_items(entries, k=12)
    want, scores = hand_ranking(rec.model, table.n_items, chosen, 12)
    assert [r.item_id for r in recs] == table.item_ids[want].tolist()
    assert [r.title for r in recs] == table.item_titles[want].tolist()
    np.testing.assert_allclose([r.score for r in recs], scores, rtol=1e-5, atol=1e-6)
    assert [r.rank for r in recs] == list(range(1, 13))
    assert not {r.item_id for r in recs} & set(table.item_ids[chosen].tolist())
    # Asking for more than is left gives everything but the given items.
    assert len(rec.for_items(entries, k=10_000)) == table.n_items - len(chosen)
    # No items at all: the row is empty and only the count features (w = 1) speak.
    want, _ = hand_ranking(rec.model, table.n_items, np.array([], dtype=np.int64), 6)
    assert [r.item_id for r in rec.for_items([], k=6)] == table.item_ids[want].tolist()


def test_ids_and_titles_resolve_to_the_same_items(run):
    table, out = run
    rec = Recommender(out)
    i = 7
    raw, title = table.item_ids[i].item(), str(table.item_titles[i])
    assert rec.item_index(str(raw)) == rec.item_index(title) == rec.item_index(title.upper()) == i
    assert rec.item_index(raw) == i  # an int works as its decimal text
    by_id = rec.for_items([str(table.item_ids[j]) for j in (2, 5, 7)], k=8)
    by_title = rec.for_items([str(table.item_titles[j]).lower() for j in (7, 5, 2)], k=8)
    repeated = rec.for_items([str(raw), title, str(table.item_ids[2]), str(table.item_titles[5]), title], k=8)
    assert by_id == by_title == repeated
    with pytest.raises(UnknownId):
        rec.item_index("0" + str(raw))  # ids match their decimal text exactly
    with pytest.raises(TypeError, match="list"):
        rec.for_items(title)


def test_unknown_entry_is_named_with_close_titles(run):
    table, out = run
    rec = Recommender(out)
    title = str(table.item_titles[0])
    typo = title[:-1] + ("x" if title[-1] != "x" else "y")
    with pytest.raises(UnknownId) as info:
        rec.for_items([str(table.item_ids[1]), typo])
    message = info.value.args[0]
    assert repr(typo) in message and "close titles:" in message and repr(title) in message
    suggested = message.split("close titles:", 1)[1]
    assert suggested.count("'") <= 6  # at most three suggestions
    with pytest.raises(UnknownId, match="no close titles"):
        rec.for_items(["zzzzzzzzzzzzzzzzzzzzzzzz"])


def test_a_title_shared_by_two_items_is_refused_with_their_ids(run, tmp_path):
    import shutil

    from gpu_ann.checkpoint import load_data, save_data

    table, out = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    stored, assignment = load_data(copy)
    titles = stored.item_titles.copy()
    titles[4] = titles[3].upper()  # titles are outside the fingerprint: the model still fits
    stored.item_titles = titles
    save_data(copy, stored, assignment)
    rec = Recommender(copy)
    with pytest.raises(AmbiguousTitle, match=f"ids {table.item_ids[3]}, {table.item_ids[4]}"):
        rec.item_index(str(titles[3]))
    assert rec.item_index(str(table.item_ids[4])) == 4  # the id still works


def test_a_known_users_whole_history_as_items_ranks_like_for_user(run):
    table, out = run
    rec = Recommender(out)
    for u in (0, 11, 123):
        history = np.unique(table.item[table.user == u])
        as_items = rec.for_items([str(table.item_ids[i]) for i in history], k=25)
        as_user = rec.for_user(str(table.user_ids[u]), k=25)
        assert as_items == as_user
        want, _ = hand_ranking(rec.model, table.n_items, history, 25)
        assert [r.item_id for r in as_user] == table.item_ids[want].tolist()


def test_equal_scores_go_to_the_lower_item_index(run):
    table, out = run
    rec = Recommender(out)
    with torch.no_grad():
        rec.model.out.weight.zero_()
        rec.model.out.bias.zero_()  # every item scores 0
    u = 4
    history = np.unique(table.item[table.user == u])
    expected = [i for i in range(table.n_items) if i not in set(history.tolist())][:30]
    assert [r.item_id for r in rec.for_user(str(table.user_ids[u]), k=30)] == table.item_ids[expected].tolist()
    given = [str(table.item_ids[i]) for i in (0, 2, 5)]
    assert [r.item_id for r in rec.for_items(given, k=5)] == table.item_ids[[1, 3, 4, 6, 7]].tolist()


def test_recommend_command_for_a_new_user(run, capsys):
    table, out = run
    title = str(table.item_titles[9])
    argv = ["recommend", "--checkpoint", str(out), "--items", str(table.item_ids[3]), title.lower(), "-k", "4"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("top 4 for a new user with 2 given item(s)")
    recs = Recommender(out).for_items([str(table.item_ids[3]), title], k=4)
    assert [line.split(None, 2)[1:] for line in lines[1:]] == [[str(r.item_id), r.title] for r in recs]

    assert main(["recommend", "--checkpoint", str(out), "--items", title + "zz"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpu-ann recommend: error: item ") and repr(title) in err

    with pytest.raises(SystemExit) as exit_info:
        main(["recommend", "--checkpoint", str(out), "--user", "1", "--items", title])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err

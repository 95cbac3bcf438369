"""``gpu-ann score``: top-K files and the score matrix against a hand computation from the model."""

import numpy as np
import pandas as pd
import pytest
import torch
from test_recommend import anime_slice

from gpu_ann.checkpoint import load_checkpoint, load_data
from gpu_ann.cli import main
from gpu_ann.model import CandidateGenerator
from gpu_ann.scoring import ScoringError, id_file_paths, matrix_bytes, score_run
from gpu_ann.splits import TRAIN
from gpu_ann.training import TrainConfig, train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    table = anime_slice(200, 90)
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(
        backend="cpu", out=str(out), batch_size=128, hidden=(16, 32, 16), eval_every=10, eval_batches=2, max_steps=20
    )
    train(cfg, table)
    return out


def hand_scores(run_dir, users: np.ndarray) -> np.ndarray:
    """Model scores of the users' training rows, built with numpy; training items set to -inf."""
    table, assignment = load_data(run_dir)
    ckpt = load_checkpoint(run_dir)
    model = CandidateGenerator(table.n_items, tuple(ckpt.config["hidden"]))
    model.load_state_dict(ckpt.model_state)
    n = table.n_items
    X = np.zeros((len(users), n + 3), np.float32)
    rows = []
    for r, u in enumerate(users):
        row = np.unique(table.item[(table.user == u) & (assignment == TRAIN)])
        w = max(len(row), 1)  # the kernel's convention: w = 1 for an empty row
        X[r, row] = 1 / w
        f = w / n
        X[r, -3:] = [f, np.sqrt(f), f * f]
        rows.append(row)
    with torch.no_grad():
        scores = model(torch.from_numpy(X)).numpy().copy()
    for r, row in enumerate(rows):
        scores[r, row] = -np.inf
    return scores


def split_users(run_dir, code: int) -> np.ndarray:
    table, assignment = load_data(run_dir)
    return np.unique(table.user[assignment == code])


def assert_same_top_k(frame: pd.DataFrame, run_dir, users: np.ndarray, k: int) -> None:
    """The file's rows are, user by user in index order, the stable top ``k`` of the hand scores."""
    table, _ = load_data(run_dir)
    scores = hand_scores(run_dir, users)
    assert frame["user_id"].drop_duplicates().tolist() == table.user_ids[users].tolist()
    for r, u in enumerate(users):
        got = frame[frame["user_id"] == table.user_ids[u]]
        order = np.argsort(-scores[r], kind="stable")
        order = order[np.isfinite(scores[r, order])][:k]
        assert got["rank"].tolist() == list(range(1, len(order) + 1))
        assert got["item_id"].tolist() == table.item_ids[order].tolist()
        np.testing.assert_allclose(got["score"].to_numpy(), scores[r, order], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_top_k_file_equals_the_hand_computation(run, tmp_path, suffix):
    out = tmp_path / f"top{suffix}"
    summary = score_run(run, out, k=7, split="test", backend="cpu", batch_size=37)
    frame = pd.read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
    assert list(frame.columns) == ["user_id", "rank", "item_id", "score"]
    users = split_users(run, 2)
    assert summary.users == len(users) and summary.rows == len(frame) == 7 * len(users)
    assert_same_top_k(frame, run, users, 7)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left behind


def test_matrix_rows_are_the_model_scores_with_training_items_excluded(run, tmp_path):
    out, matrix = tmp_path / "top.parquet", tmp_path / "scores.npy"
    summary = score_run(run, out, k=200, split="validation", matrix=matrix, backend="cpu", batch_size=50)
    table, _ = load_data(run)
    users = split_users(run, 1)
    scores = np.load(matrix)
    assert scores.dtype == np.float32 and scores.shape == (len(users), table.n_items)
    np.testing.assert_allclose(scores, hand_scores(run, users), rtol=1e-5, atol=1e-6)  # -inf where trained
    users_txt, items_txt = id_file_paths(matrix)
    assert summary.id_files == (users_txt, items_txt)
    assert users_txt.read_text().split() == [str(v) for v in table.user_ids[users]]
    assert items_txt.read_text().split() == [str(v) for v in table.item_ids]
    # k above the catalogue: every item left per user, i.e. every finite entry of the matrix.
    frame = pd.read_parquet(out)
    assert len(frame) == summary.rows == int(np.isfinite(scores).sum())
    assert_same_top_k(frame, run, users, 200)


def test_all_users_are_scored_in_user_index_order(run, tmp_path):
    matrix = tmp_path / "all.npy"
    summary = score_run(run, tmp_path / "top.csv", k=3, all_users=True, matrix=matrix, backend="cpu")
    table, _ = load_data(run)
    assert summary.users == table.n_users
    assert np.load(matrix).shape == (table.n_users, table.n_items)
    assert id_file_paths(matrix)[0].read_text().split() == [str(v) for v in table.user_ids]


def test_a_matrix_above_the_limit_is_refused_before_anything_is_written(run, tmp_path, capsys):
    table, _ = load_data(run)
    n_users = len(split_users(run, 2))
    need = matrix_bytes(n_users, table.n_items)
    out, matrix = tmp_path / "top.csv", tmp_path / "scores.npy"
    out.write_text("previous\n")
    with pytest.raises(ScoringError) as info:
        score_run(run, out, matrix=matrix, max_matrix_bytes=need - 1, backend="cpu")
    message = str(info.value)
    assert f"{n_users:,} users x {table.n_items:,} items" in message and f"{need:,} bytes" in message
    assert "--max-matrix-bytes" in message
    assert out.read_text() == "previous\n" and sorted(p.name for p in tmp_path.iterdir()) == ["top.csv"]
    score_run(run, out, matrix=matrix, max_matrix_bytes=need, backend="cpu")  # exactly the limit fits
    assert np.load(matrix).nbytes == need

    code = main(["score", "--checkpoint", str(run), "--out", str(out), "--matrix", str(matrix)] + ["--all-users"])
    assert code == 0
    argv = ["score", "--checkpoint", str(run), "--out", str(out), "--matrix", str(matrix), "--max-matrix-bytes", "1K"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpu-ann score: error: the score matrix of ") and "above the limit of 1,000 bytes" in err


def test_a_failure_while_scoring_leaves_no_partial_file(run, tmp_path, monkeypatch):
    out, matrix = tmp_path / "top.parquet", tmp_path / "scores.npy"
    out.write_bytes(b"previous")
    calls = []

    def failing_forward(self, x):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return self.out(self.mlp(self.embed(x)))

    monkeypatch.setattr(CandidateGenerator, "forward", failing_forward)
    with pytest.raises(RuntimeError, match="device lost"):
        score_run(run, out, k=5, matrix=matrix, backend="cpu", batch_size=10)
    assert out.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["top.parquet"]


def test_bad_output_names_are_refused(run, tmp_path):
    with pytest.raises(ScoringError, match=r"\.parquet or \.csv"):
        score_run(run, tmp_path / "top.json")
    with pytest.raises(ScoringError, match=r"\.npy"):
        score_run(run, tmp_path / "top.csv", matrix=tmp_path / "scores.bin")


def test_score_command_writes_text_ids(tmp_path, capsys):
    from test_cli import train_tiny, write_ratings

    data = tmp_path / "ratings.csv"
    write_ratings(data)
    run_dir = tmp_path / "run"
    assert train_tiny(data, run_dir, steps=4, eval_every=2) == 0
    capsys.readouterr()
    out = tmp_path / "top.csv"
    argv = ["score", "--checkpoint", str(run_dir), "--split", "test", "-k", "5", "--out", str(out), "--backend", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    frame = pd.read_csv(out, dtype={"user_id": str, "item_id": str})
    users = split_users(run_dir, 2)
    assert f"scored {len(users):,} users (users with test items)" in printed
    assert f"top-5: {len(frame):,} rows" in printed
    assert frame["user_id"].str.startswith("u").all() and frame["item_id"].str.startswith("i").all()
    assert_same_top_k(frame, run_dir, users, 5)

"""Baselines (popularity, biases, EASE) against hand computations and plain numpy references, cpu backend."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from gpu_ann.backend import get_backend
from gpu_ann.baselines import EASE, Biases, Popularity
from gpu_ann.metrics import popularity_log_probs


@pytest.fixture(scope="module")
def cpu():
    return get_backend("cpu")


# --- Popularity -------------------------------------------------------------------------------------


def test_popularity_is_log_of_add_one_counts(cpu):
    users = np.array([0, 1, 1, 2], dtype=np.int32)
    items = np.array([0, 0, 1, 3], dtype=np.int32)
    # counts [2, 1, 0, 1, 0] + 1 = [3, 2, 1, 2, 1], total 9
    expected = np.log(np.array([3, 2, 1, 2, 1]) / 9.0)
    model = Popularity().fit(users, items, n_users=3, n_items=5, backend=cpu)
    scores = model.score_batch(np.array([2, 0]))
    assert isinstance(scores, torch.Tensor) and scores.shape == (2, 5) and scores.device.type == "cpu"
    np.testing.assert_allclose(scores.numpy(), np.stack([expected, expected]), rtol=1e-12)
    np.testing.assert_allclose(model.log_probs, popularity_log_probs(items, 5), rtol=1e-12)


def test_popularity_scores_share_one_buffer(cpu):
    model = Popularity().fit(np.array([0, 1]), np.array([1, 1]), 2, 3, cpu)
    a, b = model.score_batch(np.array([0])), model.score_batch(np.array([0, 1]))
    assert a.data_ptr() == b.data_ptr() == model.log_probs.ctypes.data  # zero copy


def test_unfitted_and_bad_inputs(cpu):
    with pytest.raises(RuntimeError, match="fit"):
        Popularity().score_batch(np.array([0]))
    with pytest.raises(ValueError, match="item index out of range"):
        Popularity().fit(np.array([0]), np.array([5]), 1, 5, cpu)
    with pytest.raises(ValueError, match="equal length"):
        EASE().fit(np.array([0, 1]), np.array([0]), 2, 2, cpu)
    with pytest.raises(ValueError, match="empty"):
        Popularity().fit(np.array([], dtype=np.int32), np.array([], dtype=np.int32), 1, 1, cpu)


# --- Biases -----------------------------------------------------------------------------------------

# 4 users x 3 items, 9 ratings; user 4 has none (n_users=5).
B_USERS = np.array([0, 0, 0, 1, 1, 2, 2, 3, 3], dtype=np.int32)
B_ITEMS = np.array([0, 1, 2, 0, 2, 1, 2, 0, 1], dtype=np.int32)
B_RATINGS = np.array([5, 3, 4, 4, 1, 2, 5, 3, 4], dtype=np.float32)


def _ridge_reference(users, items, ratings, n_users, n_items, reg_user, reg_item):
    """The same objective solved directly: least squares on [one-hot users | one-hot items] with ridge rows."""
    mu = ratings.astype(np.float64).mean()
    design = np.zeros((len(users), n_users + n_items))
    design[np.arange(len(users)), users] = 1.0
    design[np.arange(len(users)), n_users + items] = 1.0
    ridge = np.diag(np.r_[np.full(n_users, np.sqrt(reg_user)), np.full(n_items, np.sqrt(reg_item))])
    A = np.vstack([design, ridge])
    b = np.r_[ratings - mu, np.zeros(n_users + n_items)]
    solution = np.linalg.lstsq(A, b, rcond=None)[0]
    return mu, solution[:n_users], solution[n_users:]


@pytest.mark.parametrize("reg_user, reg_item", [(2.0, 3.0), (10.0, 25.0), (0.5, 0.0)])
def test_biases_match_regularised_least_squares(cpu, reg_user, reg_item):
    model = Biases(reg_user=reg_user, reg_item=reg_item, n_sweeps=500, tol=1e-12)
    model.fit(B_USERS, B_ITEMS, B_RATINGS, 5, 3, cpu)
    mu, b_u, b_i = _ridge_reference(B_USERS, B_ITEMS, B_RATINGS, 5, 3, reg_user, reg_item)
    assert model.converged and model.sweeps < 500
    assert model.global_mean == pytest.approx(mu)
    np.testing.assert_allclose(model.user_bias, b_u, atol=1e-6)
    np.testing.assert_allclose(model.item_bias, b_i, atol=1e-6)
    assert model.user_bias[4] == 0.0  # no ratings: the prior, 0


def test_biases_predict_residuals_and_scores(cpu):
    model = Biases(reg_user=2.0, reg_item=3.0, n_sweeps=500, tol=1e-12).fit(B_USERS, B_ITEMS, B_RATINGS, 5, 3, cpu)
    mu, b_u, b_i = _ridge_reference(B_USERS, B_ITEMS, B_RATINGS, 5, 3, 2.0, 3.0)
    pred = model.predict(B_USERS, B_ITEMS)
    np.testing.assert_allclose(pred, mu + b_u[B_USERS] + b_i[B_ITEMS], atol=1e-6)
    res = model.residuals(B_USERS, B_ITEMS, B_RATINGS)
    assert res.dtype == np.float32
    np.testing.assert_allclose(res, B_RATINGS - pred, rtol=1e-6, atol=1e-6)
    scores = model.score_batch(np.array([3, 0, 4]))
    assert isinstance(scores, torch.Tensor) and scores.shape == (3, 3)
    np.testing.assert_allclose(scores.numpy(), mu + b_u[[3, 0, 4], None] + b_i[None, :], atol=1e-6)


def test_biases_default_sweeps_stop_at_the_cap(cpu):
    model = Biases(tol=0.0).fit(B_USERS, B_ITEMS, B_RATINGS, 5, 3, cpu)
    assert (model.reg_user, model.reg_item, model.sweeps, model.converged) == (10.0, 25.0, 10, False)


def test_biases_refuse_implicit_data(cpu):
    with pytest.raises(ValueError, match="ratings is None"):
        Biases().fit(B_USERS, B_ITEMS, None, 5, 3, cpu)
    model = Biases().fit(B_USERS, B_ITEMS, B_RATINGS, 5, 3, cpu)
    with pytest.raises(ValueError, match="ratings is None"):
        model.residuals(B_USERS, B_ITEMS, None)


# --- EASE -------------------------------------------------------------------------------------------


def _random_binary(n_users=40, n_items=15, density=0.3, seed=0):
    rng = np.random.default_rng(seed)
    X = (rng.random((n_users, n_items)) < density).astype(np.float64)
    users, items = np.nonzero(X)
    return X, users.astype(np.int32), items.astype(np.int32)


def _ease_reference(X, lam):
    G = X.T @ X + lam * np.eye(X.shape[1])
    P = np.linalg.inv(G)
    B = -P / np.diag(P)[None, :]
    np.fill_diagonal(B, 0.0)
    return B


@pytest.mark.parametrize("lam", [10.0, 500.0])
def test_ease_matches_numpy_reference(cpu, lam):
    X, users, items = _random_binary()
    model = EASE(lambda_=lam).fit(users, items, 40, 15, cpu)
    B = _ease_reference(X, lam)
    assert model.weights.dtype == np.float64  # small catalogue on the cpu: float64
    np.testing.assert_allclose(model.weights, B, rtol=1e-10, atol=1e-14)
    assert np.all(np.diag(model.weights) == 0.0)
    batch = np.array([5, 0, 39, 5])
    scores = model.score_batch(batch)
    assert isinstance(scores, torch.Tensor) and scores.shape == (4, 15) and scores.dtype == torch.float64
    np.testing.assert_allclose(scores.numpy(), X[batch] @ B, rtol=1e-10, atol=1e-14)


def test_ease_float32_and_duplicate_pairs(cpu):
    X, users, items = _random_binary(seed=1)
    # A repeated pair counts once: X is binary.
    users, items = np.r_[users, users[:7]], np.r_[items, items[:7]]
    model = EASE(lambda_=10.0, dtype="float32").fit(users, items, 40, 15, cpu)
    assert model.weights.dtype == np.float32
    np.testing.assert_allclose(model.weights, _ease_reference(X, 10.0), rtol=1e-4, atol=1e-6)


def test_ease_user_without_items_scores_zero(cpu):
    X, users, items = _random_binary()
    model = EASE(lambda_=10.0).fit(users, items, 41, 15, cpu)  # user 40 has no training items
    np.testing.assert_array_equal(model.score_batch(np.array([40])).numpy(), np.zeros((1, 15)))


def test_ease_memory_guard_refuses_before_allocating(cpu):
    _, users, items = _random_binary()
    need = EASE.memory_estimate(15, "float64")
    assert need == 4 * 15 * 15 * 8
    model = EASE(max_bytes=1000)
    with pytest.raises(ValueError, match="max_bytes") as info:
        model.fit(users, items, 40, 15, cpu)
    assert f"{need:,} bytes" in str(info.value) and "fewer items" in str(info.value)
    assert model.weights is None


def test_ease_rejects_bad_parameters():
    with pytest.raises(ValueError, match="lambda_"):
        EASE(lambda_=0.0)
    with pytest.raises(ValueError, match="dtype"):
        EASE(dtype="float16")


# --- ranking sanity on real data --------------------------------------------------------------------


def test_ranking_on_bundled_anime(cpu):
    """First 1000 users x the 500 most rated anime, 80/20 random split: EASE > popularity > chance."""
    from gpu_ann.data.readers import load_bundled_anime
    from gpu_ann.ranking import evaluate_scores

    table = load_bundled_anime()
    keep = table.user < 1000
    users, items, ratings = table.user[keep], table.item[keep], table.rating[keep]
    top = np.argsort(-np.bincount(items, minlength=table.n_items), kind="stable")[:500]
    remap = np.full(table.n_items, -1)
    remap[top] = np.arange(500)
    m = remap[items] >= 0
    users, items, ratings = users[m], remap[items[m]].astype(np.int32), ratings[m]
    test = np.random.default_rng(0).random(len(users)) < 0.2

    def structure(mask):
        x = sp.csr_matrix((np.ones(mask.sum()), (users[mask], items[mask])), shape=(1000, 500))
        x.sum_duplicates()
        return x.indptr, x.indices

    train = ~test
    models = {
        "popularity": Popularity().fit(users[train], items[train], 1000, 500, cpu),
        "biases": Biases().fit(users[train], items[train], ratings[train], 1000, 500, cpu),
        "ease": EASE(lambda_=100.0).fit(users[train], items[train], 1000, 500, cpu),
    }
    recall = {
        name: evaluate_scores(model.score_batch, 1000, 500, structure(train), structure(test), (20,), cpu.torch_device)[
            "recall@20"
        ]
        for name, model in models.items()
    }
    # Chance is about 20 / 450 ≈ 0.045 (held-out items among the unseen ones).
    assert recall["ease"] > recall["popularity"] + 0.1, recall
    assert recall["popularity"] > 0.1 and recall["biases"] > 0.06, recall

"""Ranking metrics against hand-computed cases and a slow per-user reference."""

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from gpu_ann.ranking import RankingMetrics, evaluate_scores, rows_mask

CPU = torch.device("cpu")


def reference(scores, seen_rows, held_rows, ks, n_items):
    """Per user, in plain Python: rank by score (ties: lower index first), training items removed."""
    out = {f"{m}@{k}": [] for m in ("recall", "hit_fraction", "precision", "hit_rate", "mrr", "ndcg") for k in ks}
    recommended = {k: set() for k in ks}
    for s, seen, held in zip(scores, seen_rows, held_rows):
        if not held:
            continue
        ranked = [i for i in sorted(range(n_items), key=lambda i: (-s[i], i)) if i not in seen]
        for k in ks:
            top = ranked[:k]
            recommended[k].update(top)
            hits = [i for i in top if i in held]
            out[f"recall@{k}"].append(len(hits) / min(k, len(held)))
            out[f"hit_fraction@{k}"].append(len(hits) / len(held))
            out[f"precision@{k}"].append(len(hits) / k)
            out[f"hit_rate@{k}"].append(float(bool(hits)))
            first = next((r for r, i in enumerate(top, 1) if i in held), None)
            out[f"mrr@{k}"].append(1 / first if first else 0.0)
            dcg = sum(1 / math.log2(r + 1) for r, i in enumerate(top, 1) if i in held)
            idcg = sum(1 / math.log2(r + 1) for r in range(1, min(k, len(held)) + 1))
            out[f"ndcg@{k}"].append(dcg / idcg)
    result = {name: float(np.mean(v)) for name, v in out.items()}
    result.update({f"coverage@{k}": len(recommended[k]) / n_items for k in ks})
    return result


def masks(rows, n_items):
    m = torch.zeros((len(rows), n_items), dtype=torch.bool)
    for r, items in enumerate(rows):
        m[r, list(items)] = True
    return m


def test_hand_computed_case_with_ties_and_a_single_heldout_item():
    # 6 items. User 0: seen {0}, held out {2, 5}; scores rank 1, 2, 3, 5, 4 (item 0 masked).
    # User 1: seen {}, held out {4}; all scores tie, so the ranking is 0, 1, 2, 3, 4, 5: item 4 at rank 5.
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0, 4.0, 5.0], [1.0] * 6])
    seen, held = [{0}, set()], [{2, 5}, {4}]
    m = RankingMetrics(6, [2, 5], CPU)
    m.update(scores, masks(seen, 6), masks(held, 6))
    r = m.result()
    # User 0 @2: top [1, 2] -> 1 hit. recall 1/2, ndcg (1/log2 3)/(1 + 1/log2 3), mrr 1/2.
    # User 1 @2: top [0, 1] -> 0 hits.
    assert r["recall@2"] == pytest.approx((0.5 + 0) / 2)
    assert r["ndcg@2"] == pytest.approx(((1 / math.log2(3)) / (1 + 1 / math.log2(3)) + 0) / 2)
    assert r["mrr@2"] == pytest.approx((0.5 + 0) / 2)
    assert r["precision@2"] == pytest.approx((0.5 + 0) / 2)
    assert r["hit_rate@2"] == pytest.approx(0.5)
    # @5: user 0 top [1, 2, 3, 5, 4] -> 2 hits at ranks 2 and 4; user 1 top [0..4] -> hit at rank 5.
    assert r["recall@5"] == pytest.approx((1.0 + 1.0) / 2)
    assert r["hit_fraction@5"] == pytest.approx(1.0)
    dcg0 = 1 / math.log2(3) + 1 / math.log2(5)
    assert r["ndcg@5"] == pytest.approx((dcg0 / (1 + 1 / math.log2(3)) + (1 / math.log2(6)) / 1) / 2)
    assert r["mrr@5"] == pytest.approx((1 / 2 + 1 / 5) / 2)
    assert r["coverage@2"] == pytest.approx(3 / 6)  # top-2 lists {1, 2} and {0, 1}: 3 of 6 items
    assert r["users"] == 2


def test_against_the_slow_reference_on_random_cases_with_ties_and_k_beyond_the_catalogue():
    rng = np.random.default_rng(0)
    n_users, n_items = 40, 15
    scores = rng.integers(0, 4, size=(n_users, n_items)).astype(np.float32)  # many ties
    seen_rows, held_rows = [], []
    for _ in range(n_users):
        perm = rng.permutation(n_items)
        n_seen, n_held = rng.integers(0, 6), rng.integers(0, 4)  # some users have nothing held out
        seen_rows.append(set(perm[:n_seen].tolist()))
        held_rows.append(set(perm[n_seen : n_seen + n_held].tolist()))
    ks = [1, 3, 10, 20]  # 20 > 15 items
    m = RankingMetrics(n_items, ks, CPU)
    for start in range(0, n_users, 7):  # several batches
        sl = slice(start, start + 7)
        m.update(torch.from_numpy(scores[sl]), masks(seen_rows[sl], n_items), masks(held_rows[sl], n_items))
    got, want = m.result(), reference(scores, seen_rows, held_rows, ks, n_items)
    assert got["users"] == sum(1 for h in held_rows if h)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name
    assert got["recall@20"] == pytest.approx(1.0)  # everything rankable is in the list


def test_evaluate_scores_in_batches_from_csr_matches_one_big_batch():
    rng = np.random.default_rng(1)
    n_users, n_items = 30, 12
    seen = sp.random(n_users, n_items, density=0.2, format="csr", random_state=2)
    held = sp.random(n_users, n_items, density=0.15, format="csr", random_state=3)
    held = (held - held.multiply(seen.astype(bool))).tocsr()
    held.eliminate_zeros()
    held.sort_indices()
    scores = torch.from_numpy(rng.normal(size=(n_users, n_items)))
    got = evaluate_scores(
        lambda users: scores[torch.as_tensor(users)],
        n_users,
        n_items,
        (seen.indptr, seen.indices),
        (held.indptr, held.indices),
        [3, 5],
        CPU,
        batch_size=4,
    )
    seen_rows = [set(seen.indices[seen.indptr[u] : seen.indptr[u + 1]].tolist()) for u in range(n_users)]
    held_rows = [set(held.indices[held.indptr[u] : held.indptr[u + 1]].tolist()) for u in range(n_users)]
    want = reference(scores.numpy(), seen_rows, held_rows, [3, 5], n_items)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name


def test_rows_mask_matches_the_csr_rows():
    m = sp.csr_matrix(np.array([[0, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0]]))
    mask = rows_mask(m.indptr, m.indices, np.array([2, 0, 1]), 4, CPU)
    assert mask.tolist() == [[True, True, True, False], [False, True, False, True], [False] * 4]

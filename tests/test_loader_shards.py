"""The loader's data-parallel shares and its sparse path."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from gpu_ann.bags import Bags
from gpu_ann.loader import BatchLoader


def matrix_and_samples(n_users=9, n_items=7, seed=0):
    rng = np.random.default_rng(seed)
    dense = (rng.random((n_users, n_items)) < 0.4).astype(np.float32)
    dense[:, 0] = 1  # every user has an item
    csr = sp.csr_matrix(dense)
    coo = csr.tocoo()
    return csr, coo.row, coo.col


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_each_global_batch_and_pad_evenly(world):
    csr, users, items = matrix_and_samples()
    n = len(users)
    loaders = [BatchLoader.from_csr(csr, users, items, 4, backend="cpu", seed=3, rank=r, world_size=world)
               for r in range(world)]  # fmt: skip
    single = BatchLoader.from_csr(csr, users, items, 4 * world, backend="cpu", seed=3)
    global_order = single.epoch_order(5)
    shares = [loader.epoch_order(5) for loader in loaders]
    per_rank = -(-n // world)
    assert all(len(s) == per_rank for s in shares) and len({len(x) for x in loaders}) == 1
    # Interleaving the shares rebuilds the global order, padded by repeating its start.
    rebuilt = np.stack(shares, axis=1).reshape(-1)
    np.testing.assert_array_equal(rebuilt[:n], global_order)
    np.testing.assert_array_equal(rebuilt[n:], global_order[: per_rank * world - n])
    # Step k of every rank together holds exactly global batch k of the single-process loader.
    for k in range(len(single) - 1):  # the last global batch may hold padding
        together = np.concatenate([s[4 * k : 4 * (k + 1)] for s in shares])
        assert sorted(together) == sorted(global_order[4 * world * k : 4 * world * (k + 1)])
    with pytest.raises(ValueError, match="rank must lie in"):
        BatchLoader.from_csr(csr, users, items, 4, backend="cpu", rank=2, world_size=2)


def test_sparse_loader_yields_the_dense_rows_as_bags():
    csr, users, items = matrix_and_samples(seed=1)
    dense = BatchLoader.from_csr(csr, users, items, 5, backend="cpu", seed=2)
    sparse = BatchLoader.from_csr(csr, users, items, 5, backend="cpu", seed=2, path="sparse")
    assert len(dense) == len(sparse)
    n = csr.shape[1]
    for (X, y), bags in zip(dense, sparse, strict=True):
        assert isinstance(bags, Bags)
        np.testing.assert_array_equal(bags.labels.numpy(), y.numpy())
        rows = np.zeros((len(y), n + 3), np.float32)
        off = bags.offsets.numpy()
        for r in range(len(y)):
            rows[r, bags.indices.numpy()[off[r] : off[r + 1]]] = bags.weights.numpy()[off[r] : off[r + 1]]
        rows[:, n:] = bags.features.numpy()
        np.testing.assert_allclose(rows, X.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown input path 'both'"):
        BatchLoader.from_csr(csr, users, items, 5, backend="cpu", path="both")

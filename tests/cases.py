"""Hand-built and random CSR cases shared by the kernel tests of every backend."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch


def csr_case(rows: list[list[int]], n_items: int):
    """(indptr int64, indices int32) for rows given as item lists (sorted here)."""
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(r) for r in rows])
    indices = np.array([i for r in rows for i in sorted(r)], dtype=np.int32)
    assert indices.size == 0 or indices.max() < n_items
    return indptr, indices


# user 0: empty row; user 1: one item; user 2: several items; user 3: the full catalogue
HAND_ROWS = [[], [4], [0, 2, 5, 9], list(range(10))]
HAND_N_ITEMS = 10
# (user, target) samples: training targets first/middle/last in the row, the only item, and
# held-out style targets that are not in the row (nothing removed), including for the empty row.
HAND_SAMPLES = [(1, 4), (2, 0), (2, 5), (2, 9), (3, 0), (3, 9), (0, 3), (2, 7), (1, 8)]


def hand_case():
    indptr, indices = csr_case(HAND_ROWS, HAND_N_ITEMS)
    users = np.array([u for u, _ in HAND_SAMPLES], dtype=np.int32)
    items = np.array([t for _, t in HAND_SAMPLES], dtype=np.int32)
    return indptr, indices, users, items, HAND_N_ITEMS


def random_case(n_users: int, n_items: int, density: float, seed: int):
    """A random sorted CSR plus samples: every stored pair (training) and as many random pairs."""
    rng = np.random.default_rng(seed)
    m = sp.random(n_users, n_items, density=density, format="csr", random_state=seed)
    m.sum_duplicates()
    coo = m.tocoo()
    held_users = rng.integers(0, n_users, size=coo.nnz)
    held_items = rng.integers(0, n_items, size=coo.nnz)
    users = np.concatenate([coo.row, held_users]).astype(np.int32)
    items = np.concatenate([coo.col, held_items]).astype(np.int32)
    return m.indptr.astype(np.int64), m.indices.astype(np.int32), users, items, n_items


class SimBackend:
    """The cuda backend's seam over numpy, for the simulator (no CuPy, no device)."""

    name = "cuda"
    xp = np
    torch_device = torch.device("cpu")

    def from_host(self, a):
        return np.ascontiguousarray(a)

    def tensor_from_host(self, a):
        return torch.from_numpy(np.ascontiguousarray(a))

    def kernel_array(self, a):
        return a

    def view_of_tensor(self, t):
        return np.from_dlpack(t.detach())

    def to_host(self, a):
        return np.asarray(a)

"""The other ways to build the same batch, measured against gpu-ann's kernels in the same run.

Each ``make_*`` takes the host CSR, the samples and the backend, does its one-off set-up (moving data
to the device, ...) outside the timing, and returns ``build(batch) -> X`` where ``batch`` is a host
array of sample indices and ``X`` a torch tensor on the backend's device: what a training step would
consume. Every route produces the same rows (``bench/test_assembly.py`` checks a batch of each).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from numba import njit, prange


def make_notebook(csr: sp.csr_matrix, users, items, device):
    """The original notebook's approach: one row at a time in Python/numpy, then a host->device copy."""
    indptr, indices, n = csr.indptr, csr.indices, csr.shape[1]

    def build(batch):
        X = np.zeros((len(batch), n + 3), np.float32)
        for r, s in enumerate(batch):
            t = items[s]
            row = indices[indptr[users[s]] : indptr[users[s] + 1]]
            row = row[row != t]
            w = max(len(row), 1)
            X[r, row] = 1.0 / w
            f = w / n
            X[r, n:] = (f, f**0.5, f * f)
        return torch.from_numpy(X).to(device)

    return build


def _fix_up(X, has_target, row_len, targets, xp):
    """Remove the target, normalise by w and append the three count features (numpy or cupy)."""
    B = X.shape[0]
    X[xp.arange(B), targets] = 0
    w = xp.maximum(row_len - has_target, 1).astype(xp.float32)
    X /= w[:, None]
    f = w / X.shape[1]
    return xp.concatenate([X, f[:, None], xp.sqrt(f)[:, None], (f * f)[:, None]], axis=1)


def make_scipy(csr: sp.csr_matrix, users, items, device):
    """scipy's row slice + ``toarray()`` + fix-ups, then ``torch.from_numpy`` (zero copy)."""
    ones = sp.csr_matrix((np.ones(csr.nnz, np.float32), csr.indices, csr.indptr), shape=csr.shape)
    row_len = np.diff(csr.indptr)

    def build(batch):
        u, t = users[batch], items[batch]
        X = ones[u].toarray()
        has = X[np.arange(len(batch)), t] > 0  # structure only: stored values are all 1
        return torch.from_numpy(_fix_up(X, has, row_len[u], t, np)).to(device)

    return build


def make_torch_sparse(csr: sp.csr_matrix, users, items, device):
    """torch.sparse on the device: COO ``index_select`` of the rows (CSR has none), ``to_dense``, fix-ups."""
    coo = csr.tocoo()
    A = torch.sparse_coo_tensor(
        torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64)),
        torch.ones(coo.nnz, dtype=torch.float32),
        size=csr.shape,
        device=device,
    ).coalesce()
    row_len = torch.from_numpy(np.diff(csr.indptr)).to(device)
    users_t, items_t = torch.from_numpy(users).to(device), torch.from_numpy(items).to(device)
    n = csr.shape[1]

    def build(batch):
        b = torch.from_numpy(batch).to(device)
        u, t = users_t[b].long(), items_t[b].long()
        X = A.index_select(0, u).to_dense()
        r = torch.arange(len(batch), device=device)
        has = X[r, t] > 0
        X[r, t] = 0
        w = torch.clamp(row_len[u] - has.long(), min=1).float()
        X /= w[:, None]
        f = w / n
        return torch.cat([X, f[:, None], f.sqrt()[:, None], (f * f)[:, None]], dim=1)

    return build


def make_cupyx(csr: sp.csr_matrix, users, items, device):
    """cupyx.scipy.sparse row slice + ``toarray()`` + fix-ups, then ``torch.from_dlpack`` (GPU only)."""
    import cupy
    import cupyx.scipy.sparse as csp

    A = csp.csr_matrix(sp.csr_matrix((np.ones(csr.nnz, np.float32), csr.indices, csr.indptr), shape=csr.shape))
    row_len = cupy.asarray(np.diff(csr.indptr))
    users_d, items_d = cupy.asarray(users), cupy.asarray(items)

    def build(batch):
        b = cupy.asarray(batch)
        u, t = users_d[b], items_d[b]
        X = A[u].toarray()
        has = X[cupy.arange(len(batch)), t] > 0
        return torch.from_dlpack(_fix_up(X, has, row_len[u], t, cupy))

    return build


@njit(parallel=True, cache=True)
def parallel_fill(out, value):
    """The CPU ceiling for a write-only pass: every core writing its share of rows."""
    for r in prange(out.shape[0]):
        for c in range(out.shape[1]):
            out[r, c] = value

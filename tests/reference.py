"""Slow, obviously correct reference implementations every backend is checked against."""

from __future__ import annotations

import numpy as np


def assemble_reference(indptr, indices, sample_users, sample_items, batch, n_items, values=None):
    """Dense input rows and labels, one Python loop iteration per sample, in float64.

    ``values`` (one per stored index) replaces the implicit 1 of each kept item; ``None``: implicit.
    """
    out = np.zeros((len(batch), n_items + 3), dtype=np.float64)
    labels = np.zeros(len(batch), dtype=np.int64)
    for r, s in enumerate(batch):
        u, t = int(sample_users[s]), int(sample_items[s])
        lo, hi = int(indptr[u]), int(indptr[u + 1])
        kept = [(int(indices[k]), 1.0 if values is None else float(values[k])) for k in range(lo, hi)]
        kept = [(i, v) for i, v in kept if i != t]
        w = max(len(kept), 1)
        for i, v in kept:
            out[r, i] = v / w
        f = w / n_items
        out[r, n_items : n_items + 3] = [f, np.sqrt(f), f * f]
        labels[r] = t
    return out, labels

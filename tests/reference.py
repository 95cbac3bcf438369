"""Slow, obviously correct reference implementations every backend is checked against."""

from __future__ import annotations

import numpy as np


def assemble_reference(indptr, indices, sample_users, sample_items, batch, n_items):
    """Dense input rows and labels, one Python loop iteration per sample, in float64."""
    out = np.zeros((len(batch), n_items + 3), dtype=np.float64)
    labels = np.zeros(len(batch), dtype=np.int64)
    for r, s in enumerate(batch):
        u, t = int(sample_users[s]), int(sample_items[s])
        row = [int(i) for i in indices[indptr[u] : indptr[u + 1]]]
        kept = [i for i in row if i != t]
        w = max(len(kept), 1)
        for i in kept:
            out[r, i] = 1.0 / w
        f = w / n_items
        out[r, n_items : n_items + 3] = [f, np.sqrt(f), f * f]
        labels[r] = t
    return out, labels

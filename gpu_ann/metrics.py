"""Losses the training loop reports, and the popularity baseline they are compared with."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def popularity_log_probs(train_items: np.ndarray, n_items: int) -> np.ndarray:
    """log p(item) of the popularity model: training counts with add-one (Laplace) smoothing.

    The smoothing gives items never seen in training a finite probability, so the baseline's
    cross-entropy on held-out samples is finite.

    Parameters
    ----------
    train_items : numpy.ndarray
        Item index of each training sample (non-negative integers below ``n_items``).
    n_items : int
        Catalogue size.

    Returns
    -------
    numpy.ndarray
        float64 ``[n_items]`` natural-log probabilities.
    """
    counts = np.bincount(train_items, minlength=n_items).astype(np.float64) + 1.0
    return np.log(counts / counts.sum())


def popularity_loss(train_items: np.ndarray, heldout_items: np.ndarray, n_items: int) -> float:
    """Cross-entropy of predicting every held-out item from the popularity distribution (nats).

    Parameters
    ----------
    train_items : numpy.ndarray
        Item index of each training sample.
    heldout_items : numpy.ndarray
        Item index of each sample to score.
    n_items : int
        Catalogue size.

    Returns
    -------
    float
        Mean negative log-probability of ``heldout_items`` under :func:`popularity_log_probs`; NaN
        when there are none.
    """
    if len(heldout_items) == 0:
        return float("nan")
    return float(-popularity_log_probs(train_items, n_items)[heldout_items].mean())


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches) -> float:
    """Sample-weighted mean cross-entropy of ``model`` over an iterable of ``(X, y)`` batches.

    Losses are summed on the device and read once at the end (one host-device sync). Runs in eval
    mode without autograd, then restores the model's training mode.

    Parameters
    ----------
    model : torch.nn.Module
        Maps ``X`` to logits over the items.
    batches : iterable of (torch.Tensor, torch.Tensor)
        ``(X, y)`` batches on the model's device, e.g. a :class:`~gpu_ann.batching.FixedBatches`.

    Returns
    -------
    float
        Mean cross-entropy per sample in nats; NaN when there are no samples.
    """
    was_training = model.training
    model.eval()
    total = None
    count = 0
    for X, y in batches:
        batch_sum = F.cross_entropy(model(X), y, reduction="sum")
        total = batch_sum if total is None else total + batch_sum
        count += y.shape[0]
    model.train(was_training)
    if count == 0:
        return float("nan")
    return float(total.item()) / count  # host-device sync

"""Evaluating a trained run on one of its splits."""

from __future__ import annotations

from pathlib import Path

import torch

from gpu_ann.backend import get_backend
from gpu_ann.batching import FixedBatches
from gpu_ann.checkpoint import load_checkpoint, load_data
from gpu_ann.matrix import InteractionMatrix
from gpu_ann.metrics import mean_loss, popularity_loss
from gpu_ann.model import CandidateGenerator
from gpu_ann.splits import SPLIT_NAMES, splits_from_assignment


def evaluate_run(run_dir: str | Path, split: str = "validation", backend: str = "auto", batch_size: int = 1024) -> dict:
    """Mean cross-entropy of a run's best model on a whole split, next to the popularity baseline's.

    Parameters
    ----------
    run_dir : str or Path
        A run directory written by training (``data.npz`` and ``model.pt``).
    split : {"train", "validation", "test"}
        Which of the run's stored splits to score; inputs always come from the training matrix.
    backend : {"auto", "cpu", "cuda"}
        Where to compute.
    batch_size : int
        Rows per evaluation batch.

    Returns
    -------
    dict
        ``split``, ``samples``, ``loss`` (the model's, nats) and ``popularity_loss`` (add-one smoothed
        training popularity on the same samples).
    """
    if split not in SPLIT_NAMES:
        raise ValueError(f"unknown split {split!r}: expected one of {SPLIT_NAMES}")
    table, assignment = load_data(Path(run_dir))
    ckpt = load_checkpoint(Path(run_dir), table)
    splits = splits_from_assignment(table, assignment)
    b = get_backend(backend)
    matrix = InteractionMatrix.from_pairs(b, splits.train.user, splits.train.item, table.n_users, table.n_items)
    model = CandidateGenerator(table.n_items, tuple(ckpt.config["hidden"]))
    model.load_state_dict(ckpt.model_state)
    model.to(b.torch_device)
    with torch.no_grad():
        loss = mean_loss(model, FixedBatches(matrix, splits[split], batch_size, None))
    return {
        "split": split,
        "samples": len(splits[split]),
        "loss": loss,
        "popularity_loss": popularity_loss(splits.train.item, splits[split].item, table.n_items),
    }

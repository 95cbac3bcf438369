"""Evaluating a trained run on one of its splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from gpu_ann.backend import get_backend
from gpu_ann.baselines import EASE, Biases
from gpu_ann.batching import BatchAssembler, FixedBatches
from gpu_ann.checkpoint import load_checkpoint, load_data
from gpu_ann.metrics import mean_loss, popularity_log_probs, popularity_loss
from gpu_ann.model import CandidateGenerator
from gpu_ann.ranking import evaluate_scores
from gpu_ann.splits import FOLD_IN, SPLIT_NAMES, TRAIN, Samples, splits_from_assignment
from gpu_ann.values import input_matrix


def evaluate_run(
    run_dir: str | Path,
    split: str = "validation",
    backend: str = "auto",
    batch_size: int = 1024,
    ks: tuple[int, ...] = (),
    baselines: tuple[str, ...] = (),
) -> dict:
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
    ks : tuple of int
        Cut-offs for ranking metrics (see :mod:`gpu_ann.ranking`); none by default.
    baselines : tuple of str
        Extra baselines ranked beside the model and popularity: ``"biases"`` (needs ratings) and/or
        ``"ease"`` (see :mod:`gpu_ann.baselines`); fitted on the run's input interactions.

    Returns
    -------
    dict
        ``split``, ``samples``, ``loss`` (the model's, nats) and ``popularity_loss`` (add-one smoothed
        training popularity on the same samples); with ``ks``, also ``ranking``: ``{"model": {...},
        "popularity": {...}}``, each the metrics of :class:`gpu_ann.ranking.RankingMetrics` over the
        users with items in the split, their training items excluded.
    """
    if split not in SPLIT_NAMES:
        raise ValueError(f"unknown split {split!r}: expected one of {SPLIT_NAMES}")
    if ks and split == "train":
        raise ValueError(
            "ranking metrics on the training split would exclude every held-out item (training "
            "items are masked): rank on validation or test"
        )
    table, assignment = load_data(Path(run_dir))
    ckpt = load_checkpoint(Path(run_dir), table)
    splits = splits_from_assignment(table, assignment)
    b = get_backend(backend)
    # Training plus fold-in rows (held-out users' known items), valued as the model was trained.
    matrix = input_matrix(b, table, assignment, ckpt.config.get("input_values", "implicit"))
    model = CandidateGenerator.from_checkpoint(ckpt, b.torch_device)
    with torch.no_grad():
        loss = mean_loss(model, FixedBatches(matrix, splits[split], batch_size, None))
    result = {
        "split": split,
        "samples": len(splits[split]),
        "loss": loss,
        "popularity_loss": popularity_loss(splits.train.item, splits[split].item, table.n_items),
    }
    if ks:
        result["ranking"] = _ranking(model, matrix, splits, split, table, ks, batch_size, assignment, baselines)
    return result


def _ranking(model, matrix, splits, split, table, ks, batch_size, assignment, baselines) -> dict:
    """Ranking metrics of the model, popularity and the asked-for baselines on one split."""
    device = matrix.backend.torch_device
    seen = _host_csr(splits.inputs, table)
    heldout = _host_csr(splits[split], table)
    users = np.arange(table.n_users, dtype=np.int32)
    # One sample per user whose target (-1) is no item: the kernel keeps the whole training row.
    assembler = BatchAssembler(matrix, Samples(users, np.full_like(users, -1)), batch_size, allow_no_target=True)
    model.eval()

    def model_scores(batch_users):
        X, _ = assembler.assemble(assembler.to_device_indices(batch_users.astype(np.int64)))
        return model(X)

    popular = torch.as_tensor(popularity_log_probs(splits.train.item, table.n_items), device=device)

    def popularity_scores(batch_users):
        return popular.expand(len(batch_users), -1)

    scorers = {"model": model_scores, "popularity": popularity_scores}
    # Baselines learn from what the model's inputs hold: training rows plus held-out users' fold-in rows.
    known = (assignment == TRAIN) | (assignment == FOLD_IN)
    users_k, items_k = table.user[known], table.item[known]
    for name in baselines:
        if name == "biases":
            if table.rating is None:
                raise ValueError(f"{table.source}: the biases baseline needs ratings, and this data has none")
            fitted = Biases().fit(users_k, items_k, table.rating[known], table.n_users, table.n_items, matrix.backend)
        elif name == "ease":
            fitted = EASE().fit(users_k, items_k, table.n_users, table.n_items, matrix.backend)
        else:
            raise ValueError(f"unknown baseline {name!r}: expected 'biases' or 'ease'")
        scorers[name] = fitted.score_batch
    return {
        name: evaluate_scores(scorer, table.n_users, table.n_items, seen, heldout, ks, device, batch_size)
        for name, scorer in scorers.items()
    }


def _host_csr(samples, table) -> tuple[np.ndarray, np.ndarray]:
    m = sp.csr_matrix(
        (np.ones(len(samples), np.float32), (samples.user, samples.item)), shape=(table.n_users, table.n_items)
    )
    m.sum_duplicates()
    return m.indptr, m.indices

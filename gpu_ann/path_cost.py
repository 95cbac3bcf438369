"""What each input path costs per step, from sizes alone: the model that ``--input-path auto`` and the memory
planner decide with.

A dense batch is ``B x (n_items + 3)`` whatever the rows hold; a sparse one is the rows' items as bags, about
``B`` times the mean bag length of a training sample (a sample is drawn per interaction, so a long row is
drawn more often: the mean is ``sum(l**2) / sum(l)`` over row lengths ``l``, less the target). The
functions here count the bytes each path writes and reads in the work that differs between them, and pick
the cheaper one (:func:`choose_path`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from gpu_ann.matrix import InteractionMatrix
from gpu_ann.model import N_FEATURES

PATHS = ("dense", "sparse")


def _row_statistics(matrix: InteractionMatrix) -> tuple[float, int]:
    """(mean bag length of a training sample, longest row): one device -> host copy."""
    if matrix.n_users == 0 or matrix.nnz == 0:
        return 0.0, 0
    xp = matrix.backend.xp
    lengths = xp.diff(matrix.indptr).astype(xp.float64)
    total, squares, longest = matrix.backend.to_host(
        xp.stack([lengths.sum(), (lengths * lengths).sum(), lengths.max()])
    )
    return _bag_statistics(float(total), float(squares), int(longest))


def _bag_statistics(total: float, squares: float, longest: int) -> tuple[float, int]:
    # A training sample is a stored entry: its user has l items with probability l / total, and its bag l - 1.
    return (squares / total - 1.0 if total else 0.0), longest


def row_statistics(row_lengths: np.ndarray) -> tuple[float, int]:
    """(mean bag length of a training sample, longest row) from the rows' lengths on the host.

    Parameters
    ----------
    row_lengths : numpy.ndarray
        Items in each user's input row (e.g. ``numpy.bincount`` of the training users).

    Returns
    -------
    (float, int)
        ``sum(l**2) / sum(l) - 1`` (0 for an empty matrix) and ``max(l)``.
    """
    lengths = np.asarray(row_lengths, dtype=np.float64)
    if lengths.size == 0:
        return 0.0, 0
    return _bag_statistics(float(lengths.sum()), float((lengths * lengths).sum()), int(lengths.max()))


class StepBytes(NamedTuple):
    """Estimated bytes of one path, from :func:`bytes_per_step`.

    Parameters
    ----------
    moved : int
        Bytes one training step moves in the work that differs between the paths (see :func:`bytes_per_step`).
    buffers : int
        Device bytes of the path's batch buffers, allocated once (labels included).
    """

    moved: int
    buffers: int


def bytes_per_step(
    matrix: InteractionMatrix, batch_size: int, path: str, *, embedding_dim: int = 256, input_bytes: int = 4
) -> StepBytes:
    """Estimated bytes a training step of the ``dense`` or ``sparse`` input path moves and holds.

    ``dense`` moves the ``B x (n_items + 3)`` batch three times: written by the kernel, read by the first
    layer's forward and again by its weight gradient. ``sparse`` moves each bag entry (8-byte index, 4-byte
    weight) three times, plus an ``embedding_dim``-wide float32 table row gathered in the forward and one
    scattered in the backward, for a bag of the mean training length ``sum(l**2) / sum(l) - 1`` (``l``: the
    row lengths; a sample is a stored entry, so a user is drawn in proportion to ``l``). Work both paths share
    (the layers above, the optimiser over the item table) is left out. The sparse buffers hold
    ``batch_size`` times the longest row. Reading the row statistics is a device-to-host copy (a sync): call
    this once, before training.

    Parameters
    ----------
    matrix : InteractionMatrix
        The training inputs.
    batch_size : int
        Rows per step.
    path : {"dense", "sparse"}
        Which path.
    embedding_dim : int
        Width of the first layer (``hidden[0]``).
    input_bytes : int
        Bytes per dense input value: 4 for float32 batches, 2 for bfloat16.

    Returns
    -------
    StepBytes

    Raises
    ------
    ValueError
        ``path`` is neither ``"dense"`` nor ``"sparse"``.
    """
    if path not in PATHS:
        raise ValueError(f"unknown input path {path!r}: expected one of {PATHS}")
    stats = _row_statistics(matrix) if path == "sparse" else (0.0, 0)
    return step_bytes(matrix.n_items, stats, batch_size, path, embedding_dim=embedding_dim, input_bytes=input_bytes)


def step_bytes(
    n_items: int,
    stats: tuple[float, int],
    batch_size: int,
    path: str,
    *,
    embedding_dim: int = 256,
    input_bytes: int = 4,
) -> StepBytes:
    """:func:`bytes_per_step` from sizes alone: no matrix, nothing on the device.

    Parameters
    ----------
    n_items : int
        Catalogue size.
    stats : (float, int)
        Mean training bag length and longest row, from :func:`row_statistics`.
    batch_size, path, embedding_dim, input_bytes
        As for :func:`bytes_per_step`.

    Returns
    -------
    StepBytes

    Raises
    ------
    ValueError
        ``path`` is neither ``"dense"`` nor ``"sparse"``.
    """
    labels = 8 * batch_size
    if path == "dense":
        batch = batch_size * (n_items + N_FEATURES) * input_bytes
        return StepBytes(3 * batch, batch + labels)
    if path != "sparse":
        raise ValueError(f"unknown input path {path!r}: expected one of {PATHS}")
    mean_bag, longest = stats
    per_entry = 3 * (8 + 4) + 2 * embedding_dim * 4
    per_row = 8 + N_FEATURES * 4  # an offset and the features
    moved = int(batch_size * (mean_bag * per_entry + 3 * per_row))
    return StepBytes(moved, 8 + batch_size * (longest * (8 + 4) + per_row) + labels)


def choose_path(matrix: InteractionMatrix, batch_size: int, *, embedding_dim: int = 256, input_bytes: int = 4) -> str:
    """``"sparse"`` when it moves fewer bytes per step than ``"dense"`` (:func:`bytes_per_step`), else ``"dense"``.

    Parameters
    ----------
    matrix : InteractionMatrix
        The training inputs.
    batch_size : int
        Rows per step.
    embedding_dim : int
        Width of the first layer.
    input_bytes : int
        Bytes per dense input value.

    Returns
    -------
    str
    """
    moved = {
        p: bytes_per_step(matrix, batch_size, p, embedding_dim=embedding_dim, input_bytes=input_bytes).moved
        for p in PATHS
    }
    return "sparse" if moved["sparse"] < moved["dense"] else "dense"

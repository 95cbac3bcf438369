"""Input value modes: what the assembly kernel writes at a user's items (before dividing by ``w``).

* ``implicit`` (default): 1 for every item the user has; the matrix stores no values.
* ``rating``: the rating over the largest absolute input rating, so values lie in (0, 1] for positive
  scales (1..10 anime, 0.5..5 MovieLens). An interaction without a score (MyAnimeList's ``-1`` read as
  unrated, or an implicit row of mixed data) gets the mean input rating over the same scale.
* ``residual``: ``(rating - μ - b_user - b_item) / scale``, the part of the rating the bias baseline
  (:class:`gpu_ann.baselines.Biases`) does not explain; an interaction without a score gets 0.

Everything is fitted on the *input* interactions only (training plus held-out users' fold-in rows,
assignment codes ``TRAIN`` and ``FOLD_IN``): validation and test ratings never leak into inputs. The
fit is deterministic, so evaluation, scoring and recommending recompute the same values from a run's
``data.npz``. Whether a user has an item is still decided by the structure: a residual of exactly 0 is
a seen item.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpu_ann.backend import get_backend
from gpu_ann.baselines import Biases
from gpu_ann.data.table import DataError, RatingsTable
from gpu_ann.matrix import InteractionMatrix
from gpu_ann.splits import FOLD_IN, TRAIN

INPUT_MODES = ("implicit", "rating", "residual")


@dataclass(frozen=True)
class ValueModel:
    """The fitted input values of one mode.

    Parameters
    ----------
    mode : str
        One of ``INPUT_MODES``.
    scale : float
        Ratings and residuals are divided by it: the largest absolute input rating (1 for implicit).
    fill : float
        The value of an interaction without a score, and of each item a new user lists without ratings.
    biases : Biases or None
        The fitted bias baseline of the ``residual`` mode, on the cpu backend.
    """

    mode: str
    scale: float = 1.0
    fill: float = 1.0
    biases: Biases | None = None

    def of(self, users: np.ndarray, items: np.ndarray, ratings: np.ndarray | None) -> np.ndarray | None:
        """The value of each (user, item, rating) triple; ``None`` in the implicit mode.

        Parameters
        ----------
        users, items : numpy.ndarray
            Indices of the interactions.
        ratings : numpy.ndarray or None
            Their ratings, NaN where there is no score.

        Returns
        -------
        numpy.ndarray or None
            float32 values, finite.
        """
        if self.mode == "implicit":
            return None
        if ratings is None:
            return np.full(len(users), self.fill, dtype=np.float32)
        ratings = np.asarray(ratings, dtype=np.float64)
        if self.mode == "rating":
            values = ratings / self.scale
        else:
            values = (ratings - self.biases.predict(users, items)) / self.scale
        return np.where(np.isfinite(ratings), values, self.fill).astype(np.float32)


def fit_values(mode: str, table: RatingsTable, assignment: np.ndarray) -> ValueModel:
    """Fit the input values of ``mode`` on the input interactions of a split.

    Parameters
    ----------
    mode : str
        ``"implicit"``, ``"rating"`` or ``"residual"``.
    table : RatingsTable
        The run's interactions.
    assignment : numpy.ndarray
        The split code of each interaction (``gpu_ann.splits``); ``TRAIN`` and ``FOLD_IN`` are inputs.

    Returns
    -------
    ValueModel

    Raises
    ------
    ValueError
        An unknown mode.
    DataError
        An explicit mode on data without ratings, or without a single finite input rating.
    """
    if mode not in INPUT_MODES:
        raise ValueError(f"unknown input value mode {mode!r}: expected one of {INPUT_MODES}")
    if mode == "implicit":
        return ValueModel(mode)
    if table.rating is None:
        raise DataError(f"{table.source}: input values {mode!r} need ratings, but the data has none (implicit)")
    inputs = np.isin(assignment, (TRAIN, FOLD_IN))
    ratings = table.rating[inputs].astype(np.float64)
    rated = np.isfinite(ratings)
    if not rated.any():
        raise DataError(f"{table.source}: input values {mode!r} need ratings, but no input interaction has one")
    scale = float(np.abs(ratings[rated]).max()) or 1.0
    if mode == "rating":
        return ValueModel(mode, scale, float(ratings[rated].mean() / scale))
    users, items = table.user[inputs][rated], table.item[inputs][rated]
    biases = Biases().fit(users, items, ratings[rated], table.n_users, table.n_items, get_backend("cpu"))
    return ValueModel(mode, scale, 0.0, biases)


def input_matrix(
    backend, table: RatingsTable, assignment: np.ndarray, mode: str = "implicit", users: np.ndarray | None = None
) -> InteractionMatrix:
    """The matrix input rows are built from: the input interactions, with their values in ``mode``.

    Parameters
    ----------
    backend : CpuBackend or CudaBackend
        Where the matrix goes.
    table : RatingsTable
        The run's interactions.
    assignment : numpy.ndarray
        The split code of each interaction; ``TRAIN`` and ``FOLD_IN`` rows are the inputs.
    mode : str
        Input value mode (``INPUT_MODES``).
    users : numpy.ndarray, optional
        Sorted global user indices: build only their rows, row ``r`` for user ``users[r]`` (a rank's share
        under ``--shard-users``). The values are still fitted on the whole table, as without sharding.

    Returns
    -------
    InteractionMatrix
        ``n_users x n_items`` (``len(users) x n_items`` when given), values ``None`` for implicit input.
    """
    model = fit_values(mode, table, assignment)
    inputs = np.isin(assignment, (TRAIN, FOLD_IN))
    rows, items = table.user[inputs], table.item[inputs]
    ratings = None if table.rating is None else table.rating[inputs]
    values = model.of(rows, items, ratings)
    n_rows = table.n_users
    if users is not None:
        keep = np.isin(rows, users)
        rows, items = np.searchsorted(users, rows[keep]).astype(np.int32), items[keep]
        values = None if values is None else values[keep]
        n_rows = len(users)
    return InteractionMatrix.from_pairs(backend, rows, items, n_rows, table.n_items, values=values)

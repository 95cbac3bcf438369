"""Splitting interactions into training, validation and test samples."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpu_ann.data.table import DataError, RatingsTable

SPLIT_NAMES = ("train", "validation", "test")


@dataclass
class Samples:
    """(user, item) index pairs of one split, on the host; ``len()`` is the number of pairs.

    Parameters
    ----------
    user : numpy.ndarray
        User index of each sample, int32.
    item : numpy.ndarray
        Item index of each sample (the label), int32, same length as ``user``.
    """

    user: np.ndarray  # int32
    item: np.ndarray  # int32

    def __len__(self) -> int:
        return len(self.user)


@dataclass
class Splits:
    """The three splits of one ratings table, indexable by name (``splits["validation"]``).

    Parameters
    ----------
    train, validation, test : Samples
        The samples of each split.
    n_users, n_items : int
        Size of the table the indices refer to.
    """

    train: Samples
    validation: Samples
    test: Samples
    n_users: int
    n_items: int

    def __getitem__(self, name: str) -> Samples:
        """The split called ``name`` (one of ``SPLIT_NAMES``); :class:`KeyError` for any other name."""
        if name not in SPLIT_NAMES:
            raise KeyError(f"unknown split {name!r}: expected one of {SPLIT_NAMES}")
        return getattr(self, name)


def random_split(table: RatingsTable, fractions=(0.8, 0.1, 0.1), seed: int = 0) -> tuple[Splits, np.ndarray]:
    """The seed's protocol: a seeded random split of the interactions.

    Returns the splits and, for each interaction of ``table``, the split it went to
    (0 train, 1 validation, 2 test), so the assignment can be stored and reproduced.

    Parameters
    ----------
    table : RatingsTable
        The interactions to split.
    fractions : sequence of three floats
        Shares of train, validation and test; non-negative, summing to 1. The train and validation
        counts are rounded, the test split takes the rest.
    seed : int
        Seed of ``numpy.random.default_rng`` for the permutation.

    Returns
    -------
    splits : Splits
        The samples of each split, in table order (see :func:`splits_from_assignment`).
    assignment : numpy.ndarray
        uint8 ``[table.nnz]``: 0, 1 or 2 per interaction.

    Raises
    ------
    ValueError
        ``fractions`` is not three non-negative numbers summing to 1.
    DataError
        The training or the validation split comes out empty (too few interactions).
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    if len(fractions) != 3 or (fractions < 0).any() or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {list(fractions)}")
    n = table.nnz
    order = np.random.default_rng(seed).permutation(n)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    assignment = np.full(n, 2, dtype=np.uint8)
    assignment[order[:n_train]] = 0
    assignment[order[n_train : n_train + n_val]] = 1
    splits = splits_from_assignment(table, assignment)
    if len(splits.train) == 0 or len(splits.validation) == 0:
        raise DataError(
            f"{table.source}: {n} interactions give {len(splits.train)} training and "
            f"{len(splits.validation)} validation samples; training needs both"
        )
    return splits, assignment


def splits_from_assignment(table: RatingsTable, assignment: np.ndarray) -> Splits:
    """Rebuild the splits from a stored per-interaction assignment (0/1/2), keeping table order.

    Parameters
    ----------
    table : RatingsTable
        The table the assignment was made for.
    assignment : numpy.ndarray
        One code per interaction of ``table``: 0 train, 1 validation, 2 test; other codes are dropped.

    Returns
    -------
    Splits
        New int32 arrays (copies of the table's indices).
    """
    parts = []
    for code in range(3):
        mask = assignment == code
        parts.append(Samples(table.user[mask].astype(np.int32), table.item[mask].astype(np.int32)))
    return Splits(*parts, n_users=table.n_users, n_items=table.n_items)

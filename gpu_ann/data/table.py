"""The in-memory rating table every later stage starts from."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class DataError(ValueError):
    """A ratings or split file cannot be used; the message names the file, line, column and value."""


@dataclass
class ReadSummary:
    """What the reader did: rows read, rows dropped and why (reason -> count).

    ``str()`` gives a one-line report ("1,000 rows read, 990 kept, 10 dropped (...)").

    Parameters
    ----------
    rows_read : int
        Data rows in the file.
    dropped : dict of str to int
        Rows left out, by reason.
    """

    rows_read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def rows_kept(self) -> int:
        """Rows read minus all rows dropped."""
        return self.rows_read - sum(self.dropped.values())

    def __str__(self) -> str:
        parts = [f"{self.rows_read:,} rows read", f"{self.rows_kept:,} kept"]
        parts += [f"{n:,} dropped ({why})" for why, n in self.dropped.items() if n]
        return ", ".join(parts)


@dataclass
class RatingsTable:
    """Interactions with raw ids mapped to contiguous indices.

    ``user[k]``, ``item[k]`` are indices into ``user_ids`` / ``item_ids`` (the raw ids, kept so that
    results can be reported in them). ``item_titles`` is aligned with ``item_ids`` ("" where unknown).

    Parameters
    ----------
    user, item : numpy.ndarray
        int32 ``[nnz]`` user and item index of each interaction.
    rating : numpy.ndarray or None
        float32 ``[nnz]``; None for purely implicit data.
    timestamp : numpy.ndarray or None
        int64 ``[nnz]``; None when the data has none.
    user_ids, item_ids : numpy.ndarray
        The raw ids, sorted, int64 or str dtype; position = index.
    item_titles : numpy.ndarray or None
        str dtype, aligned with ``item_ids``; None when the data has no titles.
    source : str
        Where the data came from (file name), for messages.
    summary : ReadSummary
        What the reader kept and dropped.
    """

    user: np.ndarray  # int32 [nnz]
    item: np.ndarray  # int32 [nnz]
    rating: np.ndarray | None  # float32 [nnz], None for purely implicit data
    timestamp: np.ndarray | None  # int64 [nnz], None when the data has none
    user_ids: np.ndarray  # raw ids, int64 or str ("U") dtype, sorted
    item_ids: np.ndarray
    item_titles: np.ndarray | None  # str dtype, aligned with item_ids
    source: str = ""
    summary: ReadSummary = field(default_factory=ReadSummary)

    @property
    def n_users(self) -> int:
        """Number of distinct users (``len(user_ids)``)."""
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        """Number of distinct items (``len(item_ids)``)."""
        return len(self.item_ids)

    @property
    def nnz(self) -> int:
        """Number of interactions (``len(user)``)."""
        return len(self.user)

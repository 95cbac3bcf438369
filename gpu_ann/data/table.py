"""The in-memory rating table every later stage starts from, and how parsed columns become one."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NoReturn, Protocol

import numpy as np
import pandas as pd


class DataError(ValueError):
    """A ratings or split file cannot be used; the message names the file, line, column and value."""


# Keys of ReadSummary.flagged: interactions (or ids) that are kept but worth knowing about.
UNRATED = "kept without a score (unrated)"
COLD_USERS = "held-out users with no training interaction (empty input row)"
COLD_ITEMS = "held-out items never in training (never a training label)"


@dataclass
class ReadSummary:
    """What the reader did: rows read, rows dropped and why, rows kept with a remark, how the file was read.

    ``str()`` gives the one-line report that training logs, e.g. "1,000 rows read, 990 kept, 10 dropped
    (duplicate (user, item) pair), 4 kept without a score (unrated), ratings checked against [1, 10]".

    Parameters
    ----------
    rows_read : int
        Data rows in the file (blank lines not counted).
    dropped : dict of str to int
        Rows left out, by reason (duplicates: the last row of a repeated (user, item) pair is kept).
    flagged : dict of str to int
        Rows (or ids) kept but worth knowing about, by remark: :data:`UNRATED` interactions (a NaN
        rating), :data:`COLD_USERS` and :data:`COLD_ITEMS` of a split given as files.
    blank_lines : int
        Lines with every field empty, skipped.
    rating_scale : tuple of two floats, optional
        The ``[low, high]`` every rating was checked against; None when none was declared.
    notes : list of str
        How the file was read when it was not plain UTF-8 (e.g. a Latin-1 fallback, with the byte offset).
    """

    rows_read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    flagged: dict[str, int] = field(default_factory=dict)
    blank_lines: int = 0
    rating_scale: tuple[float, float] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def rows_kept(self) -> int:
        """Rows read minus all rows dropped."""
        return self.rows_read - sum(self.dropped.values())

    @property
    def unrated(self) -> int:
        """Interactions kept without a score (the ``flagged`` count of :data:`UNRATED`)."""
        return self.flagged.get(UNRATED, 0)

    @classmethod
    def combine(cls, summaries: Iterable[ReadSummary]) -> ReadSummary:
        """One summary for several files read into one table (a split given as files).

        Parameters
        ----------
        summaries : iterable of ReadSummary
            The files' summaries; counts are added, notes concatenated.

        Returns
        -------
        ReadSummary
            ``rating_scale`` is kept only when every file declared the same one.
        """
        out = cls()
        scales = set()
        for s in summaries:
            out.rows_read += s.rows_read
            out.blank_lines += s.blank_lines
            for mine, theirs in ((out.dropped, s.dropped), (out.flagged, s.flagged)):
                for why, n in theirs.items():
                    mine[why] = mine.get(why, 0) + n
            out.notes += s.notes
            scales.add(s.rating_scale)
        out.rating_scale = scales.pop() if len(scales) == 1 else None
        return out

    def __str__(self) -> str:
        parts = [f"{self.rows_read:,} rows read", f"{self.rows_kept:,} kept"]
        parts += [f"{n:,} dropped ({why})" for why, n in self.dropped.items() if n]
        parts += [f"{n:,} {why}" for why, n in self.flagged.items() if n]
        if self.blank_lines:
            parts.append(f"{self.blank_lines:,} blank line{'s' if self.blank_lines > 1 else ''} skipped")
        if self.rating_scale is not None:
            parts.append(f"ratings checked against [{self.rating_scale[0]:g}, {self.rating_scale[1]:g}]")
        return "; ".join([", ".join(parts), *self.notes])


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
        float32 ``[nnz]``; None for purely implicit data. NaN marks an interaction without a score
        (MyAnimeList's ``-1``, "watched but not rated"): still an interaction, with no rating.
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
    rating: np.ndarray | None  # float32 [nnz], None for purely implicit data, NaN = no score
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

    @property
    def rated(self) -> np.ndarray | None:
        """bool ``[nnz]``: which interactions have a score (not NaN); None when the table has no ratings."""
        return None if self.rating is None else ~np.isnan(self.rating)

    def cold_start_counts(self, in_train: np.ndarray) -> dict[str, int]:
        """Count the users and items that have interactions, but none in training.

        Such a user's input row is empty (the kernels then use ``w = 1``: every item column 0 and the
        count features of one item); such an item is in the catalogue but never a training label.

        Parameters
        ----------
        in_train : numpy.ndarray
            bool ``[nnz]``: which interactions are training interactions.

        Returns
        -------
        dict of str to int
            ``{COLD_USERS: n, COLD_ITEMS: m}``, ready for ``summary.flagged.update``.
        """
        in_train = np.asarray(in_train, dtype=bool)
        if in_train.shape != (self.nnz,):
            raise ValueError(f"in_train has shape {in_train.shape}, expected ({self.nnz},): one flag per interaction")
        counts = {}
        for key, index, n in ((COLD_USERS, self.user, self.n_users), (COLD_ITEMS, self.item, self.n_items)):
            seen = np.bincount(index, minlength=n) > 0
            trained = np.bincount(index[in_train], minlength=n) > 0
            counts[key] = int((seen & ~trained).sum())
        return counts


# --- from parsed columns to a table (the readers' last step) -------------------------------------------

DUPLICATE = "duplicate (user, item) pair"
_INT = r"[+-]?\d+"
_MAX_IDS = int(np.iinfo(np.int32).max)  # indices are int32; a module constant so a test can shrink it
_INT64_MAX = int(np.iinfo(np.int64).max)


class RowSource(Protocol):
    """Where parsed rows came from: a name for messages and a way to point at one row's value."""

    name: str

    def fail(self, row: int, column: str, value: object, problem: str) -> NoReturn:
        """Raise a :class:`DataError` naming the file, the line (or row) of data row ``row``, the column and the value.

        Parameters
        ----------
        row : int
            The data row (``frame.index`` label).
        column : str
            The column as messages show it.
        value : object
            The bad value.
        problem : str
            What is wrong with it, e.g. "is not a number".
        """


def build_table(
    frame: pd.DataFrame, cols: dict, labels: dict, src: RowSource, *, scale=(None, ""), unrated=None,
    titles: dict | None = None, source: str = "", blank_lines: int = 0,
) -> RatingsTable:  # fmt: skip
    """Turn parsed columns into a :class:`RatingsTable`: map the ids, check the values, merge duplicates.

    Parameters
    ----------
    frame : pandas.DataFrame
        The data rows (text columns, or a Parquet file's own dtypes); ``frame.index`` is the row passed
        to ``src.fail``.
    cols : dict
        Role (``"user"``, ``"item"``, ``"rating"``, ``"timestamp"``) to column of ``frame``; rating and
        timestamp may be None.
    labels : dict
        Role to the column's name as error messages show it.
    src : RowSource
        Names the file and raises the reader's :class:`DataError` for a bad value.
    scale : (tuple of two floats or None, str)
        The ``[low, high]`` ratings must lie in (None: no check) and where it comes from, for messages.
    unrated : float, optional
        The rating value that means "interacted, not rated": kept as NaN and counted.
    titles : dict, optional
        Raw item id as text to title.
    source : str
        The file, for :attr:`RatingsTable.source`.
    blank_lines : int
        Blank lines the parser skipped, for the summary.

    Returns
    -------
    RatingsTable
        With its :class:`ReadSummary`; duplicate (user, item) pairs keep their last row.
    """
    user_ids, user = _map_ids(frame[cols["user"]], src, labels["user"], "user")
    item_ids, item = _map_ids(frame[cols["item"]], src, labels["item"], "item")
    summary = ReadSummary(rows_read=len(frame), blank_lines=blank_lines)
    rating = None
    if cols["rating"] is not None:
        rating = _ratings(frame[cols["rating"]], src, labels["rating"], scale, unrated)
        summary.rating_scale = scale[0]
    timestamp = None
    if cols["timestamp"] is not None:
        timestamp = _timestamps(frame[cols["timestamp"]], src, labels["timestamp"])

    # Keep the last of repeated (user, item) rows: later rows usually correct earlier ones.
    dup = pd.Series(user.astype(np.int64) * len(item_ids) + item).duplicated(keep="last").to_numpy()
    summary.dropped[DUPLICATE] = int(dup.sum())
    if dup.any():
        keep = ~dup
        user, item = user[keep], item[keep]
        rating = rating[keep] if rating is not None else None
        timestamp = timestamp[keep] if timestamp is not None else None
    if rating is not None and unrated is not None:
        summary.flagged[UNRATED] = int(np.isnan(rating).sum())

    item_titles = None
    if titles is not None:
        if item_ids.dtype.kind == "i":
            titles = {int(k): v for k, v in titles.items() if re.fullmatch(_INT, k)}
        item_titles = np.array([titles.get(i, "") for i in item_ids.tolist()], dtype=str)
    return RatingsTable(
        user=user, item=item, rating=rating, timestamp=timestamp, user_ids=user_ids, item_ids=item_ids,
        item_titles=item_titles, source=source, summary=summary,
    )  # fmt: skip


def _map_ids(col: pd.Series, src: RowSource, label: str, role: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw ids (int64 when every id is an integer that fits, else stripped text) and int32 indices."""
    if pd.api.types.is_integer_dtype(col.dtype) and not col.isna().any():
        raw = col.to_numpy()
        if raw.dtype.kind == "u" and (raw > _INT64_MAX).any():  # a cast would wrap around silently
            k = int(np.argmax(raw > _INT64_MAX))
            src.fail(col.index[k], label, raw[k], "does not fit in a 64-bit integer id")
        raw = raw.astype(np.int64)
    elif pd.api.types.is_float_dtype(col.dtype):
        raw = _float_ids(col, src, label, role)
    else:
        text = col.astype(str).str.strip()
        empty = (col.isna() | (text == "")).to_numpy()
        if empty.any():
            k = int(np.argmax(empty))
            src.fail(col.index[k], label, col.iloc[k], f"is empty: every row needs a {role} id")
        raw = text.to_numpy(dtype=str)
        if text.str.fullmatch(_INT).all():
            try:
                raw = raw.astype(np.int64)
            except OverflowError:  # integers beyond int64 stay text (compared as written)
                pass
    ids, index = np.unique(raw, return_inverse=True)
    if len(ids) > _MAX_IDS:
        raise DataError(
            f"{src.name}, column {label}: {len(ids):,} distinct {role} ids; indices are int32, "
            f"so at most {_MAX_IDS:,} fit"
        )
    return ids, index.astype(np.int32).reshape(-1)


def _float_ids(col: pd.Series, src: RowSource, label: str, role: str) -> np.ndarray:
    """Ids stored as floats (Parquet): whole numbers within 2**53 become int64, anything else is an error."""
    values = col.to_numpy(dtype=np.float64, na_value=np.nan)
    checks = (
        (np.isnan(values), f"is empty: every row needs a {role} id"),
        (np.isinf(values) | (np.abs(values) > 2.0**53), "is too large to be an exact integer id in a float column"),
        (values != np.round(values), "is not a whole number: ids must be integers or text"),
    )
    for bad, problem in checks:
        if bad.any():
            k = int(np.argmax(bad))
            src.fail(col.index[k], label, values[k], problem)
    return values.astype(np.int64)


def _ratings(col: pd.Series, src: RowSource, label: str, scale, unrated) -> np.ndarray:
    """float32 ratings: finite, within the scale, the ``unrated`` value replaced by NaN."""
    values = _numbers(col, src, label)
    no_score = values == unrated if unrated is not None else np.zeros(len(values), dtype=bool)
    (bounds, why) = scale
    if bounds is not None:
        lo, hi = bounds
        outside = ((values < lo) | (values > hi)) & ~no_score
        if outside.any():
            k = int(np.argmax(outside))
            extra = f"; {unrated:g} means not rated" if unrated is not None else ""
            problem = f"is outside the rating scale [{lo:g}, {hi:g}] ({why}{extra}); rating_scale=None reads any rating"
            src.fail(col.index[k], label, col.iloc[k], problem)
    rating = values.astype(np.float32)
    rating[no_score] = np.nan
    return rating


def _numbers(col: pd.Series, src: RowSource, label: str) -> np.ndarray:
    """float64 values; a value that is not a finite number is an error."""
    text = col if pd.api.types.is_numeric_dtype(col.dtype) else col.astype(str).str.strip()
    values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(values)
    if bad.any():
        k = int(np.argmax(bad))
        value = col.iloc[k]
        try:
            number = float(value)
            problem = "is NaN" if number != number else "is infinite"
        except (TypeError, ValueError):
            problem = "is not a number"
        src.fail(col.index[k], label, value, problem)
    return values


def _timestamps(col: pd.Series, src: RowSource, label: str) -> np.ndarray:
    """int64 timestamps (seconds, or whatever unit the file uses, as long as they are whole)."""
    if pd.api.types.is_datetime64_any_dtype(col.dtype):
        return (col.astype("datetime64[s]").astype(np.int64)).to_numpy()
    if pd.api.types.is_integer_dtype(col.dtype) and not col.isna().any():
        return col.to_numpy(np.int64)
    text = col.astype(str).str.strip()
    if text.str.fullmatch(_INT).all():  # exact, even past 2**53 (nanosecond stamps)
        return text.to_numpy(dtype=str).astype(np.int64)
    values = _numbers(col, src, label)
    fractional = values != np.round(values)
    if fractional.any():
        k = int(np.argmax(fractional))
        src.fail(col.index[k], label, col.iloc[k], "is not a whole number of seconds")
    return values.astype(np.int64)

"""Splitting interactions into training, validation and test samples."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gpu_ann.data.table import DataError, RatingsTable

SPLIT_NAMES = ("train", "validation", "test")
TRAIN, VALIDATION, TEST, FOLD_IN = 0, 1, 2, 3  # per-interaction assignment codes, as stored in data.npz


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
    fold_in : Samples
        Input-only interactions of held-out users (the ``users`` protocol); empty otherwise.
    """

    train: Samples
    validation: Samples
    test: Samples
    n_users: int
    n_items: int
    fold_in: Samples = field(default_factory=lambda: Samples(np.empty(0, np.int32), np.empty(0, np.int32)))

    @property
    def inputs(self) -> Samples:
        """The interactions input rows are built from: training plus fold-in (held-out users' known items).

        Only ``train`` gives training examples; ``fold_in`` rows exist so that held-out users (the
        ``users`` protocol) have input rows, and are never trained on.
        """
        if not len(self.fold_in):
            return self.train
        return Samples(
            np.concatenate([self.train.user, self.fold_in.user]), np.concatenate([self.train.item, self.fold_in.item])
        )

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
    fractions = _fractions(fractions)
    n = table.nnz
    order = np.random.default_rng(seed).permutation(n)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    assignment = np.full(n, TEST, dtype=np.uint8)
    assignment[order[:n_train]] = TRAIN
    assignment[order[n_train : n_train + n_val]] = VALIDATION
    return _finish(table, assignment, "random")


def per_user_split(table: RatingsTable, fractions=(0.8, 0.1, 0.1), min_items: int = 5, seed: int = 0):
    """Hold out a share of each user's items: the per-user fraction protocol.

    Each user with at least ``min_items`` interactions gives ``round(share * n)`` of them (at least one
    when the share is positive) to validation and to test, chosen at random; users with fewer keep all
    of theirs in training.

    Parameters
    ----------
    table : RatingsTable
        The interactions.
    fractions : sequence of three floats
        Train, validation and test shares of each eligible user's items.
    min_items : int
        Users with fewer interactions stay whole in training.
    seed : int
        Seed of the random choice.

    Returns
    -------
    (Splits, numpy.ndarray)
        As :func:`random_split`.
    """
    fractions = _fractions(fractions)
    rank, count = _rank_within_user(table, np.random.default_rng(seed).random(table.nnz))
    # At least one item stays in training, whatever the shares and min_items.
    n_test = np.minimum(_share(count, fractions[2]), count - 1)
    n_val = np.minimum(_share(count, fractions[1]), count - 1 - n_test)
    eligible = count >= min_items
    assignment = np.full(table.nnz, TRAIN, dtype=np.uint8)
    assignment[eligible & (rank >= count - n_test - n_val)] = VALIDATION
    assignment[eligible & (rank >= count - n_test)] = TEST
    return _finish(table, assignment, f"per-user (users with at least {min_items} items)")


def leave_last_split(table: RatingsTable, k: int = 1):
    """Each user's last ``k`` interactions by timestamp to test, the ``k`` before them to validation.

    Users with fewer than ``2k + 1`` interactions stay whole in training. Equal timestamps keep the
    file's order.

    Parameters
    ----------
    table : RatingsTable
        The interactions; must have timestamps.
    k : int
        Interactions per user in each of validation and test.

    Returns
    -------
    (Splits, numpy.ndarray)
        As :func:`random_split`.

    Raises
    ------
    DataError
        The table has no timestamps.
    """
    if table.timestamp is None:
        raise DataError(f"{table.source}: the leave-last protocol needs timestamps, and this data has none")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    # Rank by time within each user; the file's order breaks ties (lexsort is stable).
    rank, count = _rank_within_user(table, table.timestamp)
    from_end = count - 1 - rank
    eligible = count >= 2 * k + 1
    assignment = np.full(table.nnz, TRAIN, dtype=np.uint8)
    assignment[eligible & (from_end < 2 * k)] = VALIDATION
    assignment[eligible & (from_end < k)] = TEST
    return _finish(table, assignment, f"leave-last-{k}")


def user_split(table: RatingsTable, fractions=(0.8, 0.1, 0.1), fold_in: float = 0.8, seed: int = 0):
    """Held-out users (strong generalisation): whole users kept out of training.

    Users are split at random by ``fractions``. A validation or test user's items are split again at
    random: ``fold_in`` of them (rounded) are the known items their input row is built from (code
    ``FOLD_IN``, never trained on), the rest are the items scored.

    Parameters
    ----------
    table : RatingsTable
        The interactions.
    fractions : sequence of three floats
        Shares of the users in train, validation and test.
    fold_in : float
        Share of a held-out user's items used as input, in [0, 1).
    seed : int
        Seed of both random choices.

    Returns
    -------
    (Splits, numpy.ndarray)
        As :func:`random_split`, with ``splits.fold_in`` holding the input-only interactions.
    """
    fractions = _fractions(fractions)
    if not 0 <= fold_in < 1:
        raise ValueError(f"fold-in share must be in [0, 1), got {fold_in}")
    rng = np.random.default_rng(seed)
    users = rng.permutation(table.n_users)
    n_train = int(round(fractions[0] * table.n_users))
    n_val = int(round(fractions[1] * table.n_users))
    role = np.full(table.n_users, TEST, dtype=np.uint8)
    role[users[:n_train]] = TRAIN
    role[users[n_train : n_train + n_val]] = VALIDATION
    rank, count = _rank_within_user(table, rng.random(table.nnz))
    assignment = role[table.user]
    # At least one item of every held-out user is left to score.
    known = (assignment != TRAIN) & (rank < np.minimum(np.rint(count * fold_in), count - 1))
    assignment[known] = FOLD_IN
    return _finish(table, assignment, f"held-out users (fold-in {fold_in:g})")


PROTOCOLS = ("random", "per-user", "leave-last", "users")


def make_split(
    table: RatingsTable,
    protocol: str = "random",
    fractions=(0.8, 0.1, 0.1),
    seed: int = 0,
    min_items: int = 5,
    leave_last: int = 1,
    fold_in: float = 0.8,
):
    """Split ``table`` by the named protocol (one of ``PROTOCOLS``); see each protocol's function.

    Parameters
    ----------
    table : RatingsTable
        The interactions.
    protocol : {"random", "per-user", "leave-last", "users"}
        :func:`random_split`, :func:`per_user_split`, :func:`leave_last_split` or :func:`user_split`.
    fractions : sequence of three floats
        Train / validation / test shares (of interactions, of each user's items, or of users).
    seed : int
        Seed of the protocol's random choices (leave-last has none).
    min_items : int
        ``per-user``: users with fewer interactions stay in training.
    leave_last : int
        ``leave-last``: interactions per user in each of validation and test.
    fold_in : float
        ``users``: share of a held-out user's items used as input.

    Returns
    -------
    (Splits, numpy.ndarray)
        The splits and the per-interaction assignment codes.
    """
    if protocol == "random":
        return random_split(table, fractions, seed)
    if protocol == "per-user":
        return per_user_split(table, fractions, min_items, seed)
    if protocol == "leave-last":
        return leave_last_split(table, leave_last)
    if protocol == "users":
        return user_split(table, fractions, fold_in, seed)
    raise ValueError(f"unknown protocol {protocol!r}: expected one of {PROTOCOLS}")


def _fractions(fractions) -> np.ndarray:
    fractions = np.asarray(fractions, dtype=np.float64)
    if len(fractions) != 3 or (fractions < 0).any() or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {list(fractions)}")
    return fractions


def _share(count: np.ndarray, share: float) -> np.ndarray:
    """round(share * count) per interaction's user, at least 1 when the share is positive."""
    n = np.rint(count * share).astype(np.int64)
    return np.maximum(n, 1) if share > 0 else n


def _rank_within_user(table: RatingsTable, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each interaction: its rank among its user's interactions by ``key`` (ties: table order), and
    the user's interaction count. Vectorised: one stable sort, no loop over users."""
    order = np.lexsort((np.arange(table.nnz), key, table.user))
    count = np.bincount(table.user, minlength=table.n_users)
    first = np.cumsum(count) - count
    rank = np.empty(table.nnz, dtype=np.int64)
    rank[order] = np.arange(table.nnz) - first[table.user[order]]
    return rank, count[table.user]


def _finish(table: RatingsTable, assignment: np.ndarray, protocol: str):
    splits = splits_from_assignment(table, assignment)
    if len(splits.train) == 0 or len(splits.validation) == 0:
        raise DataError(
            f"{table.source}: {table.nnz} interactions give {len(splits.train)} training and "
            f"{len(splits.validation)} validation samples under the {protocol} protocol; training needs both"
        )
    return splits, assignment


def splits_from_assignment(table: RatingsTable, assignment: np.ndarray) -> Splits:
    """Rebuild the splits from a stored per-interaction assignment (0/1/2), keeping table order.

    Parameters
    ----------
    table : RatingsTable
        The table the assignment was made for.
    assignment : numpy.ndarray
        One code per interaction of ``table``: 0 train, 1 validation, 2 test, 3 fold-in (input only).

    Returns
    -------
    Splits
        New int32 arrays (copies of the table's indices).
    """
    parts = []
    for code in (TRAIN, VALIDATION, TEST, FOLD_IN):
        mask = assignment == code
        parts.append(Samples(table.user[mask].astype(np.int32), table.item[mask].astype(np.int32)))
    train, validation, test, fold_in = parts
    return Splits(train, validation, test, n_users=table.n_users, n_items=table.n_items, fold_in=fold_in)


def splits_from_tables(train: RatingsTable, validation: RatingsTable, test: RatingsTable | None = None):
    """Splits given as separate tables (the user's own split files), joined into one table.

    Raw ids are merged across the files (a user or item known only from validation or test gets an
    index too: such a user has an empty input row, such an item is never a training label); ids are
    compared as text when the files disagree on their type. Titles come from whichever file has them.

    Parameters
    ----------
    train, validation : RatingsTable
        The training and validation interactions.
    test : RatingsTable, optional
        The test interactions.

    Returns
    -------
    (RatingsTable, Splits, numpy.ndarray)
        The joined table, its splits and the per-interaction assignment (0/1/2, file order kept).
    """
    parts = [t for t in (train, validation, test) if t is not None]
    codes = np.concatenate([np.full(t.nnz, code, np.uint8) for code, t in zip((TRAIN, VALIDATION, TEST), parts)])

    def merged(attr: str, ids: str):
        raw = [getattr(t, ids)[getattr(t, attr)] for t in parts]
        if len({r.dtype.kind for r in raw}) > 1:  # ints in one file, text in another: compare as text
            raw = [r.astype(str) for r in raw]
        return np.unique(np.concatenate(raw), return_inverse=True)

    user_ids, user = merged("user", "user_ids")
    item_ids, item = merged("item", "item_ids")
    titles = None
    if any(t.item_titles is not None for t in parts):
        known = {}
        for t in parts:
            if t.item_titles is not None:
                known.update(zip(t.item_ids.astype(item_ids.dtype).tolist(), t.item_titles.tolist()))
        titles = np.array([known.get(i, "") for i in item_ids.tolist()])
    ratings = [t.rating for t in parts]
    table = RatingsTable(
        user=user.astype(np.int32),
        item=item.astype(np.int32),
        rating=np.concatenate(ratings) if all(r is not None for r in ratings) else None,
        timestamp=None,
        user_ids=user_ids,
        item_ids=item_ids,
        item_titles=titles,
        source=" + ".join(t.source for t in parts),
    )
    splits, assignment = _finish(table, codes, "given split files")
    return table, splits, assignment

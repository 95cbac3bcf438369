"""Synthetic interaction matrices for scale and speed tests, shaped like the real anime data.

Never a stand-in for real data in quality results: it only reproduces the two marginals that decide
how much work a batch is, how many items users have (row lengths) and how concentrated the items are
(which columns are hot), fitted to a real :class:`~gpu_ann.data.table.RatingsTable`.

The fit is non-parametric, because the simple parametric families did not fit the anime data well
(a log-normal put the median user at 25 items instead of 45; a Zipf-Mandelbrot curve gave the top 1%
of items 8% of the interactions instead of 17%):

* user activity: the empirical quantile function of items per user, scaled so that the mean row length
  is the one asked for;
* item popularity: the sorted share of interactions of each item, as a function of the item's relative
  rank, interpolated to the catalogue size asked for.

Generation is vectorised: item ranks are drawn by inverse CDF for all users at once, repeated
(user, item) pairs are removed with one sort of 64-bit keys (which also yields CSR order), and a few
top-up rounds replace most of them. Ranks are mapped to item ids by a random permutation, so hot items
are scattered over the columns as in real data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from gpu_ann.data.table import RatingsTable

# Named sizes: (users, items, interactions).
SCALES = {
    "bundled": (4_714, 7_157, 419_943),  # the bundled anime sample
    "mal2020": (325_000, 17_500, 57_000_000),  # MyAnimeList 2020 scale
    "catalog100k": (200_000, 100_000, 20_000_000),  # a 100k-item catalogue, 100 items per user
}
TOP_UP_ROUNDS = 4


@dataclass(frozen=True)
class Profile:
    """Fitted marginals: sorted items-per-user counts and sorted item shares of a real table.

    Parameters
    ----------
    user_counts : numpy.ndarray
        float64 items per user (users with at least one), ascending.
    item_shares : numpy.ndarray
        float64 share of all interactions per item, descending (sums to 1).
    source : str
        Where the table came from.
    """

    user_counts: np.ndarray  # items per user, ascending
    item_shares: np.ndarray  # share of all interactions per item, descending (sums to 1)
    source: str = ""

    def row_lengths(self, rng: np.random.Generator, n_users: int, mean: float, n_items: int) -> np.ndarray:
        """Items per user for ``n_users`` users, drawn from the fitted quantile function.

        Parameters
        ----------
        rng : numpy.random.Generator
            Source of the uniform draws.
        n_users : int
            How many row lengths.
        mean : float
            Target mean: the draws are scaled by ``mean / user_counts.mean()``.
        n_items : int
            Upper bound of a row length.

        Returns
        -------
        numpy.ndarray
            int64 ``[n_users]``, rounded and clipped to ``[1, n_items]``.
        """
        q = np.linspace(0, 1, len(self.user_counts))
        draws = np.interp(rng.random(n_users), q, self.user_counts)
        return np.clip(np.rint(draws * (mean / self.user_counts.mean())), 1, n_items).astype(np.int64)

    def item_weights(self, n_items: int) -> np.ndarray:
        """Popularity of the items by rank (descending), for a catalogue of ``n_items``.

        Parameters
        ----------
        n_items : int
            Catalogue size; the fitted shares are interpolated over relative rank.

        Returns
        -------
        numpy.ndarray
            float64 ``[n_items]`` weights summing to 1, most popular first.
        """
        real_rank = (np.arange(len(self.item_shares)) + 0.5) / len(self.item_shares)
        w = np.interp((np.arange(n_items) + 0.5) / n_items, real_rank, self.item_shares)
        return w / w.sum()


def fit(table: RatingsTable) -> Profile:
    """Fit the two marginals to a real table.

    Parameters
    ----------
    table : RatingsTable
        The real data.

    Returns
    -------
    Profile
    """
    per_user = np.bincount(table.user, minlength=table.n_users)
    per_item = np.bincount(table.item, minlength=table.n_items).astype(np.float64)
    return Profile(
        np.sort(per_user[per_user > 0]).astype(np.float64), np.sort(per_item)[::-1] / per_item.sum(), table.source
    )


def _sorted_unique(keys: np.ndarray) -> np.ndarray:
    # Sort and drop repeats by hand: numpy 2's np.unique on 10**7 int64 keys took 80x longer than a sort.
    keys = np.sort(keys)
    keep = np.empty(len(keys), dtype=bool)
    keep[:1] = True
    np.not_equal(keys[1:], keys[:-1], out=keep[1:])
    return keys[keep]


def generate(profile: Profile, n_users: int, n_items: int, n_interactions: int, seed: int = 0) -> sp.csr_matrix:
    """A users x items CSR (values 1, sorted rows, no duplicates) with about ``n_interactions`` entries.

    Parameters
    ----------
    profile : Profile
        The fitted marginals.
    n_users, n_items : int
        Shape of the matrix.
    n_interactions : int
        Target number of entries; the result has somewhat fewer when repeats remain after the
        top-up rounds (or row lengths were clipped).
    seed : int
        Seed of ``numpy.random.default_rng``; the same arguments give the same matrix.

    Returns
    -------
    scipy.sparse.csr_matrix
        float32 values, every user with at least one item.
    """
    rng = np.random.default_rng(seed)
    wanted = profile.row_lengths(rng, n_users, n_interactions / n_users, n_items)
    cdf = np.cumsum(profile.item_weights(n_items))
    rank_to_item = rng.permutation(n_items).astype(np.int64)

    def draw(per_user: np.ndarray) -> np.ndarray:
        users = np.repeat(np.arange(n_users, dtype=np.int64), per_user)
        ranks = np.minimum(np.searchsorted(cdf, rng.random(len(users))), n_items - 1)
        return users * n_items + rank_to_item[ranks]

    keys = _sorted_unique(draw(wanted))
    for _ in range(TOP_UP_ROUNDS):  # replace pairs lost to repeats (heavy users of hot items lose most)
        missing = np.maximum(wanted - np.bincount(keys // n_items, minlength=n_users), 0)
        if not missing.any():
            break
        keys = _sorted_unique(np.concatenate([keys, draw(missing)]))
    users = keys // n_items
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(users, minlength=n_users), out=indptr[1:])
    indices = (keys - users * n_items).astype(np.int32)
    return sp.csr_matrix((np.ones(len(indices), np.float32), indices, indptr), shape=(n_users, n_items))


def describe(matrix: sp.csr_matrix) -> dict[str, float]:
    """The statistics shown side by side for real and synthetic data.

    Parameters
    ----------
    matrix : scipy.sparse.csr_matrix
        Users x items.

    Returns
    -------
    dict of str to int or float
        Shape, interactions, items-per-user mean and percentiles, share of interactions held by the
        top 1% and 10% of items, and the number of items never used.
    """
    per_user = np.diff(matrix.indptr)
    per_item = np.sort(np.bincount(matrix.indices, minlength=matrix.shape[1]))[::-1]
    total = per_item.sum()
    n = len(per_item)
    return {
        "users": matrix.shape[0],
        "items": matrix.shape[1],
        "interactions": int(matrix.nnz),
        "items/user mean": float(per_user.mean()),
        "items/user p10": float(np.percentile(per_user, 10)),
        "items/user median": float(np.median(per_user)),
        "items/user p90": float(np.percentile(per_user, 90)),
        "items/user p99": float(np.percentile(per_user, 99)),
        "share of top 1% items": float(per_item[: max(n // 100, 1)].sum() / total),
        "share of top 10% items": float(per_item[: max(n // 10, 1)].sum() / total),
        "items never used": int((per_item == 0).sum()),
    }


def samples_of(matrix: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Every stored (user, item) pair as training samples, in CSR order.

    Parameters
    ----------
    matrix : scipy.sparse.csr_matrix
        Users x items.

    Returns
    -------
    users, items : numpy.ndarray
        int32 ``[nnz]`` each.
    """
    users = np.repeat(np.arange(matrix.shape[0], dtype=np.int32), np.diff(matrix.indptr))
    return users, matrix.indices.astype(np.int32)

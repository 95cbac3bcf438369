"""Sharding users across the ranks of a ``torchrun`` run (``--shard-users``).

Without sharding every rank holds the whole input matrix on its device and draws a disjoint share of
each epoch's samples. With it, each rank holds only the rows of the users it owns, and trains and
evaluates only their samples, so the device matrix and sample arrays shrink with the number of ranks
(the host still reads the whole file: every rank needs the id maps and the global item counts). The
fixed evaluation subsets are chosen over the whole splits, as without sharding, and each rank scores the
part its users own (:meth:`UserShard.evaluation_subset`).

Ownership balances training samples, not users: users are sorted by their number of training samples and
dealt to the ranks in snake order (0, 1, ..., w-1, w-1, ..., 0, ...), which keeps the ranks' totals within
the largest user's count of each other. Every rank then runs epochs of the largest rank's length (the others
repeat the start of their own order), so all ranks take the same number of steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpu_ann.batching import fixed_subset
from gpu_ann.splits import Samples


@dataclass(frozen=True)
class UserShard:
    """The users one rank owns and how its samples map to its rows.

    Parameters
    ----------
    users : numpy.ndarray
        Global indices of the owned users, sorted; row ``r`` of this rank's matrix is user ``users[r]``.
    n_users : int
        Users in the whole table.
    epoch_samples : int
        Training samples per epoch on every rank: the largest rank's count.
    """

    users: np.ndarray
    n_users: int
    epoch_samples: int

    def owns(self, user: np.ndarray) -> np.ndarray:
        """Boolean mask: which of the global user indices ``user`` this rank owns.

        Parameters
        ----------
        user : numpy.ndarray
            Global user indices.
        """
        owned = np.zeros(self.n_users, dtype=bool)
        owned[self.users] = True
        return owned[user]

    def local(self, samples: Samples) -> Samples:
        """This rank's samples, their users renumbered to rows of the rank's matrix.

        Parameters
        ----------
        samples : Samples
            Samples with global user indices.
        """
        keep = self.owns(samples.user)
        rows = np.searchsorted(self.users, samples.user[keep]).astype(np.int32)
        return Samples(rows, samples.item[keep])

    def evaluation_subset(self, samples: Samples, batch_size: int, n_batches: int | None, seed: int) -> Samples:
        """This rank's part of the fixed evaluation subset an unsharded run scores, as rows of its matrix.

        The subset is chosen over the whole split (:func:`gpu_ann.batching.fixed_subset`), then the rank
        keeps its own users' samples: the ranks together score exactly the samples one process would, so
        the all-reduced losses are the same numbers.

        Parameters
        ----------
        samples : Samples
            The whole split, with global user indices.
        batch_size, n_batches, seed
            As for :class:`gpu_ann.batching.FixedBatches` (``n_batches=None``: the whole split).
        """
        chosen = fixed_subset(len(samples), batch_size, n_batches, seed)
        return self.local(Samples(samples.user[chosen], samples.item[chosen]))


def shard_users(train_users: np.ndarray, n_users: int, rank: int, world_size: int) -> UserShard:
    """Deal the users to ``world_size`` ranks, balancing training samples, and return ``rank``'s share.

    Every rank computes the same deal from the same data, with no communication.

    Parameters
    ----------
    train_users : numpy.ndarray
        The user index of every training sample.
    n_users : int
        Users in the table (users without training samples are dealt too: they may have validation rows).
    rank, world_size : int
        This rank and the number of ranks.

    Returns
    -------
    UserShard

    Raises
    ------
    ValueError
        More ranks than users with training samples (some rank would have nothing to train on).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
    counts = np.bincount(train_users, minlength=n_users)
    trained = int(np.count_nonzero(counts))
    if trained < world_size:
        raise ValueError(
            f"--shard-users over {world_size} ranks needs at least {world_size} users with training samples, "
            f"the data has {trained}"
        )
    order = np.argsort(-counts, kind="stable")  # most samples first; ties by user index, so every rank agrees
    position = np.arange(n_users) % (2 * world_size)
    owner_of_position = np.where(position < world_size, position, 2 * world_size - 1 - position)
    owner = np.empty(n_users, dtype=np.int64)
    owner[order] = owner_of_position
    per_rank = np.bincount(owner, weights=counts, minlength=world_size).astype(np.int64)
    return UserShard(np.flatnonzero(owner == rank), n_users, int(per_rank.max()))

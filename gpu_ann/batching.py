"""Assembling samples into dense batches on the backend (the loader in ``gpu_ann.loader`` drives it)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from gpu_ann.handoff import BatchBuffers
from gpu_ann.matrix import InteractionMatrix
from gpu_ann.splits import Samples


def check_samples(matrix: InteractionMatrix, samples: Samples, allow_no_target: bool = False) -> None:
    """Raise ``IndexError`` unless every sample's user and item index lies inside ``matrix``.

    Parameters
    ----------
    matrix : InteractionMatrix
        The input rows.
    samples : Samples
        The (user, item) pairs.
    allow_no_target : bool
        Accept item -1, "no target" (recommending from a whole row: nothing is removed from it).
    """
    if not len(samples):
        return
    if samples.user.max() >= matrix.n_users or samples.item.max() >= matrix.n_items:
        raise IndexError(
            f"samples reach user {samples.user.max()} / item {samples.item.max()} but the matrix is "
            f"{matrix.n_users} x {matrix.n_items}"
        )
    if samples.user.min() < 0 or samples.item.min() < (-1 if allow_no_target else 0):
        raise IndexError("samples hold negative user or item indices")


def fixed_subset(n: int, batch_size: int, n_batches: int | None, seed: int) -> np.ndarray:
    """Which samples of a split of ``n`` the seed's fixed evaluation set scores, in the order it scores them.

    The one definition of that choice: :class:`FixedBatches` keeps these samples, and a ``--shard-users``
    rank the part of them its users own, so the ranks together score what one process would.

    Parameters
    ----------
    n : int
        Samples in the split.
    batch_size : int
        Rows per evaluation batch.
    n_batches : int or None
        Batches to keep; ``None`` keeps the whole split (in random order).
    seed : int
        Seeds the subset, on a stream apart from the training epochs'.

    Returns
    -------
    numpy.ndarray
        ``min(n, n_batches * batch_size)`` distinct indices in ``[0, n)`` (all ``n`` for ``None``).
    """
    take = n if n_batches is None else min(n, n_batches * batch_size)
    # Its own stream of the seed, apart from the training epochs' [seed, epoch] streams.
    return np.random.default_rng([seed, 0xE7A1]).permutation(n)[:take]


class BatchAssembler:
    """Builds ``(X, y)`` for batches of sample indices into one reused pair of buffers.

    The tensors returned by :meth:`assemble` are views of those buffers: the next call overwrites
    them, so finish with a batch (forward and backward) before asking for the next one. On the GPU the
    kernel runs on torch's current stream, which orders it after the step that read the last batch.

    Parameters
    ----------
    matrix : InteractionMatrix
        The input rows (the training split's matrix).
    samples : Samples
        The (user, item) pairs; copied to the backend once, as int32 torch tensors.
    max_rows : int
        The largest batch :meth:`assemble` will be asked for.
    buffers : BatchBuffers, optional
        Buffers to share with another assembler used in turn; by default new ones of ``max_rows``.
    allow_no_target : bool
        Accept item ``-1`` ("no target": nothing is removed from the row), as recommending does.
    dtype : torch.dtype
        ``torch.float32`` or ``torch.bfloat16`` for new buffers; ignored when ``buffers`` is given.

    Raises
    ------
    IndexError
        A sample's user or item lies outside the matrix (or is negative).
    ValueError
        ``buffers`` has fewer than ``max_rows`` rows or a width other than ``n_items + 3``.
    """

    def __init__(
        self,
        matrix: InteractionMatrix,
        samples: Samples,
        max_rows: int,
        buffers: BatchBuffers | None = None,
        allow_no_target: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        backend = matrix.backend
        self.backend = backend
        self.n_samples = len(samples)
        self.max_rows = max_rows
        self.n_items = matrix.n_items
        check_samples(matrix, samples, allow_no_target)
        # Kernel views made once, so that launches neither convert nor sync. The matrix is CuPy's; the
        # sample arrays are torch's, made on the stream the kernels run on.
        self._indptr = backend.kernel_array(matrix.indptr)
        self._indices = backend.kernel_array(matrix.indices)
        # Length 0 tells the kernel the input is implicit (every value 1).
        values = matrix.values if matrix.values is not None else backend.from_host(np.empty(0, np.float32))
        self._values = backend.kernel_array(values)
        self._users = backend.view_of_tensor(backend.tensor_from_host(samples.user.astype(np.int32)))
        self._items = backend.view_of_tensor(backend.tensor_from_host(samples.item.astype(np.int32)))
        # Assemblers used one after another (training, then evaluation) may share one set of buffers.
        self.buffers = buffers or BatchBuffers(backend, max_rows, matrix.n_items + 3, dtype)
        if self.buffers.X.shape[0] < max_rows or self.buffers.X.shape[1] != matrix.n_items + 3:
            raise ValueError(
                f"shared buffers {tuple(self.buffers.X.shape)} do not fit {max_rows} x {matrix.n_items + 3}"
            )

    def to_device_indices(self, order: np.ndarray):
        """Sample indices from the host to the form the kernel takes (one host-device copy).

        Parameters
        ----------
        order : numpy.ndarray
            Indices into the samples, each in ``[0, n_samples)``.

        Returns
        -------
        numpy.ndarray or numba device array
            An int64 kernel view of a new torch tensor on the backend's device.

        Raises
        ------
        IndexError
            An index is outside ``[0, n_samples)``.
        """
        if len(order) and (order.min() < 0 or order.max() >= self.n_samples):
            raise IndexError(f"sample indices must lie in [0, {self.n_samples})")
        return self.backend.view_of_tensor(self.backend.tensor_from_host(order.astype(np.int64)))

    def assemble(self, device_indices) -> tuple[torch.Tensor, torch.Tensor]:
        """``(X, y)`` for sample indices already on the device (from :meth:`to_device_indices`).

        One kernel launch, asynchronous on the GPU (no sync). Row ``r`` of ``X`` holds ``1/w`` (or the
        matrix's value over ``w``) at the user's items other than the target, ``w`` their count, then the
        three count features; ``y[r]`` is the target item.

        Parameters
        ----------
        device_indices : numpy.ndarray or numba device array
            Sample indices, at most ``max_rows`` of them; a slice of a :meth:`to_device_indices` result
            works too.

        Returns
        -------
        X : torch.Tensor
            ``[n, n_items + 3]`` view of the shared buffer, overwritten by the next call.
        y : torch.Tensor
            ``[n]`` int64 labels, a view likewise.

        Raises
        ------
        ValueError
            More indices than ``max_rows``.
        """
        n = device_indices.shape[0]
        if n > self.max_rows:
            raise ValueError(f"batch of {n} rows exceeds the buffer of {self.max_rows}")
        b = self.buffers
        self.backend.assemble_rows(
            self._indptr, self._indices, self._values, self._users, self._items, device_indices, b.X_kernel, b.y_kernel
        )
        return b.views(n)


class FixedBatches:
    """A fixed random subset of a split, in ``n_batches`` batches: the evaluation set of the seed.

    The subset and its device indices are made once; each iteration reassembles the same batches
    into the (possibly shared) buffers, so a yielded batch is overwritten by the next.

    Parameters
    ----------
    matrix : InteractionMatrix
        The input rows (the training split's matrix).
    samples : Samples
        The split to draw from.
    batch_size : int
        Rows per batch.
    n_batches : int or None
        Batches to keep; ``None`` keeps the whole split (in random order).
    seed : int
        Seeds the subset, on a stream apart from the training epochs'.
    buffers : BatchBuffers, optional
        Buffers to share with the training loader.

    Attributes
    ----------
    n_samples : int
        Samples in the subset.
    """

    _assembler_class = BatchAssembler  # FixedBags swaps in the sparse path's assembler

    def __init__(
        self,
        matrix: InteractionMatrix,
        samples: Samples,
        batch_size: int,
        n_batches: int | None,
        seed: int = 0,
        buffers: BatchBuffers | None = None,
    ) -> None:
        self.assembler = self._assembler_class(matrix, samples, batch_size, buffers)
        order = fixed_subset(len(samples), batch_size, n_batches, seed)
        take = len(order)
        self._batches = [
            self.assembler.to_device_indices(order[s : s + batch_size]) for s in range(0, take, batch_size)
        ]
        self.n_samples = take

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for device_indices in self._batches:
            yield self.assembler.assemble(device_indices)

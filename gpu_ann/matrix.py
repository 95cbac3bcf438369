"""The training matrix as CSR on the backend, validated before any kernel sees it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

INT32_MAX = np.iinfo(np.int32).max


class MalformedMatrix(ValueError):
    """A CSR matrix a kernel must not read: the message names the row and the value at fault."""


def validate_csr(indptr: np.ndarray, indices: np.ndarray, n_rows: int, n_cols: int) -> None:
    """Raise :class:`MalformedMatrix` unless the CSR arrays are safe for the kernels.

    Safe means: ``indptr`` has ``n_rows + 1`` entries, starts at 0, never decreases and ends at
    ``len(indices)``; every index is in ``[0, n_cols)``; indices are strictly increasing within each row
    (sorted, no duplicates: the kernels binary-search the row). Runs on the host, vectorised.

    Parameters
    ----------
    indptr : numpy.ndarray
        Row pointers, ``n_rows + 1`` entries (host array, any integer dtype).
    indices : numpy.ndarray
        Column index of each stored entry (host array, any integer dtype).
    n_rows : int
        Number of rows (users).
    n_cols : int
        Number of columns (items).

    Raises
    ------
    MalformedMatrix
        The first problem found; the message names the row and the value at fault.
    """
    indptr = np.asarray(indptr)
    indices = np.asarray(indices)
    if indptr.ndim != 1 or len(indptr) != n_rows + 1:
        raise MalformedMatrix(f"indptr has {indptr.shape} entries, expected ({n_rows + 1},)")
    if indptr[0] != 0 or indptr[-1] != len(indices):
        raise MalformedMatrix(f"indptr runs from {indptr[0]} to {indptr[-1]}, expected 0 to nnz={len(indices)}")
    steps = np.diff(indptr)
    if (steps < 0).any():
        row = int(np.flatnonzero(steps < 0)[0])
        raise MalformedMatrix(f"indptr decreases at row {row}: {indptr[row]} -> {indptr[row + 1]}")
    if len(indices):
        bad = (indices < 0) | (indices >= n_cols)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            row = int(np.searchsorted(indptr, k, side="right") - 1)
            raise MalformedMatrix(f"row {row} holds column index {indices[k]}, outside [0, {n_cols})")
        # Within a row each index must exceed the previous one; the first of each row is exempt.
        rising = np.diff(indices.astype(np.int64)) > 0
        row_starts = indptr[1:-1]
        rising[row_starts[(row_starts > 0) & (row_starts < len(indices))] - 1] = True
        if not rising.all():
            k = int(np.flatnonzero(~rising)[0]) + 1
            row = int(np.searchsorted(indptr, k, side="right") - 1)
            what = "duplicate" if indices[k] == indices[k - 1] else "unsorted"
            raise MalformedMatrix(f"row {row} has {what} column indices ({indices[k - 1]} then {indices[k]})")


@dataclass
class InteractionMatrix:
    """Users x items CSR on a backend: the structure, and optionally a float32 value per entry.

    Which items a user has is decided by the structure alone. ``values`` is ``None`` in the default
    implicit mode (the kernels write ``1/w``); otherwise the kernels write ``values[k]/w`` (rating and
    residual input modes, see :mod:`gpu_ann.values`). ``indptr`` is int64 (nnz may pass 2**31),
    ``indices`` int32. ``csr`` is the scipy / cupyx matrix over the same arrays for library users; the
    kernels take views made by ``backend.kernel_array``.
    Build it with :meth:`from_pairs`, :meth:`from_scipy` or :meth:`from_csr`, which validate the
    structure; the constructor itself checks nothing.

    Parameters
    ----------
    backend : CpuBackend or CudaBackend
        The backend the arrays live on (see :func:`gpu_ann.get_backend`).
    indptr : numpy.ndarray or cupy.ndarray
        Row pointers, int64, ``n_users + 1`` entries, on the backend.
    indices : numpy.ndarray or cupy.ndarray
        Item index of each stored entry, int32, sorted and unique within each row, on the backend.
    n_users : int
        Number of rows.
    n_items : int
        Number of columns.
    values : numpy.ndarray or cupy.ndarray, optional
        float32 value of each stored entry, finite, on the backend; ``None`` for implicit input.
    """

    backend: Any
    indptr: Any
    indices: Any
    n_users: int
    n_items: int
    values: Any = None

    @classmethod
    def from_pairs(
        cls, backend, users: np.ndarray, items: np.ndarray, n_users: int, n_items: int, values: np.ndarray | None = None
    ):
        """Build from host (user, item) index arrays; duplicate pairs are kept once.

        Parameters
        ----------
        backend : CpuBackend or CudaBackend
            Where the matrix goes.
        users, items : numpy.ndarray
            Row and column index of each interaction (host arrays of equal length).
        n_users, n_items : int
            Shape of the matrix.
        values : numpy.ndarray, optional
            A finite value per pair (kept as float32); the pairs must then be unique, since two values
            for one entry have no single meaning. ``None``: implicit input.

        Returns
        -------
        InteractionMatrix
            The validated matrix, rows sorted, on ``backend``.

        Raises
        ------
        ValueError
            An index is negative or outside the shape (raised by scipy); ``values`` of the wrong length,
            not finite, or given with duplicate pairs.
        MalformedMatrix
            ``n_items`` does not fit int32 column indices.
        """
        data = np.ones(len(users), dtype=np.float32) if values is None else np.asarray(values, dtype=np.float32)
        if len(data) != len(users):
            raise ValueError(f"{len(data)} values for {len(users)} (user, item) pairs")
        host = sp.csr_matrix((data, (np.asarray(users), np.asarray(items))), shape=(n_users, n_items))
        host.sum_duplicates()  # also sorts the indices of each row
        if values is not None and host.nnz != len(users):
            raise ValueError(f"{len(users) - host.nnz} duplicate (user, item) pairs: each pair needs one value")
        return cls.from_scipy(backend, host, values=values is not None)

    @classmethod
    def from_scipy(cls, backend, matrix: sp.spmatrix, values: bool = False):
        """Validate a host CSR matrix and move it to the backend.

        The structure is copied (``indptr`` as int64, ``indices`` as int32; to the device on cuda, a
        blocking host-to-device copy); the values are dropped unless ``values`` is true. Rows are not
        sorted here: unsorted rows are refused.

        Parameters
        ----------
        backend : CpuBackend or CudaBackend
            Where the matrix goes.
        matrix : scipy.sparse.spmatrix
            Any scipy sparse matrix; converted to CSR first.
        values : bool
            Keep the stored values (as float32, which must be finite) for the rating / residual input
            modes; by default the input is implicit.

        Returns
        -------
        InteractionMatrix

        Raises
        ------
        MalformedMatrix
            Too many columns for int32 indices, a structure that fails :func:`validate_csr`, or (with
            ``values``) a value that is not finite.
        """
        matrix = sp.csr_matrix(matrix)
        n_users, n_items = matrix.shape
        if n_items >= INT32_MAX - 3:
            raise MalformedMatrix(f"{n_items} items do not fit int32 column indices")
        validate_csr(matrix.indptr, matrix.indices, n_users, n_items)
        indptr = backend.from_host(matrix.indptr.astype(np.int64))
        indices = backend.from_host(matrix.indices.astype(np.int32))
        data = None
        if values:
            data = np.asarray(matrix.data, dtype=np.float32)
            bad = np.flatnonzero(~np.isfinite(data))
            if len(bad):
                k = int(bad[0])
                row = int(np.searchsorted(matrix.indptr, k, side="right") - 1)
                raise MalformedMatrix(
                    f"row {row}, column {matrix.indices[k]} holds the value {data[k]}: values must be finite"
                )
            data = backend.from_host(data)
        return cls(backend, indptr, indices, n_users, n_items, data)

    @classmethod
    def from_csr(cls, backend, csr: Any, values: bool = False):
        """From a scipy CSR, or a cupyx CSR already on the device (validated through a host copy).

        Parameters
        ----------
        backend : CpuBackend or CudaBackend
            Where the matrix goes.
        csr : scipy.sparse matrix or array, or cupyx.scipy.sparse matrix
            A scipy input goes through :meth:`from_scipy`. A cupyx input (cuda backend only) is
            validated on a device-to-host copy of its structure (syncs) and its index arrays are cast
            on the device (``astype`` makes new arrays: the caller's matrix is not shared).

        Returns
        -------
        InteractionMatrix

        Raises
        ------
        TypeError
            ``csr`` is neither scipy sparse nor, on the cuda backend, a cupyx matrix.
        MalformedMatrix
            The structure fails :func:`validate_csr` (or, for scipy input, has too many columns).
        """
        if isinstance(csr, sp.spmatrix | sp.sparray):
            return cls.from_scipy(backend, csr, values=values)
        if backend.name != "cuda" or not hasattr(csr, "get"):
            raise TypeError(f"expected a scipy CSR matrix, or a cupyx one on the cuda backend; got {type(csr)}")
        csr = csr.tocsr()
        n_users, n_items = csr.shape
        # Device -> host copies of the structure (syncs), once: the kernels must never see a bad index.
        validate_csr(csr.indptr.get(), csr.indices.get(), n_users, n_items)
        xp = backend.xp
        data = None
        if values:
            data = csr.data.astype(xp.float32)
            if not bool(xp.isfinite(data).all()):  # device -> host sync, once
                raise MalformedMatrix("the matrix holds values that are not finite (NaN or infinite)")
        return cls(backend, csr.indptr.astype(xp.int64), csr.indices.astype(xp.int32), n_users, n_items, data)

    @property
    def nnz(self) -> int:
        """Number of stored (user, item) entries; read from the array's shape, no device sync."""
        return int(self.indices.shape[0])

    @property
    def csr(self):
        """The matrix as scipy / cupyx CSR, for library users; the kernels never use it.

        Built on each access over this matrix's index arrays (scipy / cupyx may cast them, which copies),
        with :attr:`values` as its data, or a new float32 array of ones for implicit input.

        Raises
        ------
        OverflowError
            On the cuda backend, more than ``2**31 - 1`` entries (cupyx CSR has int32 ``indptr``).
        """
        if self.backend.name == "cuda" and self.nnz > INT32_MAX:
            # CuPy <= 14.2 casts indptr to int32, which goes negative past 2**31 entries (cupy#9490).
            raise OverflowError(f"{self.nnz:,} stored entries: too many for a cupyx CSR (int32 indptr)")
        data = self.values if self.values is not None else self.backend.xp.ones(self.nnz, dtype=self.backend.xp.float32)
        return self.backend.sparse.csr_matrix((data, self.indices, self.indptr), shape=(self.n_users, self.n_items))

    def row(self, user: int) -> np.ndarray:
        """The item indices of one user, on the host.

        Parameters
        ----------
        user : int
            Row index.

        Returns
        -------
        numpy.ndarray
            The user's item indices, int32, ascending. On the cpu backend a view of :attr:`indices`
            (do not modify it); on cuda a host copy, at the cost of two device-to-host syncs.
        """
        lo, hi = (int(v) for v in self.backend.to_host(self.indptr[user : user + 2]))
        return self.backend.to_host(self.indices[lo:hi])

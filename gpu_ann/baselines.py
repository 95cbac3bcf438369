"""Non-neural baselines the candidate generator is compared with: popularity, biases, EASE.

Each is fitted on training interactions given as index arrays plus a backend (see
:func:`gpu_ann.get_backend`) and scores users for :func:`gpu_ann.ranking.evaluate_scores` through
``score_batch(users) -> torch.Tensor [len(users), n_items]`` on ``backend.torch_device``.

The array code is written once against ``backend.xp`` (numpy on the cpu backend, cupy on cuda), so
both backends run the same lines; scores reach torch through DLPack without a copy.

- :class:`Popularity`: log of add-one smoothed training counts, the same for every user.
- :class:`Biases`: rating ~ mu + b_user + b_item, L2-regularised, alternating closed-form sweeps.
- :class:`EASE`: Steck (2019) item-item closed form, ``B = -P / diag(P)`` with ``P = (XᵀX + λI)⁻¹``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

GiB = 1024**3
INT32_MAX = 2**31 - 1


def _host_pairs(backend, users, items, n_users: int, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Validated host copies of the (user, item) index arrays (no copy for numpy input on the cpu backend)."""
    users = np.asarray(backend.to_host(users))
    items = np.asarray(backend.to_host(items))
    if users.ndim != 1 or users.shape != items.shape:
        raise ValueError(f"users and items must be 1-D arrays of equal length, got shapes {users.shape}, {items.shape}")
    if len(users) == 0:
        raise ValueError("no training interactions: cannot fit a baseline on an empty split")
    for name, idx, bound in (("user", users, n_users), ("item", items, n_items)):
        if not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"{name} indices must be integers, got dtype {idx.dtype}")
        # Checked here, on the host, because an out-of-range index would otherwise be a silent wrong
        # bincount length on the cpu and an out-of-bounds read on the device.
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= bound:
            raise ValueError(f"{name} index out of range: saw {lo}..{hi}, expected 0..{bound - 1}")
    return users, items


def _to_torch(array: Any) -> torch.Tensor:
    """A torch tensor over a numpy / cupy array's memory (zero copy; DLPack orders the streams on cuda)."""
    return torch.from_dlpack(array)


class _Fitted:
    """Shared bookkeeping: the backend and shape a model was fitted with."""

    backend: Any = None
    n_users: int = 0
    n_items: int = 0

    def _check_fitted(self) -> None:
        if self.backend is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit() first")


class Popularity(_Fitted):
    """Item popularity: every user gets the log of the add-one smoothed training counts.

    Same values as :func:`gpu_ann.metrics.popularity_log_probs`, computed on the backend:
    ``log((count_i + 1) / Σ_j (count_j + 1))``. The smoothing keeps unseen items finite.

    Attributes
    ----------
    log_probs : numpy.ndarray or cupy.ndarray
        float64 ``[n_items]`` natural-log probabilities, on the backend (after :meth:`fit`).
    """

    def __init__(self) -> None:
        self.log_probs = None
        self._row: torch.Tensor | None = None

    def fit(self, users, items, n_users: int, n_items: int, backend) -> Popularity:
        """Count the training interactions of each item.

        Parameters
        ----------
        users, items : numpy.ndarray
            User and item index of each training interaction (equal length, integers). Users are
            only range-checked: popularity does not depend on them.
        n_users, n_items : int
            Matrix shape.
        backend : CpuBackend or CudaBackend
            Where the counts and scores live.

        Returns
        -------
        Popularity
            ``self``.

        Raises
        ------
        ValueError
            Empty, mismatched or out-of-range index arrays.
        """
        _, items = _host_pairs(backend, users, items, n_users, n_items)
        xp = backend.xp
        counts = xp.bincount(backend.from_host(items), minlength=n_items).astype(xp.float64) + 1.0
        self.log_probs = xp.log(counts / counts.sum())
        self.backend, self.n_users, self.n_items = backend, n_users, n_items
        # One tensor over log_probs' memory (the attribute keeps the buffer alive); every batch is a view.
        self._row = _to_torch(self.log_probs)
        return self

    def score_batch(self, users) -> torch.Tensor:
        """The popularity log-probabilities, one identical row per user.

        Parameters
        ----------
        users : numpy.ndarray
            User indices; only their number matters.

        Returns
        -------
        torch.Tensor
            float64 ``[len(users), n_items]`` on ``backend.torch_device``: a broadcast view of one row
            (no copy, read-only: in-place writes raise). ``.clone()`` it before modifying.
        """
        self._check_fitted()
        return self._row.unsqueeze(0).expand(len(users), -1)


class Biases(_Fitted):
    """Baseline rating predictor ``r̂(u, i) = μ + b_u + b_i`` (Koren 2010), fitted by alternating sweeps.

    Minimises ``Σ (r - μ - b_u - b_i)² + reg_user Σ_u b_u² + reg_item Σ_i b_i²`` over the biases, with
    ``μ`` fixed to the global mean rating. Each sweep solves exactly for all item biases given the
    user biases, then for all user biases given the item biases (block coordinate descent on a
    strictly convex quadratic, so the sweeps converge to its unique minimiser)::

        b_i = Σ_{u ∈ R(i)} (r - μ - b_u) / (reg_item + n_i)
        b_u = Σ_{i ∈ R(u)} (r - μ - b_i) / (reg_user + n_u)

    The sums are weighted bincounts: no Python loop over users or items.

    Parameters
    ----------
    reg_user : float
        L2 penalty on user biases (>= 0). Default 10, and ``reg_item`` 25: the values of Koren,
        "Factor in the Neighbors" (TKDD 2010) on Netflix ratings; a user or item with few ratings is
        shrunk towards 0. Tune them per dataset.
    reg_item : float
        L2 penalty on item biases (>= 0). Default 25.
    n_sweeps : int
        Maximum number of sweeps (default 10: enough for ranking use; the exact minimiser may need more).
    tol : float
        Stop early once no bias moved by more than ``tol`` (rating units) in a sweep. Checking costs one
        host-device sync per sweep on cuda.

    Attributes
    ----------
    global_mean : float
        μ, the mean training rating.
    user_bias, item_bias : numpy.ndarray or cupy.ndarray
        float64 ``[n_users]`` / ``[n_items]``, on the backend. 0 for users / items without ratings.
    sweeps : int
        Sweeps run by the last :meth:`fit`.
    converged : bool
        Whether the last :meth:`fit` stopped on ``tol`` rather than on ``n_sweeps``.
    """

    def __init__(self, reg_user: float = 10.0, reg_item: float = 25.0, n_sweeps: int = 10, tol: float = 1e-6) -> None:
        if reg_user < 0 or reg_item < 0:
            raise ValueError(f"regularisation must be >= 0, got reg_user={reg_user}, reg_item={reg_item}")
        if n_sweeps < 1:
            raise ValueError(f"n_sweeps must be >= 1, got {n_sweeps}")
        self.reg_user, self.reg_item, self.n_sweeps, self.tol = float(reg_user), float(reg_item), int(n_sweeps), tol
        self.global_mean = float("nan")
        self.user_bias = self.item_bias = None
        self.sweeps, self.converged = 0, False

    def fit(self, users, items, ratings, n_users: int, n_items: int, backend) -> Biases:
        """Fit μ, the user and the item biases on explicit ratings.

        Parameters
        ----------
        users, items : numpy.ndarray
            User and item index of each training rating (equal length, integers).
        ratings : numpy.ndarray
            The rating of each pair (float). None (implicit data) is refused.
        n_users, n_items : int
            Matrix shape.
        backend : CpuBackend or CudaBackend
            Where the biases live.

        Returns
        -------
        Biases
            ``self``.

        Raises
        ------
        ValueError
            ``ratings`` is None, or the arrays are empty, mismatched, out of range or not finite.
        """
        if ratings is None:
            raise ValueError(
                "Biases needs explicit ratings, but ratings is None (implicit data): use Popularity or EASE instead"
            )
        users, items = _host_pairs(backend, users, items, n_users, n_items)
        ratings = np.asarray(backend.to_host(ratings), dtype=np.float64)
        if ratings.shape != users.shape:
            raise ValueError(f"ratings has shape {ratings.shape}, expected {users.shape} (one per pair)")
        if not np.isfinite(ratings).all():
            raise ValueError("ratings contain NaN or infinite values")
        xp = backend.xp
        u, i = backend.from_host(users), backend.from_host(items)
        # float64 throughout: sums over hundreds of thousands of ratings, and the arrays are tiny.
        r = backend.from_host(ratings)
        self.global_mean = float(r.mean())
        centred = r - self.global_mean
        # Where a user / item has no ratings its sum is 0 too, so any positive denominator gives the right
        # bias (0); max(., 1) avoids 0/0 when its reg is 0, and changes nothing where n >= 1.
        den_u = xp.maximum(xp.bincount(u, minlength=n_users) + self.reg_user, 1.0)
        den_i = xp.maximum(xp.bincount(i, minlength=n_items) + self.reg_item, 1.0)
        b_u = xp.zeros(n_users, dtype=xp.float64)
        b_i = xp.zeros(n_items, dtype=xp.float64)
        self.converged = False
        for sweep in range(1, self.n_sweeps + 1):
            new_i = xp.bincount(i, weights=centred - b_u[u], minlength=n_items) / den_i
            new_u = xp.bincount(u, weights=centred - new_i[i], minlength=n_users) / den_u
            change = float(xp.maximum(xp.abs(new_i - b_i).max(), xp.abs(new_u - b_u).max()))  # one sync
            b_i, b_u = new_i, new_u
            self.sweeps = sweep
            if change <= self.tol:
                self.converged = True
                break
        self.user_bias, self.item_bias = b_u, b_i
        self.backend, self.n_users, self.n_items = backend, n_users, n_items
        return self

    def predict(self, users, items):
        """Predicted ratings ``μ + b_u + b_i`` of (user, item) pairs.

        Parameters
        ----------
        users, items : array_like
            Index arrays of equal length (host or backend arrays).

        Returns
        -------
        numpy.ndarray or cupy.ndarray
            float64 predictions, on the backend.
        """
        self._check_fitted()
        xp = self.backend.xp
        return self.global_mean + self.user_bias[xp.asarray(users)] + self.item_bias[xp.asarray(items)]

    def residuals(self, users, items, ratings):
        """``ratings - predict(users, items)``: the residual values fed to the candidate generator.

        Parameters
        ----------
        users, items : array_like
            Index arrays of equal length.
        ratings : array_like
            The observed ratings of those pairs.

        Returns
        -------
        numpy.ndarray or cupy.ndarray
            float32 residuals, on the backend (float32: the dtype of :attr:`RatingsTable.rating` and of
            the network's inputs; the rounding is far below any rating's resolution).

        Raises
        ------
        ValueError
            ``ratings`` is None.
        """
        if ratings is None:
            raise ValueError("residuals need explicit ratings, but ratings is None (implicit data)")
        self._check_fitted()
        xp = self.backend.xp
        return (xp.asarray(ratings, dtype=xp.float64) - self.predict(users, items)).astype(xp.float32)

    def score_batch(self, users) -> torch.Tensor:
        """Predicted ratings of every item for each user, for ranking.

        Parameters
        ----------
        users : numpy.ndarray
            User indices.

        Returns
        -------
        torch.Tensor
            float64 ``[len(users), n_items]``, ``μ + b_u + b_i``, on ``backend.torch_device`` (no copy:
            a tensor over a new backend array). Within one user the ranking is that of ``b_i``.
        """
        self._check_fitted()
        xp = self.backend.xp
        b_u = self.user_bias[xp.asarray(users)]
        return _to_torch(self.global_mean + b_u[:, None] + self.item_bias[None, :])


class EASE(_Fitted):
    """EASE^R (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019), closed form.

    With ``X`` the binary users x items training matrix::

        G = XᵀX + λI,   P = G⁻¹,   B_ij = -P_ij / P_jj,   B_jj = 0,   scores(u) = X_u B

    (the zero diagonal stops an item from recommending itself).

    Parameters
    ----------
    lambda_ : float
        L2 penalty λ (> 0). Default 500, a common starting value (Steck used a few hundred on
        MovieLens-20M / Netflix / MSD); tune it per dataset, larger for denser data.
    max_bytes : int
        Refuse to fit when the dense item-item matrices would need more (default 8 GiB). On cuda the
        device's free memory (plus CuPy's pool's free blocks) is a second limit.
    dtype : {None, "float32", "float64"}
        Precision of ``G``, ``P`` and ``B``. None (default): float64 on the cpu backend when
        ``n_items <= FLOAT64_MAX_ITEMS`` (exact, and cheap at that size), else float32 (half the memory,
        and GPUs are slow at float64). float32 is enough because ``G``'s eigenvalues lie in
        ``[λ, ‖X‖² + λ]``: λ keeps it well conditioned.

    Attributes
    ----------
    weights : numpy.ndarray or cupy.ndarray
        ``B``, ``[n_items, n_items]``, on the backend (after :meth:`fit`).
    """

    #: Largest catalogue the cpu backend inverts in float64 when ``dtype`` is None (4 * 3000² * 8 B ≈ 290 MB).
    FLOAT64_MAX_ITEMS = 3000

    def __init__(self, lambda_: float = 500.0, max_bytes: int = 8 * GiB, dtype: str | None = None) -> None:
        if not lambda_ > 0:
            raise ValueError(f"lambda_ must be > 0 (G = XᵀX + λI must be invertible), got {lambda_}")
        if dtype not in (None, "float32", "float64"):
            raise ValueError(f"dtype must be None, 'float32' or 'float64', got {dtype!r}")
        self.lambda_, self.max_bytes, self.dtype = float(lambda_), int(max_bytes), dtype
        self.weights = None
        self._indptr = self._indices = None  # host CSR structure of X, for score_batch

    @staticmethod
    def memory_estimate(n_items: int, dtype="float32") -> int:
        """Peak bytes of the dense part of :meth:`fit`: four ``n_items x n_items`` matrices.

        ``G`` and ``P`` (``B`` is written over ``P``), plus the inversion's workspace: numpy's ``inv``
        copies ``G`` and makes an identity to solve against (cupy's similar); the sparse ``XᵀX`` held
        while ``G`` is densified is at most about two dense float32 matrices.

        Parameters
        ----------
        n_items : int
            Catalogue size.
        dtype : str or numpy.dtype
            Precision of the dense matrices.

        Returns
        -------
        int
            Estimated bytes.
        """
        return 4 * int(n_items) ** 2 * np.dtype(dtype).itemsize

    def _dtype(self, backend, n_items: int) -> np.dtype:
        if self.dtype is not None:
            return np.dtype(self.dtype)
        small_cpu = backend.name == "cpu" and n_items <= self.FLOAT64_MAX_ITEMS
        return np.dtype(np.float64 if small_cpu else np.float32)

    def _check_memory(self, backend, n_items: int, dtype: np.dtype) -> None:
        need = self.memory_estimate(n_items, dtype)
        limit, limits = self.max_bytes, [f"max_bytes={self.max_bytes:,}"]
        if backend.name == "cuda":
            # Free device memory, plus blocks CuPy's pool holds free (the driver counts those as used).
            free = backend.xp.cuda.runtime.memGetInfo()[0] + backend.xp.get_default_memory_pool().free_bytes()
            limits.append(f"free device memory {free:,}")
            limit = min(limit, free)
        if need > limit:
            raise ValueError(
                f"EASE on {n_items:,} items needs about {need:,} bytes ({need / GiB:.2f} GiB: four dense "
                f"{n_items:,} x {n_items:,} {dtype.name} matrices), over the limit of {limit:,} bytes "
                f"({', '.join(limits)}); keep fewer items (e.g. the most popular) or raise max_bytes"
            )

    def fit(self, users, items, n_users: int, n_items: int, backend) -> EASE:
        """Compute ``B`` from the binary training matrix.

        The memory guard runs before any dense allocation.

        Parameters
        ----------
        users, items : numpy.ndarray
            User and item index of each training interaction (equal length, integers); a pair given
            more than once counts once (``X`` is binary).
        n_users, n_items : int
            Matrix shape.
        backend : CpuBackend or CudaBackend
            Where ``G``, ``P``, ``B`` and the scores live.

        Returns
        -------
        EASE
            ``self``.

        Raises
        ------
        ValueError
            The dense matrices would exceed ``max_bytes`` (or the free device memory); or empty,
            mismatched or out-of-range index arrays.
        """
        users, items = _host_pairs(backend, users, items, n_users, n_items)
        dtype = self._dtype(backend, n_items)
        self._check_memory(backend, n_items, dtype)
        xp = backend.xp
        # Binary X, built on the host: summing duplicates then setting every value to 1 counts a pair once.
        host = sp.csr_matrix((np.ones(len(users), dtype=dtype), (users, items)), shape=(n_users, n_items))
        host.sum_duplicates()
        host.data[:] = 1
        if backend.name == "cuda" and host.nnz > INT32_MAX:
            raise ValueError(f"{host.nnz:,} interactions: too many for a cupyx CSR (int32 indptr)")
        self._indptr, self._indices = host.indptr, host.indices
        X = backend.sparse.csr_matrix(
            (backend.from_host(host.data), backend.from_host(host.indices), backend.from_host(host.indptr)),
            shape=(n_users, n_items),
        )
        # Gram matrix from the sparse product (co-occurrence counts, exact in float32 up to 2**24 users).
        G = (X.T @ X).toarray()
        del X
        diag = xp.arange(n_items)
        G[diag, diag] += self.lambda_
        P = xp.linalg.inv(G)
        del G
        P /= -xp.diag(P)  # B_ij = -P_ij / P_jj: column j divided by -P_jj (the divisor is a new array)
        xp.fill_diagonal(P, 0)
        self.weights = P
        self.backend, self.n_users, self.n_items = backend, n_users, n_items
        return self

    def score_batch(self, users) -> torch.Tensor:
        """``X_u B`` for each user: the users' dense training rows times ``B``.

        Parameters
        ----------
        users : numpy.ndarray
            User indices (training rows of the fitted matrix).

        Returns
        -------
        torch.Tensor
            ``[len(users), n_items]`` in ``B``'s dtype, on ``backend.torch_device`` (no copy: a tensor over
            a new backend array).
        """
        self._check_fitted()
        xp = self.backend.xp
        users = np.asarray(users, dtype=np.int64)
        # Row/column coordinates of the users' entries, gathered on the host (the structure is there),
        # then one scatter into a dense block on the backend and one matrix product (GEMM).
        starts, ends = self._indptr[users], self._indptr[users + 1]
        lengths = ends - starts
        rows = np.repeat(np.arange(len(users)), lengths)
        within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        cols = self._indices[np.repeat(starts, lengths) + within]
        dense = xp.zeros((len(users), self.n_items), dtype=self.weights.dtype)
        dense[self.backend.from_host(rows), self.backend.from_host(cols)] = 1
        return _to_torch(dense @ self.weights)

"""The public batch loader: device-built ``(X, y)`` batches for anyone's torch training loop."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate_fn_map

from gpu_ann.backend import get_backend
from gpu_ann.bags import PATHS, BagAssembler, BagBuffers, Bags
from gpu_ann.batching import BatchAssembler
from gpu_ann.data.table import RatingsTable
from gpu_ann.handoff import BatchBuffers
from gpu_ann.matrix import InteractionMatrix
from gpu_ann.splits import SPLIT_NAMES, Samples, random_split


class Batch:
    """One batch: ``X [B, n_items + 3]`` inputs and ``y [B]`` item labels; unpacks as ``X, y``.

    Both are views of the loader's reused buffers: the next batch overwrites them.

    Parameters
    ----------
    X : torch.Tensor
        Inputs, float32 or bfloat16, on the loader's device.
    y : torch.Tensor
        Labels (item indices), int64.
    """

    __slots__ = ("X", "y")

    def __init__(self, X: torch.Tensor, y: torch.Tensor) -> None:
        self.X = X
        self.y = y

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield self.X
        yield self.y

    def __repr__(self) -> str:
        return f"Batch(X={tuple(self.X.shape)} {self.X.dtype} on {self.X.device}, y={tuple(self.y.shape)})"


def _refuse_collation(batch, *, collate_fn_map=None):
    raise TypeError(
        "gpu_ann BatchLoader yields whole batches that share one buffer; collating several would stack "
        "copies of the last one. Use DataLoader(loader, batch_size=None)."
    )


# torch's default collate looks types up here: a DataLoader with a batch_size would otherwise stack
# several of our batches, which are views of the same buffer, into a silently wrong batch.
default_collate_fn_map[Batch] = _refuse_collation


class BatchLoader(IterableDataset):
    """Epochs of training batches built on the backend's device, with no copies and no per-step allocation.

    Parameters
    ----------
    matrix : InteractionMatrix
        The users x items matrix whose rows are the inputs (the training split).
    samples : Samples
        The (user, item) pairs to iterate: each is one example, its item the label and removed from the input.
    batch_size : int
        Rows per batch; the buffers are allocated once at this size.
    shuffle : bool
        Shuffle each epoch (without replacement). ``False`` keeps sample order.
    replacement : bool
        Draw each epoch's samples with replacement instead (the original notebook's sampling).
    drop_last : bool
        Drop the last, smaller batch of an epoch.
    seed : int
        Seed of the epoch orders: epoch ``e`` uses ``numpy.random.default_rng([seed, e])`` on every backend.
    dtype : torch.dtype
        ``torch.float32`` or ``torch.bfloat16`` inputs (dense path).
    buffers : BatchBuffers or gpu_ann.bags.BagBuffers, optional
        Buffers to share with another loader or evaluation set used in turn.
    path : {"dense", "sparse"}
        ``"dense"`` yields :class:`Batch` rows ``[B, n_items + 3]``; ``"sparse"`` yields
        :class:`gpu_ann.bags.Bags` (the row's items as ``EmbeddingBag`` inputs, for
        ``CandidateGenerator.forward_bags``), whose memory does not grow with the catalogue.
    rank, world_size : int
        Data-parallel share: every rank draws the same epoch order (seeded by ``[seed, epoch]``), padded by
        repeating its first samples to a multiple of ``world_size``, and takes every ``world_size``-th sample
        from position ``rank``. All ranks then have the same number of batches (no rank waits for another at
        an epoch's end), and the ``world_size`` batches of one step together hold the samples of one batch
        of ``batch_size * world_size`` in a single-process run.
    epoch_samples : int, optional
        Samples per epoch (at least ``len(samples)``), padded by repeating the start of the epoch's order:
        under ``--shard-users`` each rank holds its own samples, and all draw the largest rank's count so
        that they take the same number of steps. Only with ``world_size=1``.

    Notes
    -----
    Iterating yields :class:`Batch` objects that unpack as ``X, y``; both are views of the loader's
    buffers and are overwritten by the next batch, so finish a step (forward and backward) before
    asking for the next one. Iteration runs epoch ``self.epoch`` and then advances it; call
    :meth:`set_epoch` to choose one (as with ``DistributedSampler``). Use it directly or as
    ``DataLoader(loader, batch_size=None)`` with ``num_workers=0``; the batches are built on the device
    by the loader itself, so worker processes have nothing to do. The loader is a context manager:
    :meth:`close` releases its device memory.
    """

    def __init__(
        self,
        matrix: InteractionMatrix,
        samples: Samples,
        batch_size: int = 1024,
        *,
        shuffle: bool = True,
        replacement: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        buffers: BatchBuffers | BagBuffers | None = None,
        path: str = "dense",
        rank: int = 0,
        world_size: int = 1,
        epoch_samples: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        self.matrix = matrix
        self.path = path
        if path == "dense":
            self.assembler = BatchAssembler(matrix, samples, batch_size, buffers, dtype=dtype)
        elif path == "sparse":
            self.assembler = BagAssembler(matrix, samples, batch_size, buffers)
        else:
            raise ValueError(f"unknown input path {path!r}: expected one of {PATHS}")
        self.batch_size = batch_size
        self.n_samples = len(samples)
        self.rank, self.world_size = rank, world_size
        # This rank's share of an epoch: every rank gets the same count, padded up (see the class docstring).
        self.n_local = -(-self.n_samples // world_size)
        if epoch_samples is not None:
            if world_size != 1 or epoch_samples < self.n_samples:
                raise ValueError(
                    f"epoch_samples needs world_size=1 and at least the {self.n_samples} samples, got "
                    f"{epoch_samples} with world_size={world_size}"
                )
            self.n_local = epoch_samples
        self.shuffle = shuffle
        self.replacement = replacement
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = 0
        self.start_batch = 0  # where the next iteration starts within its epoch (resuming a run)

    @classmethod
    def from_csr(
        cls,
        csr: Any,
        users: np.ndarray,
        items: np.ndarray,
        batch_size: int = 1024,
        *,
        backend: str = "auto",
        device: int | None = None,
        **options: Any,
    ) -> BatchLoader:
        """A loader over an existing CSR matrix (scipy, or cupyx on the cuda backend) and sample arrays.

        Parameters
        ----------
        csr : scipy.sparse CSR or cupyx.scipy.sparse CSR
            Users x items; only its structure is read, and it is validated before use.
        users, items : array_like of int
            ``users[k], items[k]`` is sample ``k``.
        batch_size : int
            Rows per batch.
        backend : {"auto", "cpu", "cuda"}
            Where batches are built.
        device : int, optional
            CUDA device index.
        **options
            The constructor's keyword options (``shuffle``, ``seed``, ``dtype``, ...).

        Raises
        ------
        MalformedMatrix
            The CSR has unsorted, duplicate or out-of-range indices or a bad ``indptr``.
        """
        matrix = InteractionMatrix.from_csr(get_backend(backend, device=device), csr)
        return cls(matrix, Samples(np.asarray(users, np.int32), np.asarray(items, np.int32)), batch_size, **options)

    @classmethod
    def from_ratings(
        cls,
        table: RatingsTable,
        batch_size: int = 1024,
        *,
        split: str = "train",
        fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
        backend: str = "auto",
        device: int | None = None,
        **options: Any,
    ) -> BatchLoader:
        """A loader over one split of a ratings table, with the training split as the input matrix.

        Parameters
        ----------
        table : RatingsTable
            The interactions.
        batch_size : int
            Rows per batch.
        split : {"train", "validation", "test"}
            Which split's samples to iterate.
        fractions : tuple of float
            Train, validation and test fractions of the seeded random split (``options["seed"]``,
            default 0, seeds it too).
        backend : {"auto", "cpu", "cuda"}
            Where batches are built.
        device : int, optional
            CUDA device index.
        **options
            The constructor's keyword options.
        """
        if split not in SPLIT_NAMES:
            raise ValueError(f"unknown split {split!r}: expected one of {SPLIT_NAMES}")
        splits, _ = random_split(table, fractions, options.get("seed", 0))
        train = splits.inputs
        matrix = InteractionMatrix.from_pairs(
            get_backend(backend, device=device), train.user, train.item, table.n_users, table.n_items
        )
        return cls(matrix, splits[split], batch_size, **options)

    @property
    def n_items(self) -> int:
        """Items in the catalogue: the number of classes of ``y``."""
        return self.matrix.n_items

    @property
    def n_features(self) -> int:
        """Width of ``X``: one column per item plus the three count features."""
        return self.matrix.n_items + 3

    @property
    def device(self) -> torch.device:
        return self.matrix.backend.torch_device

    @property
    def buffers(self) -> BatchBuffers | BagBuffers:
        return self._live().buffers

    def __len__(self) -> int:
        n, b = self.n_local, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch the next iteration runs.

        Parameters
        ----------
        epoch : int
            Its order is seeded by ``[seed, epoch]``, so every rank of a distributed run agrees on it.
        start_batch : int
            Skip the epoch's first batches (resuming mid-epoch): the order is the same, so the batches
            that follow are the ones an uninterrupted run would see.
        """
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}], got {start_batch}")
        self.epoch = epoch
        self.start_batch = start_batch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's sample indices for one epoch, in order, on the host.

        Parameters
        ----------
        epoch : int
            The epoch whose order to draw.
        """
        n = self.n_samples
        rng = np.random.default_rng([self.seed, epoch])
        if self.replacement:
            order = rng.integers(0, n, size=n, dtype=np.int64)
        elif self.shuffle:
            order = rng.permutation(n).astype(np.int64)
        else:
            order = np.arange(n, dtype=np.int64)
        if self.world_size == 1:
            return order if self.n_local == n else np.resize(order, self.n_local)  # repeats the start to fill
        padded = np.resize(order, self.n_local * self.world_size)  # repeats from the start to fill
        return padded[self.rank :: self.world_size]

    def _live(self) -> BatchAssembler | BagAssembler:
        if self.assembler is None:
            raise RuntimeError("this BatchLoader is closed")
        return self.assembler

    def __iter__(self) -> Iterator[Batch | Bags]:
        assembler = self._live()
        if get_worker_info() is not None:
            raise RuntimeError("gpu_ann BatchLoader builds batches on the device itself: use num_workers=0")
        order = assembler.to_device_indices(self.epoch_order(self.epoch))  # one host-device copy per epoch
        first, self.start_batch = self.start_batch * self.batch_size, 0
        for start in range(first, len(self) * self.batch_size, self.batch_size):
            batch = assembler.assemble(order[start : start + self.batch_size])
            yield batch if self.path == "sparse" else Batch(*batch)
        self.epoch += 1

    def close(self) -> None:
        """Drop the buffers and device arrays; on the GPU hand cached blocks back to the driver."""
        if self.assembler is None:
            return
        self.assembler = None
        self.matrix = _Released(self.matrix)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            try:
                import cupy

                cupy.get_default_memory_pool().free_all_blocks()
            except Exception as exc:  # the loader is closed either way
                warnings.warn(f"could not release CuPy's cached blocks: {exc}", stacklevel=2)

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.assembler is None else f"{len(self)} batches/epoch"
        return f"BatchLoader({self.n_samples} samples, batch_size={self.batch_size}, {state})"


class _Released:
    """What a closed loader keeps of its matrix: the sizes, not the arrays."""

    def __init__(self, matrix: InteractionMatrix) -> None:
        self.n_users, self.n_items, self.backend = matrix.n_users, matrix.n_items, matrix.backend

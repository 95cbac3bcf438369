"""The sparse path: ``EmbeddingBag`` inputs built on the backend, and what each path costs per step.

A dense batch is ``B x (n_items + 3)`` however few items the users have; the sparse path hands the model
the users' items themselves (target removed) as bags with per-sample weights ``v_k / w``, plus the three
count features, so that ``CandidateGenerator.forward_bags`` computes what ``forward`` computes on the dense
rows (see ``gpu_ann.kernels.bag_inputs``).

The batch's total bag length decides the shape of the tensors torch gets, and asking the device for it
would stall the host every step. The assembler instead keeps each sample's bag length on the host (one
device pass and one copy when it is built), so the host knows every batch's total from its sample indices
and the kernels only fill buffers whose size it already knows. torch owns the buffers (one allocator for
batch memory, as in ``gpu_ann.handoff``); they are allocated once, at a capacity that fits any batch
(``max_rows`` times the longest row of the matrix), and reused.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch

from gpu_ann.batching import FixedBatches, check_samples
from gpu_ann.kernels.bag_inputs import bag_inputs, bag_lengths
from gpu_ann.matrix import InteractionMatrix
from gpu_ann.model import N_FEATURES
from gpu_ann.path_cost import (  # noqa: F401  (the cost model, re-exported where it was first defined)
    PATHS,
    StepBytes,
    _row_statistics,
    bytes_per_step,
    choose_path,
    row_statistics,
    step_bytes,
)
from gpu_ann.splits import Samples


class Bags(NamedTuple):
    """One sparse batch, unpacking as ``indices, offsets, weights, features, labels``.

    All are views of reused buffers, overwritten by the next batch. The first four are the arguments of
    ``CandidateGenerator.forward_bags``.

    Parameters
    ----------
    indices, weights : torch.Tensor
        ``[total]`` int64 item indices of all bags, bag after bag, and their float32 weights ``v_k / w``.
    offsets : torch.Tensor
        ``[B + 1]`` int64: bag ``r`` is ``indices[offsets[r]:offsets[r + 1]]``, and ``offsets[B] == total``
        (torch's ``include_last_offset=True``).
    features : torch.Tensor
        ``[B, 3]`` float32 count features.
    labels : torch.Tensor
        ``[B]`` int64 target items.
    """

    indices: torch.Tensor
    offsets: torch.Tensor
    weights: torch.Tensor
    features: torch.Tensor
    labels: torch.Tensor


class BagBuffers:
    """The sparse batch buffers on the backend's device, allocated once by torch, with kernel views of each.

    Parameters
    ----------
    backend : CpuBackend or CudaBackend
        Gives the torch device and makes the kernel views.
    max_rows : int
        The largest batch (number of bags) the buffers hold.
    capacity : int
        The largest total bag length they hold.
    """

    def __init__(self, backend, max_rows: int, capacity: int) -> None:
        device = backend.torch_device
        self.max_rows = max_rows
        self.capacity = capacity
        # Zeros, not empty: no kernel runs for a batch of 0 rows, whose offsets must still read [0].
        self.offsets = torch.zeros(max_rows + 1, dtype=torch.int64, device=device)
        # int64 like the offsets: torch promotes mixed index types, which would copy the indices every step.
        self.indices = torch.empty(capacity, dtype=torch.int64, device=device)
        self.weights = torch.empty(capacity, dtype=torch.float32, device=device)
        self.features = torch.empty((max_rows, N_FEATURES), dtype=torch.float32, device=device)
        self.labels = torch.empty(max_rows, dtype=torch.int64, device=device)
        # Made once: the kernels write through these, torch reads the tensors above, same memory.
        self.kernel_views = tuple(
            backend.view_of_tensor(t) for t in (self.offsets, self.indices, self.weights, self.features, self.labels)
        )

    def views(self, n_rows: int, total: int) -> Bags:
        """The first ``n_rows`` bags, holding ``total`` entries, as views of the buffers.

        Parameters
        ----------
        n_rows, total : int
            Bags in the batch and their total length.

        Returns
        -------
        Bags
        """
        return Bags(
            self.indices[:total],
            self.offsets[: n_rows + 1],
            self.weights[:total],
            self.features[:n_rows],
            self.labels[:n_rows],
        )


class BagOrder:
    """Sample indices on the device, with the running total of their bag lengths on the host.

    Made by :meth:`BagAssembler.to_device_indices`; slice it (``order[a:b]``) into batches.

    Parameters
    ----------
    device : numpy.ndarray or numba device array
        int64 kernel view of the sample indices.
    cumulative : numpy.ndarray
        int64, one longer: ``cumulative[i + 1] - cumulative[i]`` is sample ``i``'s bag length.
    owner : BagAssembler
        The assembler whose samples these index, the only one that may assemble them.
    """

    __slots__ = ("device", "cumulative", "owner")

    def __init__(self, device, cumulative: np.ndarray, owner: BagAssembler) -> None:
        self.device = device
        self.cumulative = cumulative
        self.owner = owner

    @property
    def shape(self) -> tuple[int]:
        """``(n,)``, as for an array of indices."""
        return (len(self.cumulative) - 1,)

    @property
    def total(self) -> int:
        """The total bag length of these samples, known on the host."""
        return int(self.cumulative[-1] - self.cumulative[0])

    def __len__(self) -> int:
        return len(self.cumulative) - 1

    def __getitem__(self, key: slice) -> BagOrder:
        if not isinstance(key, slice):
            raise TypeError(f"a BagOrder is sliced into batches (order[a:b]), not indexed by {key!r}")
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError(f"batches are contiguous slices: step {step} is not supported")
        stop = max(start, stop)
        return BagOrder(self.device[start:stop], self.cumulative[start : stop + 1], self.owner)


def _torch_stream(device: torch.device):
    """Torch's current CUDA stream on ``device`` (its raw handle)."""
    return torch.cuda.current_stream(device).cuda_stream


def _launchers(backend):
    """``(bag_inputs, bag_lengths)`` for the backend, chosen once; on CUDA they launch on torch's current stream."""
    if backend.name == "cpu":
        return functools.partial(bag_inputs, target="cpu"), functools.partial(bag_lengths, target="cpu")
    from numba import cuda

    streams: dict[int, object] = {}

    def on_torch_stream(launch):
        def run(*args):
            # The stream torch computes on orders the kernels after the step that last read the buffers,
            # and the next step after the kernels.
            handle = _torch_stream(backend.torch_device)
            stream = streams.get(handle)
            if stream is None:
                stream = streams[handle] = cuda.external_stream(handle) if handle else 0
            launch(*args, target="cuda", stream=stream)

        return run

    return on_torch_stream(bag_inputs), on_torch_stream(bag_lengths)


class BagAssembler:
    """Builds :class:`Bags` for batches of sample indices into one reused set of buffers.

    The sparse twin of ``gpu_ann.batching.BatchAssembler``, with the same methods: :meth:`to_device_indices`
    once per epoch order, then :meth:`assemble` on slices of what it returns. The returned tensors are views
    of the buffers: finish a step before asking for the next batch. On the GPU the kernels run on torch's
    current stream and nothing on the per-batch path waits for the device.

    Parameters
    ----------
    matrix : InteractionMatrix
        The input rows (the training split's matrix).
    samples : Samples
        The (user, item) pairs; copied to the backend once, as int32 torch tensors.
    max_rows : int
        The largest batch :meth:`assemble` will be asked for.
    buffers : BagBuffers, optional
        Buffers to share with another assembler used in turn; by default new ones of ``max_rows`` rows
        and ``capacity`` entries.
    allow_no_target : bool
        Accept item ``-1`` ("no target": nothing is removed from the row).
    capacity : int, optional
        Entries the new buffers hold; default ``max_rows`` times the longest row, which fits any batch.
        A smaller capacity saves memory; a batch that does not fit is then refused (checked on the host).

    Attributes
    ----------
    sample_bag_lengths : numpy.ndarray
        Every sample's bag length (int32, on the host), measured once on the backend.

    Raises
    ------
    IndexError
        A sample's user or item lies outside the matrix (or is negative).
    ValueError
        ``buffers`` has fewer than ``max_rows`` rows.
    """

    def __init__(
        self,
        matrix: InteractionMatrix,
        samples: Samples,
        max_rows: int,
        buffers: BagBuffers | None = None,
        allow_no_target: bool = False,
        capacity: int | None = None,
    ) -> None:
        backend = matrix.backend
        self.backend = backend
        self.n_samples = len(samples)
        self.max_rows = max_rows
        self.n_items = matrix.n_items
        check_samples(matrix, samples, allow_no_target)
        self._assemble, measure = _launchers(backend)
        self._indptr = backend.kernel_array(matrix.indptr)
        self._indices = backend.kernel_array(matrix.indices)
        # Length 0 tells the kernel the input is implicit (every value 1).
        values = matrix.values if matrix.values is not None else backend.from_host(np.empty(0, np.float32))
        self._values = backend.kernel_array(values)
        self._users = backend.view_of_tensor(backend.tensor_from_host(samples.user.astype(np.int32)))
        self._items = backend.view_of_tensor(backend.tensor_from_host(samples.item.astype(np.int32)))
        self.sample_bag_lengths = self._measure(measure)
        if buffers is None:
            # max_rows x the longest row, not the sum of the max_rows longest rows: a user has a sample per
            # item, so a batch may be max_rows of the longest user's samples (or, drawn with replacement or
            # padded, copies of one sample), and evaluation sets share these buffers.
            buffers = BagBuffers(
                backend, max_rows, max_rows * _row_statistics(matrix)[1] if capacity is None else capacity
            )
        elif buffers.max_rows < max_rows:
            raise ValueError(f"shared bag buffers hold {buffers.max_rows} rows, fewer than the {max_rows} asked for")
        self.buffers = buffers

    def _measure(self, measure) -> np.ndarray:
        """Every sample's bag length, on the host (int32)."""
        n = self.n_samples
        everything = self.backend.tensor_from_host(np.arange(n, dtype=np.int64))
        lengths = torch.zeros(n + 1, dtype=torch.int64, device=self.backend.torch_device)
        view = self.backend.view_of_tensor
        measure(self._indptr, self._indices, self._users, self._items, view(everything), view(lengths))
        return lengths[1:].cpu().numpy().astype(np.int32)  # device -> host copy: a sync, once per assembler

    def to_device_indices(self, order: np.ndarray) -> BagOrder:
        """Sample indices from the host to the device (one host-device copy), with their bag lengths.

        Parameters
        ----------
        order : numpy.ndarray
            Indices into the samples, each in ``[0, n_samples)``.

        Returns
        -------
        BagOrder
            Slice it into batches for :meth:`assemble`.

        Raises
        ------
        IndexError
            An index is outside ``[0, n_samples)``.
        """
        order = np.asarray(order)
        if len(order) and (order.min() < 0 or order.max() >= self.n_samples):
            raise IndexError(f"sample indices must lie in [0, {self.n_samples})")
        cumulative = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(self.sample_bag_lengths[order], out=cumulative[1:])
        device = self.backend.view_of_tensor(self.backend.tensor_from_host(order.astype(np.int64)))
        return BagOrder(device, cumulative, self)

    def assemble(self, order: BagOrder) -> Bags:
        """The bags of a batch of samples (a slice of a :meth:`to_device_indices` result).

        Three kernel launches on the GPU (lengths, their prefix sum, the fill), asynchronous: the
        batch's total comes from the host's table, so nothing waits for the device.

        Parameters
        ----------
        order : BagOrder
            At most ``max_rows`` samples, from this assembler's :meth:`to_device_indices`.

        Returns
        -------
        Bags
            Views of the shared buffers, overwritten by the next call.

        Raises
        ------
        TypeError
            ``order`` is not a :class:`BagOrder` (a bare device array has no host-side lengths).
        ValueError
            ``order`` is another assembler's, longer than ``max_rows``, or holds more entries than the buffers.
        """
        if not isinstance(order, BagOrder):
            raise TypeError(f"expected a BagOrder from to_device_indices, got {type(order).__name__}")
        if order.owner is not self:
            raise ValueError("this BagOrder indexes another assembler's samples")
        n, total, b = len(order), order.total, self.buffers
        if n > self.max_rows:
            raise ValueError(f"batch of {n} rows exceeds the buffer of {self.max_rows}")
        if total > b.capacity:
            raise ValueError(
                f"the batch's bags hold {total:,} entries but the buffers {b.capacity:,}: raise capacity "
                f"(at most max_rows x the longest row is ever needed)"
            )
        self._assemble(
            self._indptr, self._indices, self._values, self.n_items, self._users, self._items, order.device,
            *b.kernel_views,
        )  # fmt: skip
        return b.views(n, total)


class FixedBags(FixedBatches):
    """A fixed random subset of a split in ``n_batches`` sparse batches: the evaluation set of the seed.

    :class:`~gpu_ann.batching.FixedBatches` with the sparse path's assembler: the same seed draws the same
    samples in the same batches, so both paths evaluate on the same examples. Iterating yields :class:`Bags`;
    ``buffers`` is a :class:`BagBuffers` to share with the training assembler.
    """

    _assembler_class = BagAssembler

"""Sparse batch assembly: ``EmbeddingBag`` inputs straight from the CSR, target removed.

The dense row of sample ``s = batch[r]`` (user ``u``, target ``t``; see ``gpu_ann.kernels.assemble``) holds
``v_k / w`` at the user's items ``k`` other than ``t``, then three count features. The first layer on that
row is ``sum_k (v_k / w) * E[k] + features @ F``: an ``embedding_bag(mode="sum")`` with per-sample weights.
This module writes those bag inputs instead of the dense row::

    offsets_out[0] = 0, offsets_out[r + 1] = offsets_out[r] + (number of u's items other than t)
    bag_indices_out[offsets_out[r]:offsets_out[r + 1]]  = u's items other than t, ascending (int64)
    bag_weights_out[offsets_out[r]:offsets_out[r + 1]]  = v_k * (1 / w), float32, as the dense kernel does
    features_out[r] = f, sqrt(f), f**2   with f = w / n_items
    labels_out[r]   = t

``w`` is the bag's length, or 1 when the bag is empty; ``v_k`` is 1 when ``values`` has length 0 (implicit)
and ``values[k]`` otherwise. Whether the user has an item is decided by the CSR structure only. Entries of
``bag_indices_out`` / ``bag_weights_out`` past ``offsets_out[len(batch)]`` are left alone.

Functions with one argument order (``indptr, indices, values, n_items, sample_users, sample_items, batch,
offsets_out, bag_indices_out, bag_weights_out, features_out, labels_out``). ``n_items`` is an argument, unlike
in the dense kernel, because no output here is ``n_items`` wide:

* ``bag_inputs_cpu``    numba ``@njit(parallel=True)``: a parallel pass for the lengths, a serial prefix sum
  over the rows (``len(batch)`` additions), a parallel pass for the fill.
* ``cuda_kernels()``    builds (on first use, never at import) three numba-cuda kernels: ``bag_lengths_kernel``
  (a thread per row), ``bag_offsets_scan_kernel`` (one block: the prefix sum on the device, so the host never
  waits for the lengths) and ``bag_inputs_kernel`` (a block per row, threads striding over the row's entries so
  the writes are coalesced). They come with the block size they were compiled for (the scan's shared array
  is that long), one build per block size, and the launchers launch with that size.
* ``bag_inputs``        the launcher for either target: on CUDA the three launches, stream-ordered, no sync.

``bag_lengths`` (CPU twin ``bag_lengths_cpu``, kernel ``bag_lengths_kernel``) writes the length of each row's
bag alone, at ``lengths_out[r + 1]``; the assembler runs it once over all samples to keep a host table of bag
lengths, from which the host knows every batch's total without asking the device.

Why the bag buffers are sliced to the exact total instead of passed whole with a garbage tail: with
``include_last_offset=True`` torch still reads the tail. On the GPU the last bag runs to ``indices.numel()``,
not to ``offsets[-1]`` (``_embedding_bag_cuda``: "for cuda devices, we still use the legacy implementation even
this flag is enabled"; the kernel's ``end = bag < numBags - 1 ? offsets[bag + 1] : numIndices``), and the
backward sorts the whole index buffer. On the CPU (torch 2.13) only the float32 forward ignored the tail: the
float64 forward and the backward with per-sample weights both read it (measured). A padded ``[B, L]`` layout
with a pad index would cost ``B * max_row_length`` work per step and needs a pad row in the table. So the
assembler keeps each sample's bag length on the host and hands torch ``bag_indices[:total]``: exact, and no
host-device sync.

The CSR must be valid (``gpu_ann.matrix.validate_csr``) and the output buffers large enough (the assembler
checks the total on the host): the kernels do not bounds-check, for speed.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
from numba import njit, prange, types

from gpu_ann.kernels.assemble import _build_row_helpers as _dense_row_helpers

# Threads per block for the CUDA kernels, and the size of the scan kernel's shared array. Read at each launch,
# which builds (once per value) kernels compiled for it: the shared array's size is fixed when a kernel
# compiles, so a launch must never use a block size other than the one its kernels were built for. A module
# constant so tests can shrink it and make tiny inputs span several blocks, strides and scan chunks.
THREADS_PER_BLOCK = 256
# The most threads a CUDA block may have.
MAX_THREADS_PER_BLOCK = 1024
# Upper bound on the grid; rows beyond it are taken by a grid-stride loop.
MAX_BLOCKS = 65535

cuda = None  # numba.cuda, imported by cuda_kernels() on first use


def _build_row_helpers(device_jit):
    """The per-row logic, compiled with ``device_jit`` (``njit(inline="always")`` or ``cuda.jit(device=True)``)."""
    # The dense kernel's binary search for the target, compiled again for these kernels: one definition.
    find_item = _dense_row_helpers(device_jit)[0]

    @device_jit
    def bag_length(start, end, pos):
        # The row's entries less the target when the target is one of them.
        if pos >= 0:
            return end - start - 1
        return end - start

    @device_jit
    def write_features(features_out, r, n_items, w):
        # float32 literals throughout: a bare 1.0 would compile to f64 instructions on the GPU. The same
        # arithmetic as the dense kernel, so both paths see bit-identical features.
        f = np.float32(w) / np.float32(n_items)
        features_out[r, 0] = f
        features_out[r, 1] = math.sqrt(f)
        features_out[r, 2] = f * f

    return find_item, bag_length, write_features


_find_item_cpu, _bag_length_cpu, _write_features_cpu = _build_row_helpers(njit(inline="always"))


@njit(parallel=True, cache=True)
def bag_lengths_cpu(indptr, indices, sample_users, sample_items, batch, lengths_out):
    for r in prange(batch.shape[0]):
        s = batch[r]
        u = sample_users[s]
        start = indptr[u]
        end = indptr[u + 1]
        lengths_out[r + 1] = _bag_length_cpu(start, end, _find_item_cpu(indices, start, end, sample_items[s]))


@njit(parallel=True, cache=True)
def bag_inputs_cpu(
    indptr,
    indices,
    values,
    n_items,
    sample_users,
    sample_items,
    batch,
    offsets_out,
    bag_indices_out,
    bag_weights_out,
    features_out,
    labels_out,
):
    n_rows = batch.shape[0]
    implicit = values.shape[0] == 0
    for r in prange(n_rows):
        s = batch[r]
        u = sample_users[s]
        t = sample_items[s]
        start = indptr[u]
        end = indptr[u + 1]
        length = _bag_length_cpu(start, end, _find_item_cpu(indices, start, end, t))
        offsets_out[r + 1] = length
        _write_features_cpu(features_out, r, n_items, max(length, 1))
        labels_out[r] = t
    # A serial prefix sum: one addition per row, small beside either parallel pass.
    offsets_out[0] = 0
    for r in range(n_rows):
        offsets_out[r + 1] += offsets_out[r]
    for r in prange(n_rows):
        s = batch[r]
        u = sample_users[s]
        start = indptr[u]
        end = indptr[u + 1]
        pos = _find_item_cpu(indices, start, end, sample_items[s])
        scale = np.float32(1) / np.float32(max(_bag_length_cpu(start, end, pos), 1))
        o = offsets_out[r]
        for k in range(start, end):
            if k != pos:
                bag_indices_out[o] = indices[k]
                bag_weights_out[o] = scale if implicit else values[k] * scale
                o += 1


class CudaKernels(NamedTuple):
    """The three CUDA kernels of one build and the block size they were compiled for.

    Parameters
    ----------
    lengths, scan, fill : numba.cuda dispatcher
        ``bag_lengths_kernel``, ``bag_offsets_scan_kernel`` and ``bag_inputs_kernel``.
    threads_per_block : int
        The block size every launch of these kernels must use: the scan's shared array holds this many sums.
    """

    lengths: object
    scan: object
    fill: object
    threads_per_block: int


def cuda_kernels(threads_per_block: int | None = None) -> CudaKernels:
    """Compile-on-first-use CUDA kernels for a block size (numba-cuda; a GPU or the simulator to run).

    Parameters
    ----------
    threads_per_block : int, optional
        The block size to build for; default the current ``THREADS_PER_BLOCK``. Each size is built once.

    Returns
    -------
    CudaKernels

    Raises
    ------
    ValueError
        ``threads_per_block`` is outside ``[1, 1024]``.
    """
    block = THREADS_PER_BLOCK if threads_per_block is None else threads_per_block
    if not 1 <= block <= MAX_THREADS_PER_BLOCK:
        raise ValueError(f"threads per block must lie in [1, {MAX_THREADS_PER_BLOCK}], got {block}")
    return _build_cuda_kernels(int(block))


@functools.cache
def _build_cuda_kernels(threads_per_block: int) -> CudaKernels:
    """The kernels of :func:`cuda_kernels`, built once per block size."""
    # A module global, not a local: the simulator replaces the kernel's global ``cuda`` with its own
    # fake module, and would miss a closure variable.
    global cuda
    from numba import cuda

    find_item, bag_length, write_features = _build_row_helpers(cuda.jit(device=True))

    @cuda.jit
    def bag_lengths_kernel(indptr, indices, sample_users, sample_items, batch, lengths_out):
        # A thread per row: one binary search each.
        for r in range(cuda.grid(1), batch.shape[0], cuda.gridsize(1)):
            s = batch[r]
            u = sample_users[s]
            start = indptr[u]
            end = indptr[u + 1]
            lengths_out[r + 1] = bag_length(start, end, find_item(indices, start, end, sample_items[s]))

    @cuda.jit
    def bag_offsets_scan_kernel(offsets, n_rows):
        # One block of ``threads_per_block`` threads. Thread ``tid`` sums a contiguous chunk of the lengths in
        # offsets[1:n_rows + 1], the block scans those sums in shared memory, then each thread rewrites its
        # chunk as running totals. The size is the builder's argument, a closure constant frozen at compile
        # time (the simulator, too, sees this value, not the module's current constant).
        partial = cuda.shared.array(threads_per_block, types.int64)
        tid = cuda.threadIdx.x
        n_threads = cuda.blockDim.x
        chunk = (n_rows + n_threads - 1) // n_threads
        lo = 1 + tid * chunk
        hi = min(lo + chunk, n_rows + 1)
        own = 0
        for i in range(lo, hi):
            own += offsets[i]
        partial[tid] = own
        cuda.syncthreads()
        # Hillis-Steele inclusive scan; every thread runs every round, so the barriers are reached by all.
        step = 1
        while step < n_threads:
            before = 0
            if tid >= step:
                before = partial[tid - step]
            cuda.syncthreads()
            partial[tid] += before
            cuda.syncthreads()
            step *= 2
        running = partial[tid] - own
        for i in range(lo, hi):
            running += offsets[i]
            offsets[i] = running
        if tid == 0:
            offsets[0] = 0

    @cuda.jit
    def bag_inputs_kernel(
        indptr,
        indices,
        values,
        n_items,
        sample_users,
        sample_items,
        batch,
        offsets_out,
        bag_indices_out,
        bag_weights_out,
        features_out,
        labels_out,
    ):
        implicit = values.shape[0] == 0
        tid = cuda.threadIdx.x
        step = cuda.blockDim.x
        for r in range(cuda.blockIdx.x, batch.shape[0], cuda.gridDim.x):
            s = batch[r]
            u = sample_users[s]
            t = sample_items[s]
            start = indptr[u]
            end = indptr[u + 1]
            pos = find_item(indices, start, end, t)
            w = max(bag_length(start, end, pos), 1)
            scale = np.float32(1) / np.float32(w)
            first = offsets_out[r]
            for k in range(start + tid, end, step):
                if k != pos:
                    # Entries after the target move one place left to close its gap.
                    o = first + (k - start)
                    if pos >= 0 and k > pos:
                        o -= 1
                    bag_indices_out[o] = indices[k]
                    bag_weights_out[o] = scale if implicit else values[k] * scale
            if tid == 0:
                write_features(features_out, r, n_items, w)
                labels_out[r] = t

    return CudaKernels(bag_lengths_kernel, bag_offsets_scan_kernel, bag_inputs_kernel, threads_per_block)


def _row_grid(n_rows: int, threads_per_block: int) -> int:
    """Blocks for a thread-per-row launch."""
    return min(-(-n_rows // threads_per_block), MAX_BLOCKS)


def bag_lengths(indptr, indices, sample_users, sample_items, batch, lengths_out, *, target="cpu", stream=0):
    """Write the bag length of row ``r`` (the user's items other than the target) at ``lengths_out[r + 1]``.

    ``lengths_out[0]`` is left alone. ``target`` and ``stream`` as for :func:`bag_inputs`.
    """
    n_rows = batch.shape[0]
    if n_rows == 0:
        return
    if target == "cpu":
        bag_lengths_cpu(indptr, indices, sample_users, sample_items, batch, lengths_out)
    elif target == "cuda":
        kernels = cuda_kernels()
        block = kernels.threads_per_block
        kernels.lengths[_row_grid(n_rows, block), block, stream](
            indptr, indices, sample_users, sample_items, batch, lengths_out
        )
    else:
        raise ValueError(f"unknown kernel target {target!r} (expected 'cpu' or 'cuda')")


def bag_inputs(
    indptr,
    indices,
    values,
    n_items,
    sample_users,
    sample_items,
    batch,
    offsets_out,
    bag_indices_out,
    bag_weights_out,
    features_out,
    labels_out,
    *,
    target="cpu",
    stream=0,
):
    """Write the bag inputs of the samples ``batch``: ``offsets_out[:len(batch) + 1]``, the bags, features, labels.

    ``target="cpu"`` takes numpy arrays; ``target="cuda"`` takes device arrays (numba device arrays, or numpy
    arrays under the simulator) and launches three kernels on ``stream`` without synchronising the host.
    ``bag_indices_out`` and ``bag_weights_out`` must hold the batch's total bag length.
    """
    n_rows = batch.shape[0]
    if n_rows == 0:
        return
    args = (indptr, indices, values, n_items, sample_users, sample_items, batch)
    outs = (offsets_out, bag_indices_out, bag_weights_out, features_out, labels_out)
    if target == "cpu":
        bag_inputs_cpu(*args, *outs)
    elif target == "cuda":
        kernels = cuda_kernels()
        # The block the kernels were compiled for, never the constant read again: the scan's shared array
        # has that many slots, and a larger block would write past it.
        block = kernels.threads_per_block
        # Stream order chains the three: lengths, then their prefix sum, then the fill that reads the offsets.
        kernels.lengths[_row_grid(n_rows, block), block, stream](
            indptr, indices, sample_users, sample_items, batch, offsets_out
        )
        kernels.scan[1, block, stream](offsets_out, n_rows)
        kernels.fill[min(n_rows, MAX_BLOCKS), block, stream](*args, *outs)
    else:
        raise ValueError(f"unknown kernel target {target!r} (expected 'cpu' or 'cuda')")

"""Dense batch assembly: one input row per sample, target removed, normalised, three count features.

For sample ``s = batch[r]`` with user ``u = sample_users[s]`` and target ``t = sample_items[s]``::

    out[r, :n]      = v_k/w at the user's training items k other than t, 0 elsewhere
    out[r, n:n+3]   = f, sqrt(f), f**2   with f = w / n
    labels[r]       = t

where ``n = out.shape[1] - 3`` and ``w`` is the number of the user's training items other than ``t``
(``w = 1`` when that is 0). ``v_k`` is 1 in the default implicit mode (``values`` of length 0) and
``values[k]``, the stored value of entry ``k`` (a scaled rating or residual, see ``gpu_ann.values``),
otherwise. Whether the user has an item is decided by the CSR structure only, never by a stored
value: an entry whose value is 0 still counts in ``w`` and is still removed when it is the target.
``t`` is removed when it is in the row (training samples) and nothing is removed when it is not
(validation and test samples, whose target is not in the training matrix).

``out`` is float32, or uint16 holding bfloat16 bits (a view of a torch bf16 buffer), rounded to nearest
even exactly as torch converts float32.

Three functions with one argument order (``indptr, indices, values, sample_users, sample_items, batch,
out, labels``):

* ``assemble_rows_cpu``    numba ``@njit(parallel=True)``: a thread per row, zeros written in the same pass,
  for a batch larger than the last-level cache in column chunks (``chunk``, its one extra argument, last).
* ``assemble_rows_kernel`` numba-cuda ``@cuda.jit``: a block per row, threads stride over the columns so
  the zero writes are coalesced. Built on first use (``cuda_kernel()``), never at import, so this module
  imports without a GPU and without numba-cuda.
* ``assemble_rows``        the launcher for either target.

The row logic shared by both (finding the target, the count, the features) is written once in
``_build_row_helpers`` and compiled for each target with that target's decorator.

The CSR must be valid (``gpu_ann.matrix.validate_csr``): an index out of range here is an out-of-bounds
write, which the kernels do not check for speed.
"""

from __future__ import annotations

import functools
import glob
import math

import numpy as np
from numba import njit, prange

# Threads per block for the CUDA kernel. A module constant so tests can shrink it and make tiny
# inputs span several blocks and several column strides.
THREADS_PER_BLOCK = 256
# Upper bound on the grid; rows beyond it are taken by a grid-stride loop.
MAX_BLOCKS = 65535

# CPU twin: a batch larger than the last-level cache is written in chunks of this many columns, each zeroed
# and then given its entries while it is still in L1. Measured on the 2-core machine (bench/README.md) at
# 17,500 columns: 1.1-3.6x faster at B = 1,024-8,192. A batch that fits the cache is faster zeroed a whole
# row at a time (20-40% at B = 256), so the launcher chooses by the bytes it writes.
CPU_CHUNK_COLUMNS = 1024
# Batches writing more bytes than this are chunked; None: the last-level cache's size (last_level_cache_bytes).
CPU_CHUNK_MIN_BYTES = None

cuda = None  # numba.cuda, imported by cuda_kernel() on first use


def _build_row_helpers(device_jit):
    """The per-row logic, compiled with ``device_jit`` (``njit(inline="always")`` or ``cuda.jit(device=True)``)."""

    @device_jit
    def find_item(indices, start, end, item):
        # Binary search: rows are sorted (validated before any launch). Returns the position or -1.
        lo = start
        hi = end
        while lo < hi:
            mid = (lo + hi) // 2
            if indices[mid] < item:
                lo = mid + 1
            else:
                hi = mid
        if lo < end and indices[lo] == item:
            return lo
        return -1

    @device_jit
    def remaining_count(start, end, pos):
        w = end - start
        if pos >= 0:
            w -= 1
        if w < 1:
            w = 1
        return w

    @device_jit
    def store(out, r, c, value):
        # ``itemsize`` is part of the array's type, so each compiled kernel keeps one branch.
        if out.itemsize == 2:
            # bf16 output: torch owns a bfloat16 buffer and hands the kernel a uint16 view (numpy and
            # CuPy have no bf16). Round to nearest, ties to even, as torch's own conversion does; the
            # values here are finite, so NaN needs no case.
            u = np.float32(value).view(np.uint32)
            out[r, c] = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        else:
            out[r, c] = value

    @device_jit
    def write_features(out, r, n_items, w):
        # float32 literals throughout: a bare 1.0 would compile to f64 instructions on the GPU.
        f = np.float32(w) / np.float32(n_items)
        store(out, r, n_items, f)
        store(out, r, n_items + 1, math.sqrt(f))
        store(out, r, n_items + 2, f * f)

    return find_item, remaining_count, store, write_features


_find_item_cpu, _remaining_count_cpu, _store_cpu, _write_features_cpu = _build_row_helpers(njit(inline="always"))


@njit(inline="always")
def _scatter_cpu(out, r, indices, values, k, end, limit, pos, scale):
    """Store row ``r``'s entries from ``k`` on whose column is below ``limit``; returns the first one left."""
    if values.shape[0] == 0:  # implicit: every value 1
        while k < end and indices[k] < limit:
            if k != pos:
                _store_cpu(out, r, indices[k], scale)
            k += 1
    else:
        while k < end and indices[k] < limit:
            if k != pos:
                _store_cpu(out, r, indices[k], values[k] * scale)
            k += 1
    return k


@njit(parallel=True, cache=True)
def assemble_rows_cpu(indptr, indices, values, sample_users, sample_items, batch, out, labels, chunk):
    n_items = out.shape[1] - 3
    for r in prange(batch.shape[0]):
        s = batch[r]
        u = sample_users[s]
        t = sample_items[s]
        start = indptr[u]
        end = indptr[u + 1]
        pos = _find_item_cpu(indices, start, end, t)
        w = _remaining_count_cpu(start, end, pos)
        scale = np.float32(1) / np.float32(w)
        # Zeros in the same parallel pass as the scatter: a separate fill is single-threaded and
        # touches the buffer twice (GPU-NOTES: 2-4x slower).
        if chunk == 0:
            for c in range(n_items):
                out[r, c] = 0
            _scatter_cpu(out, r, indices, values, start, end, n_items, pos, scale)
        else:
            # A row's indices are sorted, so each chunk's entries follow the previous chunk's.
            row = out[r]
            k = start
            for c0 in range(0, n_items, chunk):
                c1 = min(c0 + chunk, n_items)
                row[c0:c1] = 0  # a slice (a memset), not a loop from c0: numba's loop would not vectorise
                k = _scatter_cpu(out, r, indices, values, k, end, c1, pos, scale)
        _write_features_cpu(out, r, n_items, w)
        labels[r] = t


def cache_size_bytes(text: str) -> int | None:
    """A size as Linux's sysfs writes a cache's (``"32768K"``, ``"2M"``, ``"512"``) in bytes; None if not one."""
    text = text.strip()
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    scale = units.get(text[-1:], 1)
    digits = text[:-1] if text[-1:] in units else text
    return int(digits) * scale if digits.isdigit() else None


@functools.cache
def last_level_cache_bytes() -> int:
    """The largest CPU cache's size, from Linux's sysfs; 32 MiB where it cannot be read."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                size = cache_size_bytes(f.read())
        except OSError:
            continue
        if size:
            sizes.append(size)
    return max(sizes, default=32 * 2**20)


def cpu_chunk_columns(n_rows: int, out) -> int:
    """The ``chunk`` argument of ``assemble_rows_cpu`` for writing ``n_rows`` rows of ``out`` (0: whole rows)."""
    limit = CPU_CHUNK_MIN_BYTES if CPU_CHUNK_MIN_BYTES is not None else last_level_cache_bytes()
    return CPU_CHUNK_COLUMNS if n_rows * out.shape[1] * out.itemsize > limit else 0


@functools.cache
def cuda_kernel():
    """Compile-on-first-use CUDA kernel (needs numba-cuda; a GPU or ``NUMBA_ENABLE_CUDASIM=1`` to run)."""
    # A module global, not a local: the simulator replaces the kernel's global ``cuda`` with its own
    # fake module, and would miss a closure variable.
    global cuda
    from numba import cuda

    find_item, remaining_count, store, write_features = _build_row_helpers(cuda.jit(device=True))

    @cuda.jit
    def assemble_rows_kernel(indptr, indices, values, sample_users, sample_items, batch, out, labels):
        n_items = out.shape[1] - 3
        implicit = values.shape[0] == 0
        tid = cuda.threadIdx.x
        step = cuda.blockDim.x
        # A block per row; the loop bound is the same for every thread of a block, so the barrier
        # below is reached by all of them.
        for r in range(cuda.blockIdx.x, batch.shape[0], cuda.gridDim.x):
            s = batch[r]
            u = sample_users[s]
            t = sample_items[s]
            start = indptr[u]
            end = indptr[u + 1]
            for c in range(tid, n_items, step):
                out[r, c] = 0
            # The scatter below may write a column that another thread of this block zeroed.
            cuda.syncthreads()
            pos = find_item(indices, start, end, t)
            w = remaining_count(start, end, pos)
            scale = np.float32(1) / np.float32(w)
            # ``implicit`` is the same for every thread: the branch does not diverge.
            for k in range(start + tid, end, step):
                if k != pos:
                    store(out, r, indices[k], scale if implicit else values[k] * scale)
            if tid == 0:
                write_features(out, r, n_items, w)
                labels[r] = t

    return assemble_rows_kernel


def assemble_rows(indptr, indices, values, sample_users, sample_items, batch, out, labels, *, target="cpu", stream=0):
    """Write ``out[:len(batch)]`` and ``labels[:len(batch)]`` for the samples ``batch``.

    ``values`` is float32 with one entry per stored index, or of length 0 for the implicit mode (every
    value 1).

    ``target="cpu"`` takes numpy arrays; ``target="cuda"`` takes device arrays (numba device arrays,
    or numpy arrays under the simulator) and launches on ``stream`` without synchronising the host.
    """
    n_rows = batch.shape[0]
    if n_rows == 0:
        return
    if target == "cpu":
        chunk = cpu_chunk_columns(n_rows, out)
        assemble_rows_cpu(indptr, indices, values, sample_users, sample_items, batch, out, labels, chunk)
    elif target == "cuda":
        blocks = min(n_rows, MAX_BLOCKS)
        cuda_kernel()[blocks, THREADS_PER_BLOCK, stream](
            indptr, indices, values, sample_users, sample_items, batch, out, labels
        )
    else:
        raise ValueError(f"unknown kernel target {target!r} (expected 'cpu' or 'cuda')")

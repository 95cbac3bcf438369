"""A small CUDA workload for compute-sanitizer memcheck: every kernel, both output dtypes, edge rows.

Run under ``compute-sanitizer --tool memcheck python bench/sanitizer_workload.py``. It checks its own
results too, the dense rows against the numpy reference and the bags against the CPU backend's, and
exits non-zero on a mismatch.

memcheck knows only the allocations the driver made. torch's caching allocator and CuPy's pool carve
buffers out of larger blocks, inside which an overrun goes unseen, so both are told here to give every
buffer its own allocation; the bag kernels also run once into buffers of exactly the batch's size.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp

# Read by torch when it first allocates on the device: every tensor gets its own cudaMalloc.
os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import assemble_reference  # noqa: E402

from gpu_ann.backend import get_backend  # noqa: E402
from gpu_ann.bags import BagAssembler, Bags  # noqa: E402
from gpu_ann.batching import BatchAssembler  # noqa: E402
from gpu_ann.matrix import InteractionMatrix  # noqa: E402
from gpu_ann.splits import Samples  # noqa: E402

MAX_ROWS = 777
SIZES = (1, 64, MAX_ROWS)  # one row, a partial buffer, the whole buffer
# What the bag buffers hold before each batch; whatever is left past the batch must still be this.
POISON = {"offsets": -5, "indices": -9, "weights": float("nan"), "features": float("nan"), "labels": -7}


def one_allocation_per_buffer(backend) -> None:
    """CuPy without its pool: each array (the matrix, the samples) is its own device allocation."""
    backend.xp.cuda.set_allocator(None)


def edge_matrix(rng: np.random.Generator, n_users: int, n_items: int) -> sp.csr_matrix:
    """Random float32 CSR whose user 0 has no items and user 1 every item (its bag spans many thread strides)."""
    body = sp.random(n_users - 2, n_items, density=0.03, format="csr", random_state=0, dtype=np.float32)
    full = sp.csr_matrix(rng.uniform(0.5, 1.5, (1, n_items)).astype(np.float32))
    csr = sp.vstack([sp.csr_matrix((1, n_items), dtype=np.float32), full, body], format="csr")
    csr.sum_duplicates()
    return csr


def check_dense(backend, csr, samples: Samples, rng: np.random.Generator) -> int:
    """The dense kernel in fp32 and bf16 against the reference; returns the number of mismatches."""
    n_items = csr.shape[1]
    matrix = InteractionMatrix.from_scipy(backend, csr)
    failures = 0
    for dtype in (torch.float32, torch.bfloat16):
        asm = BatchAssembler(matrix, samples, MAX_ROWS, dtype=dtype)
        for size in SIZES:
            batch = rng.integers(0, len(samples), size)
            batch[-1] = len(samples) - 1  # the empty-row user
            X, y = asm.assemble(asm.to_device_indices(batch))
            ref, labels = assemble_reference(csr.indptr, csr.indices, samples.user, samples.item, batch, n_items)
            got = X.float().cpu().numpy()
            tol = 1e-6 if dtype == torch.float32 else 8e-3
            if not np.allclose(got, ref, rtol=tol, atol=0) or not (y.cpu().numpy() == labels).all():
                print(f"MISMATCH dense dtype={dtype} size={size}")
                failures += 1
    return failures


def bags_differ(got: Bags, expected: Bags) -> list[str]:
    """The fields of two batches of bags that differ (floats to rtol 1e-6, the rest exactly)."""
    differ = []
    for name, g, e in zip(Bags._fields, got, expected):
        g, e = g.cpu().numpy(), e.numpy()
        same = g.shape == e.shape and (
            np.allclose(g, e, rtol=1e-6, atol=0) if e.dtype == np.float32 else np.array_equal(g, e)
        )
        if not same:
            differ.append(name)
    return differ


def written_past_the_batch(buffers, n_rows: int, total: int) -> list[str]:
    """The bag buffers written past the batch (``n_rows`` bags of ``total`` entries)."""
    tails = {
        "offsets": buffers.offsets[n_rows + 1 :],
        "indices": buffers.indices[total:],
        "weights": buffers.weights[total:],
        "features": buffers.features[n_rows:],
        "labels": buffers.labels[n_rows:],
    }
    written = []
    for name, tail in tails.items():
        tail = tail.cpu().numpy()
        poison = POISON[name]
        if not (np.isnan(tail).all() if np.isnan(poison) else (tail == poison).all()):
            written.append(name)
    return written


def check_bags(backend, csr, samples: Samples, rng: np.random.Generator) -> int:
    """The three bag kernels (lengths, scan, fill), implicit and with values, against the CPU backend.

    Each batch runs twice on the device: into the shared buffers of ``MAX_ROWS`` rows, poisoned first, where
    nothing past the batch may change; and into buffers of exactly the batch's rows and entries, where
    memcheck sees a write one past any of them. Returns the number of mismatches.
    """
    cpu_backend = get_backend("cpu")
    failures = 0
    for values in (False, True):
        cpu = BagAssembler(InteractionMatrix.from_scipy(cpu_backend, csr, values=values), samples, MAX_ROWS)
        cuda_matrix = InteractionMatrix.from_scipy(backend, csr, values=values)
        cuda = BagAssembler(cuda_matrix, samples, MAX_ROWS)
        for size in SIZES:
            batch = rng.integers(0, len(samples), size)
            batch[-1] = len(samples) - 1  # the empty-row user: the one-row batch is a single empty bag
            if size > 1:
                batch[0] = len(samples) - 2  # the full row's user
            expected = cpu.assemble(cpu.to_device_indices(batch))
            total = int(expected.offsets[-1])
            tight = BagAssembler(cuda_matrix, samples, size, capacity=max(total, 1))
            for name, asm in (("shared", cuda), ("exact", tight)):
                for field, poison in POISON.items():
                    getattr(asm.buffers, field).fill_(poison)
                got = asm.assemble(asm.to_device_indices(batch))
                problems = bags_differ(got, expected) + [
                    f"{t} written past the batch" for t in written_past_the_batch(asm.buffers, size, total)
                ]
                if problems:
                    print(f"MISMATCH bags values={values} size={size} buffers={name}: {', '.join(problems)}")
                    failures += 1
    return failures


def main() -> int:
    backend = get_backend("cuda")
    one_allocation_per_buffer(backend)
    rng = np.random.default_rng(0)
    n_users, n_items = 500, 3001
    csr = edge_matrix(rng, n_users, n_items)
    coo = csr.tocoo()
    # Training samples (target in the row, first and last of their rows included), held-out ones, then one of
    # the full row's (its first item) and one of the empty row's.
    users = np.concatenate([coo.row, rng.integers(0, n_users, 2000), [1, 0]]).astype(np.int32)
    items = np.concatenate([coo.col, rng.integers(0, n_items, 2000), [0, n_items - 1]]).astype(np.int32)
    samples = Samples(users, items)
    failures = check_dense(backend, csr, samples, rng) + check_bags(backend, csr, samples, rng)
    torch.cuda.synchronize()
    print(f"sanitizer workload: {'OK' if not failures else f'{failures} mismatches'}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

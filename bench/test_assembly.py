"""Assembly throughput: gpu-ann's kernels against every other route to the same batch, one run.

Run: ``python -m pytest bench/test_assembly.py`` (CPU defaults take a few minutes); see bench/README.md.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from baselines import make_cupyx, make_notebook, make_scipy, make_torch_sparse, parallel_fill
from conftest import record, sync

from gpu_ann import synthetic
from gpu_ann.batching import BatchAssembler
from gpu_ann.matrix import InteractionMatrix
from gpu_ann.splits import Samples

BASELINES = {"notebook": make_notebook, "scipy": make_scipy, "torch-sparse": make_torch_sparse, "cupyx": make_cupyx}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(scope="session")
def setup(bench_matrix, backend):
    users, items = synthetic.samples_of(bench_matrix)
    return users, items, InteractionMatrix.from_scipy(backend, bench_matrix)


def batch_of(n_samples: int, size: int) -> np.ndarray:
    return np.random.default_rng(size).integers(0, n_samples, size=size)


def gpu_reps(backend) -> int:
    # On the GPU one batch can take microseconds: time 20 launches per round so that launch and sync
    # latency do not hide the kernel. On the CPU one call per round.
    return 20 if backend.name == "cuda" else 1


@pytest.fixture(scope="session")
def reference_batches(setup):
    """gpu-ann's fp32 batches on the host, which every baseline must reproduce."""
    cache = {}

    def get(size):
        if size not in cache:
            users, items, matrix = setup
            asm = BatchAssembler(matrix, Samples(users, items), size)
            X, _ = asm.assemble(asm.to_device_indices(batch_of(len(users), size)))
            cache[size] = X.cpu().numpy().copy()
        return cache[size]

    return get


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_gpu_ann_kernel(benchmark, setup, backend, batch_size, dtype):
    users, items, matrix = setup
    asm = BatchAssembler(matrix, Samples(users, items), batch_size, dtype=DTYPES[dtype])
    device_batch = asm.to_device_indices(batch_of(len(users), batch_size))
    reps = gpu_reps(backend)

    def run():
        for _ in range(reps):
            asm.assemble(device_batch)
        sync(backend)

    benchmark.pedantic(run, rounds=10, warmup_rounds=2, iterations=1)
    n_cols = matrix.n_items + 3
    record(
        benchmark,
        "assembly",
        f"gpu-ann-{backend.name}",
        batch_size,
        matrix.n_items,
        dtype,
        batch_size * n_cols * DTYPES[dtype].itemsize,
        calls=reps,
    )


@pytest.mark.parametrize("method", list(BASELINES))
def test_baseline(benchmark, setup, backend, bench_matrix, batch_size, method, reference_batches):
    if method == "cupyx" and backend.name != "cuda":
        pytest.skip("cupyx runs on the cuda backend only")
    users, items, matrix = setup
    build = BASELINES[method](bench_matrix, users, items, backend.torch_device)
    batch = batch_of(len(users), batch_size)
    # The same rows as gpu-ann's kernel, or the comparison means nothing.
    started = time.perf_counter()
    np.testing.assert_allclose(build(batch).cpu().numpy(), reference_batches(batch_size), rtol=1e-6, atol=1e-7)
    slow = time.perf_counter() - started > 1.0  # a route this slow gets fewer rounds, to fit the GPU check

    def run():
        build(batch)
        sync(backend)

    benchmark.pedantic(run, rounds=2 if slow else 5, warmup_rounds=0 if slow else 1, iterations=1)
    record(benchmark, "assembly", method, batch_size, matrix.n_items, "fp32", batch_size * (matrix.n_items + 3) * 4)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_write_ceiling(benchmark, setup, backend, batch_size, dtype):
    """The bandwidth the kernel is measured against: a parallel memset (CPU) or a device copy (GPU)."""
    _, _, matrix = setup
    shape = (batch_size, matrix.n_items + 3)
    size = batch_size * shape[1] * DTYPES[dtype].itemsize
    if backend.name == "cpu":
        buf = np.empty(shape, np.float32 if dtype == "fp32" else np.uint16)
        benchmark.pedantic(lambda: parallel_fill(buf, 0), rounds=10, warmup_rounds=2, iterations=1)
        record(benchmark, "ceiling", "parallel-memset", batch_size, matrix.n_items, dtype, size)
    else:
        src = torch.rand(shape, device=backend.torch_device).to(DTYPES[dtype])
        dst = torch.empty_like(src)
        reps = gpu_reps(backend)

        def run():
            for _ in range(reps):
                dst.copy_(src)
            sync(backend)

        benchmark.pedantic(run, rounds=10, warmup_rounds=2, iterations=1)
        # A copy reads and writes every byte: count both, as device bandwidth is quoted.
        record(benchmark, "ceiling", "device-copy", batch_size, matrix.n_items, dtype, 2 * size, calls=reps)

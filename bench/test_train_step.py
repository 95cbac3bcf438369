"""Training-step throughput: assembly + forward + backward + Adam, and the share taken by assembly.

On the GPU also an MFU estimate: counted FLOPs / step time / the bf16 matmul rate measured in the same
run. The next batch's kernel is queued on torch's stream right behind the step that reads the current
one, so the host never waits for it; on the device the two are serial, and the assembly share below
says how much that costs.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import RESULTS, Measurement, record, sync, synthetic_matrix

from gpu_ann import synthetic
from gpu_ann.batching import BatchAssembler
from gpu_ann.matrix import InteractionMatrix
from gpu_ann.model import CandidateGenerator
from gpu_ann.splits import Samples

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
USERS = 20_000
ITEMS_PER_USER = 175  # MyAnimeList 2020's mean


def step_flops(model: CandidateGenerator, batch: int) -> float:
    """Matmul FLOPs of one step: forward, weight gradients, and input gradients of all but layer 1.

    The batch is not a leaf that needs a gradient, so the first layer computes no input gradient.
    """
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    macs = [m.in_features * m.out_features for m in linears]
    return 2.0 * batch * (2 * sum(macs) + sum(macs[1:]))


@pytest.fixture(scope="session")
def matmul_peak(backend):
    """bf16 matmul rate (FLOP/s) on the GPU, measured once in this run; None on the CPU."""
    if backend.name != "cuda":
        return None
    a = torch.randn(8192, 8192, device=backend.torch_device, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    end.synchronize()
    rate = 20 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3)
    RESULTS.append(
        Measurement("ceiling", "bf16-matmul", 8192, 8192, "bf16", 2 * 8192**3 / rate, extra={"tflops": rate / 1e12})
    )
    return rate


def median_seconds(fn, rounds=5) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def test_train_step(benchmark, backend, matmul_peak, train_items, train_batch, train_dtype):
    dtype = train_dtype
    csr = synthetic_matrix(USERS, train_items, USERS * ITEMS_PER_USER)
    users, items = synthetic.samples_of(csr)
    matrix = InteractionMatrix.from_scipy(backend, csr)
    # bf16 mode: the kernel writes bf16 directly (half the bytes), the model runs under autocast
    # with fp32 master weights.
    asm = BatchAssembler(matrix, Samples(users, items), train_batch, dtype=DTYPES[dtype])
    rng = np.random.default_rng(0)
    batches = [asm.to_device_indices(rng.integers(0, len(users), train_batch)) for _ in range(8)]
    torch.manual_seed(0)
    model = CandidateGenerator(csr.shape[1]).to(backend.torch_device)
    optimizer = model.configure_optimizer()
    autocast = (
        torch.autocast(backend.torch_device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
    )
    reps = 8 if backend.name == "cuda" else 2

    def steps():
        for i in range(reps):
            X, y = asm.assemble(batches[i % len(batches)])
            with autocast:
                loss = F.cross_entropy(model(X), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        sync(backend)

    def assembly_only():
        for i in range(reps):
            asm.assemble(batches[i % len(batches)])
        sync(backend)

    steps()  # warm-up: kernel compile, allocator, autocast caches
    benchmark.pedantic(steps, rounds=5 if backend.name == "cuda" else 3, warmup_rounds=1, iterations=1)
    assembly = median_seconds(assembly_only) / reps
    step = benchmark.stats.stats.median / reps
    flops = step_flops(model, train_batch)
    extra = {"assembly_fraction": assembly / step, "tflops": flops / step / 1e12}
    if matmul_peak:
        extra["mfu"] = flops / step / matmul_peak
    record(benchmark, "train-step", f"step-{backend.name}", train_batch, csr.shape[1], dtype, calls=reps, **extra)

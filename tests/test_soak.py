"""Soak and leak tests: thousands of small training steps keep process memory flat, and building and tearing
down the loader and the trainer 20 times leaks nothing measurable (RSS, tracemalloc and live objects; on a GPU
also torch's and CuPy's device memory)."""

from __future__ import annotations

import gc
import os
import shutil
import tracemalloc
from pathlib import Path

import numba
import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from gpu_ann.batching import BatchAssembler, FixedBatches
from gpu_ann.data.table import RatingsTable
from gpu_ann.loader import BatchLoader
from gpu_ann.matrix import InteractionMatrix
from gpu_ann.model import CandidateGenerator
from gpu_ann.training import TrainConfig, train

STATM = Path("/proc/self/statm")
pytestmark = pytest.mark.skipif(not STATM.exists(), reason="reads the resident set size from /proc (Linux only)")

MiB = 1 << 20
WARMUP_STEPS, SOAK_STEPS = 1_000, 5_000
# Resident memory may move by allocator bookkeeping (a few hundred KiB seen here over 8,000 steps); 4 MiB
# over 5,000 steps catches any leak of 840 bytes a step or more, and one leaked batch (32 x 63 float32, 8 KiB)
# a step would add 40 MiB.
SOAK_RSS_TOLERANCE = 4 * MiB
ROUNDS, WARM_ROUNDS = 20, 4
# A round allocates about 4 MiB of batch buffers (two loaders of 256 x 2,003 float32); leaking them in each
# round would raise the low point of the last five measured rounds about 40 MiB above that of the first five.
ROUND_RSS_TOLERANCE = 8 * MiB
# Python-level growth over 15 measured rounds; leaking one loader, model or optimiser object graph a round
# is far above this (a torch module alone is a few KiB of Python objects).
ROUND_TRACED_TOLERANCE = 64 * 1024
TRACKED = (BatchLoader, BatchAssembler, FixedBatches, InteractionMatrix, CandidateGenerator, torch.optim.Optimizer)


def rss() -> int:
    """Resident set size of this process in bytes (the second field of /proc/self/statm, in pages)."""
    return int(STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_objects() -> dict[str, int]:
    """How many loaders, assemblers, matrices, models and optimisers are still alive."""
    counts: dict[str, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, TRACKED):
            counts[type(obj).__name__] = counts.get(type(obj).__name__, 0) + 1
    return counts


@pytest.fixture
def one_thread():
    """One torch and one numba thread: on a loaded 2-core machine thread contention makes tiny steps 50x slower."""
    saved = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    yield
    torch.set_num_threads(saved[0])
    numba.set_num_threads(saved[1])


def random_pairs(n_users: int, n_items: int, n: int, seed: int) -> sp.csr_matrix:
    """A users x items 0/1 CSR of about ``n`` random interactions, sorted and without duplicates."""
    rng = np.random.default_rng(seed)
    csr = sp.csr_matrix(
        (np.ones(n, np.float32), (rng.integers(0, n_users, n), rng.integers(0, n_items, n))), shape=(n_users, n_items)
    )
    csr.sum_duplicates()
    csr.data[:] = 1
    return csr


def table_of(csr: sp.csr_matrix) -> RatingsTable:
    coo = csr.tocoo()
    user_ids, items = np.arange(csr.shape[0]), np.arange(csr.shape[1])
    return RatingsTable(coo.row.astype(np.int32), coo.col.astype(np.int32), None, None, user_ids, items, None, "soak")


def endless(loader: BatchLoader):
    """Batches across epoch boundaries (each epoch makes a new order on the device)."""
    while True:
        yield from loader


def soak(backend: str, measure) -> tuple[int, list[int], float, int]:
    """Train a tiny model for WARMUP_STEPS + SOAK_STEPS steps; ``measure()`` after warm-up and every 1,000 steps."""
    csr = random_pairs(200, 60, 2_000, seed=0)
    coo = csr.tocoo()
    torch.manual_seed(0)
    with BatchLoader.from_csr(csr, coo.row, coo.col, 32, backend=backend, seed=0) as loader:
        model = nn.Sequential(nn.Linear(loader.n_features, 16), nn.ReLU(), nn.Linear(16, loader.n_items))
        model = model.to(loader.device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        batches = endless(loader)
        readings, first_loss = [], None
        for step in range(1, WARMUP_STEPS + SOAK_STEPS + 1):
            X, y = next(batches)
            loss = F.cross_entropy(model(X), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step == 1:
                first_loss = loss.item()  # host-device sync, once
            if step == WARMUP_STEPS:
                gc.collect()
                base = measure()
            elif step > WARMUP_STEPS and step % 1_000 == 0:
                readings.append(measure())
        return base, readings, loss.item() / first_loss, loader.epoch


def test_process_memory_stays_flat_over_thousands_of_steps(one_thread):
    base, readings, loss_ratio, epochs = soak("cpu", rss)
    assert epochs > 90  # 63 batches an epoch: every epoch boundary (a new order on the device) was crossed
    assert loss_ratio < 0.9  # it trained: the loss fell
    growth = [r - base for r in readings]
    assert max(growth) <= SOAK_RSS_TOLERANCE, f"RSS grew by {[g / MiB for g in growth]} MiB after warm-up"


def build_and_tear_down(csr: sp.csr_matrix, table: RatingsTable, out: Path, backend: str) -> None:
    """One round: a loader built, iterated for an epoch and closed, then a short training run into ``out``."""
    coo = csr.tocoo()
    with BatchLoader.from_csr(csr, coo.row, coo.col, 256, backend=backend, seed=0) as loader:
        for X, _ in loader:
            assert X.shape[1] == csr.shape[1] + 3
    cfg = TrainConfig(
        out=str(out), backend=backend, hidden=(8, 8, 8), batch_size=256, max_steps=3, eval_every=3, eval_batches=1
    )
    result = train(cfg, table)
    assert result.steps == 3 and (out / "model.pt").is_file()
    shutil.rmtree(out)  # disk is not what is measured, and 20 runs need not stay on it


def rounds(tmp_path: Path, backend: str, measure) -> tuple:
    """Run ROUNDS rounds: tracemalloc snapshots and live-object counts after the first traced round and after
    the last, and ``measure()`` after every traced round."""
    csr = random_pairs(300, 2_000, 3_000, seed=1)
    table = table_of(csr)
    for k in range(WARM_ROUNDS):
        build_and_tear_down(csr, table, tmp_path / f"run{k}", backend)
    # Traced from here on: the first traced round's caches (e.g. logging, first calls) count in the baseline.
    tracemalloc.start()
    try:
        build_and_tear_down(csr, table, tmp_path / f"run{WARM_ROUNDS}", backend)
        gc.collect()
        # Count live objects before the snapshot: the isinstance scan fills abc's subclass caches (about
        # 600 KiB for every type on the heap), which is the measurement's own memory, not a leak.
        live = live_objects()
        before, readings = tracemalloc.take_snapshot(), [measure()]
        for k in range(WARM_ROUNDS + 1, ROUNDS):
            build_and_tear_down(csr, table, tmp_path / f"run{k}", backend)
            gc.collect()
            readings.append(measure())
        after_live = live_objects()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    return (before, live), (after, after_live), readings


def traced_growth(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot) -> tuple[int, list]:
    diff = after.compare_to(before, "lineno")
    return sum(d.size_diff for d in diff), [str(d) for d in diff[:5]]


def test_building_and_tearing_down_20_times_leaks_nothing(tmp_path, one_thread):
    (snap0, live0), (snap1, live1), readings = rounds(tmp_path, "cpu", rss)
    assert live1 == live0, f"objects left alive: before {live0}, after {live1}"
    growth, top = traced_growth(snap0, snap1)
    assert growth <= ROUND_TRACED_TOLERANCE, f"Python memory grew by {growth} bytes over the rounds: {top}"
    # RSS moves by +-10 MiB from round to round (glibc arenas, torch's CPU allocator) with no trend; the low
    # point of the last five rounds against that of the first five shows a trend and ignores that noise.
    first, last = min(readings[:5]), min(readings[-5:])
    assert last - first <= ROUND_RSS_TOLERANCE, f"RSS low point grew by {(last - first) / MiB:.1f} MiB: {readings}"


# --- on a GPU: device memory ---------------------------------------------------------------------------


def device_bytes() -> tuple[int, int]:
    """Bytes torch's caching allocator holds for live tensors, and bytes CuPy's pool has handed out."""
    import cupy

    torch.cuda.synchronize()  # host-device sync: count after every queued kernel has finished
    return torch.cuda.memory_allocated(), cupy.get_default_memory_pool().used_bytes()


@pytest.mark.gpu
def test_device_memory_stays_flat_over_thousands_of_steps():
    base, readings, loss_ratio, _ = soak("cuda", device_bytes)
    assert loss_ratio < 0.9
    # Live bytes between steps: the buffers, the matrix, the model and Adam's state, the same every step.
    # Up to 1 MiB of slack for allocator rounding; a leaked 8 KiB batch a step would add 40 MiB.
    for torch_bytes, cupy_bytes in readings:
        assert torch_bytes - base[0] <= MiB and cupy_bytes - base[1] <= MiB, (base, readings)


@pytest.mark.gpu
def test_building_and_tearing_down_20_times_frees_device_memory(tmp_path):
    (_, live0), (_, live1), readings = rounds(tmp_path, "cuda", device_bytes)
    assert live1 == live0
    assert readings[-1] == readings[0], f"device bytes (torch, CuPy) went from {readings[0]} to {readings[-1]}"

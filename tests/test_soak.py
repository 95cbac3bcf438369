"""Soak and leak tests: thousands of small training steps keep process memory flat, and building and tearing
down the loader and the trainer 20 times leaks nothing measurable (RSS, tracemalloc and live objects; on a GPU
also torch's and CuPy's device memory). Both input paths: the dense one, and the sparse one (``BagAssembler``)
trained with the sampled softmax (``NegativeSampler``, ``Objective``)."""

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

from gpu_ann.bags import BagAssembler, BagBuffers
from gpu_ann.batching import BatchAssembler, FixedBatches
from gpu_ann.data.table import RatingsTable
from gpu_ann.handoff import BatchBuffers
from gpu_ann.loader import BatchLoader
from gpu_ann.matrix import InteractionMatrix
from gpu_ann.model import CandidateGenerator
from gpu_ann.objective import Objective
from gpu_ann.sampled import NegativeSampler
from gpu_ann.training import TrainConfig, train

STATM = Path("/proc/self/statm")
pytestmark = pytest.mark.skipif(not STATM.exists(), reason="reads the resident set size from /proc (Linux only)")

MiB = 1 << 20
WARMUP_STEPS, SOAK_STEPS = 1_000, 5_000
# Resident memory may move by allocator bookkeeping (a few hundred KiB seen here over 8,000 steps); 4 MiB
# over 5,000 steps catches any leak of 840 bytes a step or more. One leaked dense batch (32 x 63 float32,
# 8 KiB) a step would add 40 MiB; one leaked sparse batch (32 bags of 9 entries on average, int64 index and
# float32 weight each, plus offsets, features and labels: about 4.5 KiB) 22 MiB (35 MiB seen, with the
# tensors' own overhead), and keeping every step's loss (its autograd graph) 80 MiB.
SOAK_RSS_TOLERANCE = 4 * MiB
ROUNDS, WARM_ROUNDS = 20, 4
# A round allocates about 4 MiB of dense batch buffers (two loaders of 256 x 2,003 float32); leaking them in
# each round would raise the low point of the last five measured rounds about 40 MiB above that of the first
# five. The sparse path's bag buffers (256 x the longest row, 18, x 12 bytes: 55 KiB a set) are too small for
# RSS to show a leak of them; the live-object count below catches a kept BagBuffers or BagAssembler instead.
ROUND_RSS_TOLERANCE = 8 * MiB
# Python-level growth over 15 measured rounds; leaking one loader, model or optimiser object graph a round
# is far above this (a torch module alone is a few KiB of Python objects).
ROUND_TRACED_TOLERANCE = 64 * 1024
TRACKED = (
    BatchLoader,
    BatchAssembler,
    BatchBuffers,
    BagAssembler,
    BagBuffers,
    FixedBatches,  # FixedBags too (a subclass, counted under its own name)
    InteractionMatrix,
    CandidateGenerator,
    NegativeSampler,
    Objective,
    torch.optim.Optimizer,
)
# The sparse path's soak: the sampled softmax with this many popularity-drawn negatives per batch.
SOAK_NEGATIVES = 16


def rss() -> int:
    """Resident set size of this process in bytes (the second field of /proc/self/statm, in pages)."""
    return int(STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_objects() -> dict[str, int]:
    """How many loaders, assemblers, buffers, matrices, models, samplers, objectives and optimisers are alive."""
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


def soak(backend: str, measure, path: str = "dense") -> tuple[int, list[int], float, int]:
    """Train a tiny model for WARMUP_STEPS + SOAK_STEPS steps; ``measure()`` after warm-up and every 1,000 steps.

    ``path="dense"``: a plain MLP on the dense rows with the full softmax. ``path="sparse"``: the bags
    (``BagAssembler``) into a small ``CandidateGenerator``, trained through ``Objective`` with the sampled
    softmax over ``NegativeSampler``'s popularity draws.
    """
    csr = random_pairs(200, 60, 2_000, seed=0)
    coo = csr.tocoo()
    torch.manual_seed(0)
    with BatchLoader.from_csr(csr, coo.row, coo.col, 32, backend=backend, seed=0, path=path) as loader:
        if path == "dense":
            model = nn.Sequential(nn.Linear(loader.n_features, 16), nn.ReLU(), nn.Linear(16, loader.n_items))
            model = model.to(loader.device)

            def loss_of(batch):
                return F.cross_entropy(model(batch.X), batch.y)

        else:
            model = CandidateGenerator(loader.n_items, (16, 16, 16)).to(loader.device)
            counts = np.bincount(coo.col, minlength=loader.n_items)
            sampler = NegativeSampler(
                loader.n_items, SOAK_NEGATIVES, "popularity", counts, power=0.75, device=loader.device
            )
            loss_of = Objective(model, sampler).loss
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        batches = endless(loader)
        readings, first_loss = [], None
        for step in range(1, WARMUP_STEPS + SOAK_STEPS + 1):
            loss = loss_of(next(batches))
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


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_process_memory_stays_flat_over_thousands_of_steps(one_thread, path):
    base, readings, loss_ratio, epochs = soak("cpu", rss, path)
    assert epochs > 90  # 63 batches an epoch: every epoch boundary (a new order on the device) was crossed
    assert loss_ratio < 0.9  # it trained: the loss fell
    growth = [r - base for r in readings]
    assert max(growth) <= SOAK_RSS_TOLERANCE, f"RSS grew by {[g / MiB for g in growth]} MiB after warm-up"


def build_and_tear_down(csr: sp.csr_matrix, table: RatingsTable, out: Path, backend: str) -> None:
    """One round, on each input path: a loader built, iterated for an epoch and closed, then a short training
    run into ``out`` (dense with the full softmax; sparse with the sampled softmax)."""
    coo = csr.tocoo()
    with BatchLoader.from_csr(csr, coo.row, coo.col, 256, backend=backend, seed=0) as loader:
        for X, _ in loader:
            assert X.shape[1] == csr.shape[1] + 3
    with BatchLoader.from_csr(csr, coo.row, coo.col, 256, backend=backend, seed=0, path="sparse") as loader:
        for bags in loader:
            assert bags.features.shape[0] == bags.offsets.shape[0] - 1 == bags.labels.shape[0]
            assert bags.offsets[-1] == bags.indices.shape[0] == bags.weights.shape[0]
    for path, softmax in (("dense", "full"), ("sparse", "sampled")):
        cfg = TrainConfig(
            out=str(out), backend=backend, hidden=(8, 8, 8), batch_size=256, max_steps=3, eval_every=3,
            eval_batches=1, input_path=path, softmax=softmax, negatives=SOAK_NEGATIVES,
        )  # fmt: skip
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
@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_device_memory_stays_flat_over_thousands_of_steps(path):
    base, readings, loss_ratio, _ = soak("cuda", device_bytes, path)
    assert loss_ratio < 0.9
    # Live bytes between steps: the buffers, the matrix, the model and Adam's state, the same every step.
    # Up to 1 MiB of slack for allocator rounding; a leaked batch a step would add 40 MiB (dense, 8 KiB) or
    # 22 MiB (sparse, 4.5 KiB).
    for torch_bytes, cupy_bytes in readings:
        assert torch_bytes - base[0] <= MiB and cupy_bytes - base[1] <= MiB, (base, readings)


@pytest.mark.gpu
def test_building_and_tearing_down_20_times_frees_device_memory(tmp_path):
    (_, live0), (_, live1), readings = rounds(tmp_path, "cuda", device_bytes)
    assert live1 == live0
    assert readings[-1] == readings[0], f"device bytes (torch, CuPy) went from {readings[0]} to {readings[-1]}"

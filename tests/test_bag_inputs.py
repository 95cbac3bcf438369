"""The bag-input kernels (CPU twin; CUDA under the simulator; PTX for sm_90) and ``gpu_ann.bags``.

Everything is checked against ``bags_reference``, a slow per-sample loop, and against the dense kernel's rows.
The simulator tests run in the second pass (``NUMBA_ENABLE_CUDASIM=1 python -m pytest -m cudasim``).
"""

import math
import os
import re

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from cases import HAND_N_ITEMS, HAND_ROWS, SimBackend, csr_case, hand_case, random_case

import gpu_ann.bags as bags
import gpu_ann.kernels.bag_inputs as kernel
from gpu_ann.backend import get_backend
from gpu_ann.batching import FixedBatches
from gpu_ann.kernels.assemble import assemble_rows
from gpu_ann.matrix import InteractionMatrix
from gpu_ann.splits import Samples

IMPLICIT = np.empty(0, np.float32)  # length 0: every value 1
IN_CUDASIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def bags_reference(indptr, indices, values, users, items, batch, n_items):
    """Bag inputs one sample at a time: offsets, indices, float64 weights, float64 features, labels."""
    offsets, bag, weights, features, labels = [0], [], [], [], []
    for s in batch:
        u, t = int(users[s]), int(items[s])
        kept = [k for k in range(indptr[u], indptr[u + 1]) if indices[k] != t]
        w = max(len(kept), 1)
        bag += [int(indices[k]) for k in kept]
        weights += [(float(values[k]) if len(values) else 1.0) / w for k in kept]
        offsets.append(len(bag))
        f = w / n_items
        features.append([f, math.sqrt(f), f * f])
        labels.append(t)
    return (
        np.array(offsets, np.int64),
        np.array(bag, np.int64),
        np.array(weights, np.float64),
        np.array(features, np.float64).reshape(-1, 3),
        np.array(labels, np.int64),
    )


def run_kernel(case, batch, values=IMPLICIT, target="cpu", rows=None, capacity=64):
    """The launcher on poisoned buffers (every cell it should write starts wrong); returns the buffers."""
    indptr, indices, users, items, n = case
    rows = rows or len(batch)
    out = (
        np.full(rows + 1, -5, np.int64),
        np.full(capacity, -9, np.int64),
        np.full(capacity, np.nan, np.float32),
        np.full((rows, 3), np.nan, np.float32),
        np.full(rows, -7, np.int64),
    )
    batch = np.asarray(batch, np.int64)
    kernel.bag_inputs(indptr, indices, values, n, users, items, batch, *out, target=target)
    return out


def check_against_reference(case, batch, got, values=IMPLICIT):
    offsets, bag, weights, features, labels = bags_reference(*case[:2], values, *case[2:4], batch, case[4])
    b, total = len(batch), offsets[-1]
    np.testing.assert_array_equal(got[0][: b + 1], offsets)
    np.testing.assert_array_equal(got[1][:total], bag)
    np.testing.assert_allclose(got[2][:total], weights, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got[3][:b], features, rtol=1e-6)
    np.testing.assert_array_equal(got[4][:b], labels)
    # Nothing past the batch is touched.
    assert (got[1][total:] == -9).all() and np.isnan(got[2][total:]).all()
    assert (got[0][b + 1 :] == -5).all() and np.isnan(got[3][b:]).all() and (got[4][b:] == -7).all()


def test_hand_case_matches_reference_and_hand_values():
    # Rows: user 0 = {}, user 1 = {4}, user 2 = {0, 2, 5, 9}, user 3 = {0..9}; n = 10. Sample (2, 5) is the
    # dense row   item: 0    1  2    3  4  5  6  7  8  9   | f    sqrt f  f^2
    #                  1/3  0  1/3  0  0  0  0  0  0  1/3  | 0.3  0.548   0.09
    # so its bag is items [0, 2, 9] with weights 1/3 each, and the features are the dense row's last three.
    case = hand_case()
    got = run_kernel(case, np.arange(len(case[2])))
    check_against_reference(case, np.arange(len(case[2])), got)
    offsets, indices, weights, features, labels = got
    # (1,4) only item is the target: empty bag; (2,0) (2,5) (2,9): 3 each; (3,0) (3,9): 9 each; (0,3): empty
    # row; (2,7) held-out target not in the row: all 4 kept; (1,8): item 4 kept.
    np.testing.assert_array_equal(offsets, [0, 0, 3, 6, 9, 18, 27, 27, 31, 32])
    np.testing.assert_array_equal(indices[3:6], [0, 2, 9])
    np.testing.assert_allclose(weights[3:6], 1 / 3, rtol=1e-7)
    np.testing.assert_allclose(features[2], [0.3, np.sqrt(0.3), 0.09], rtol=1e-6)
    np.testing.assert_array_equal(indices[27:32], [0, 2, 5, 9, 4])
    np.testing.assert_allclose(weights[27:32], [0.25, 0.25, 0.25, 0.25, 1.0])
    np.testing.assert_allclose(features[0], [0.1, np.sqrt(0.1), 0.01], rtol=1e-6)  # w clamped to 1
    np.testing.assert_array_equal(labels, [4, 0, 5, 9, 0, 9, 3, 7, 8])


def test_partial_batch_and_repeated_samples():
    case = hand_case()
    batch = [3, 1, 2, 3]
    got = run_kernel(case, batch, rows=8)
    check_against_reference(case, batch, got)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_cases_match_reference(seed):
    case = random_case(60, 97, 0.08, seed)
    batch = np.random.default_rng(seed).integers(0, len(case[2]), size=150)
    values = np.random.default_rng(seed + 10).normal(size=len(case[1])).astype(np.float32)
    values[::4] = 0.0  # a value of 0 is still a seen item: it counts in w and stays in the bag
    for vals in (IMPLICIT, values):
        got = run_kernel(case, batch, vals, capacity=4000)
        check_against_reference(case, batch, got, vals)


def densify(offsets, indices, weights, features, n_items):
    """Dense rows from bag inputs (float32)."""
    X = np.zeros((len(offsets) - 1, n_items + 3), np.float32)
    for r in range(len(offsets) - 1):
        X[r, indices[offsets[r] : offsets[r + 1]]] = weights[offsets[r] : offsets[r + 1]]
    X[:, n_items:] = features[: len(offsets) - 1]
    return X


@pytest.mark.parametrize("with_values", [False, True])
def test_bags_densify_to_the_dense_kernels_rows(with_values):
    indptr, indices, users, items, n = case = random_case(40, 31, 0.2, 3)
    values = np.random.default_rng(3).uniform(-2, 2, len(indices)).astype(np.float32) if with_values else IMPLICIT
    batch = np.random.default_rng(4).integers(0, len(users), size=60).astype(np.int64)
    got = run_kernel(case, batch, values, capacity=2000)
    dense = np.empty((len(batch), n + 3), np.float32)
    labels = np.empty(len(batch), np.int64)
    assemble_rows(indptr, indices, values, users, items, batch, dense, labels, target="cpu")
    # Same float32 arithmetic (value times 1/w; the same features): equal bit for bit.
    np.testing.assert_array_equal(densify(*got[:4], n), dense)
    np.testing.assert_array_equal(got[4], labels)


def test_bag_lengths_and_the_empty_batch():
    case = hand_case()
    lengths = np.full(len(case[2]) + 1, -1, np.int64)
    kernel.bag_lengths(*case[:4], np.arange(len(case[2]), dtype=np.int64), lengths)
    assert lengths[0] == -1  # left alone
    np.testing.assert_array_equal(lengths[1:], [0, 3, 3, 3, 9, 9, 0, 4, 1])
    got = run_kernel(case, [], rows=2)
    assert (got[0] == -5).all() and (got[4] == -7).all()
    with pytest.raises(ValueError, match="'tpu'"):
        run_kernel(case, [0], target="tpu")


# --- the CUDA kernels under the simulator (second pass) ------------------------------------------------


@pytest.fixture
def tiny_launch(monkeypatch):
    # 4 threads, 3 blocks: 13 rows take the grid-stride loops, rows span strides, the scan has chunks of 4.
    monkeypatch.setattr(kernel, "THREADS_PER_BLOCK", 4)
    monkeypatch.setattr(kernel, "MAX_BLOCKS", 3)


@pytest.mark.cudasim
def test_cuda_kernels_match_reference_and_the_cpu_twin(tiny_launch):
    case = random_case(12, 29, 0.25, seed=5)
    batch = np.random.default_rng(5).integers(0, len(case[2]), size=13)
    values = np.random.default_rng(6).normal(size=len(case[1])).astype(np.float32)
    for vals in (IMPLICIT, values):
        got = run_kernel(case, batch, vals, target="cuda", rows=15, capacity=200)
        check_against_reference(case, batch, got, vals)
        cpu = run_kernel(case, batch, vals, target="cpu", rows=15, capacity=200)
        for a, b in zip(got, cpu):
            np.testing.assert_array_equal(a, b)


@pytest.mark.cudasim
def test_cuda_hand_case_and_lengths(tiny_launch):
    case = hand_case()
    batch = np.arange(len(case[2]))
    check_against_reference(case, batch, run_kernel(case, batch, target="cuda"))
    lengths = np.full(len(batch) + 1, -1, np.int64)
    kernel.bag_lengths(*case[:4], batch.astype(np.int64), lengths, target="cuda")
    np.testing.assert_array_equal(lengths, [-1, 0, 3, 3, 3, 9, 9, 0, 4, 1])


class _LaunchRecorder:
    """Wraps a kernel: records each launch's ``(grid, block)`` and forwards it, or only records (``run=False``)."""

    def __init__(self, kernel, launches, run=True):
        self.kernel, self.launches, self.run = kernel, launches, run

    def __getitem__(self, config):
        self.launches.append((self.kernel, config[0], config[1]))
        return self.kernel[config] if self.run else (lambda *args: None)


def record_launches(monkeypatch, run=True):
    """Make the launchers' kernels record their launches; returns the list they append to."""
    launches = []
    build = kernel.cuda_kernels

    def recording(*args, **kwargs):
        k = build(*args, **kwargs)
        return k._replace(**{f: _LaunchRecorder(getattr(k, f), launches, run) for f in ("lengths", "scan", "fill")})

    monkeypatch.setattr(kernel, "cuda_kernels", recording)
    return launches


@pytest.mark.cudasim
def test_cuda_block_size_changed_after_a_first_build(tiny_launch, monkeypatch):
    # Regression (review finding 7): the scan's shared array was sized by THREADS_PER_BLOCK at the first build
    # and the launch read the constant again, so raising it later wrote past the array on a GPU. Now each
    # block size has its own build and every launch uses its build's size, which the simulator also enforces.
    launches = record_launches(monkeypatch)
    case = random_case(12, 29, 0.25, seed=5)
    batch = np.random.default_rng(5).integers(0, len(case[2]), size=13)
    for block in (4, 8, 2):
        monkeypatch.setattr(kernel, "THREADS_PER_BLOCK", block)
        check_against_reference(case, batch, run_kernel(case, batch, target="cuda", rows=15, capacity=200))
    # Three launches a batch, each with the batch's block, the scan the one built for that block.
    assert [b for _, _, b in launches] == [4] * 3 + [8] * 3 + [2] * 3
    assert [k is kernel._build_cuda_kernels(b).scan for k, _, b in launches[1::3]] == [True] * 3
    # What the fix prevents: the kernels built for 4 threads, launched with 8, overrun the scan's array.
    with pytest.raises(IndexError, match="out of bounds"):
        kernel.cuda_kernels(4).scan[1, 8](np.arange(11, dtype=np.int64), 10)


@pytest.mark.cudasim
def test_assembler_on_the_cuda_launch_path(tiny_launch, monkeypatch):
    monkeypatch.setattr(bags, "_torch_stream", lambda device: 0)
    case = random_case(10, 23, 0.3, seed=8)
    matrix = InteractionMatrix(SimBackend(), *case[:2], 10, case[4])
    assembler = bags.BagAssembler(matrix, Samples(case[2], case[3]), 6)
    order = assembler.to_device_indices(np.arange(len(case[2]))[::-1].copy())
    got = assembler.assemble(order[2:8])
    ref = bags_reference(*case[:2], IMPLICIT, *case[2:4], order.device[2:8], case[4])
    np.testing.assert_array_equal(got.offsets.numpy(), ref[0])
    np.testing.assert_array_equal(got.indices.numpy(), ref[1])
    np.testing.assert_allclose(got.weights.numpy(), ref[2], rtol=1e-6)


# --- PTX for sm_90 (first pass only) ---------------------------------------------------------------------


class _Sm90:
    compute_capability = (9, 0)
    id = 0


@pytest.mark.skipif(IN_CUDASIM, reason="the simulator cannot compile PTX (first pass only)")
def test_cuda_kernels_compile_to_sm90_ptx_without_float64(monkeypatch):
    from numba import cuda, types
    from numba.cuda import dispatcher

    # A kernel calling device functions asks the driver for the current device even for an explicit target.
    monkeypatch.setattr(dispatcher, "get_current_device", lambda: _Sm90())
    i64, i32 = types.int64[::1], types.int32[::1]
    rows = (types.int64[::1], types.int32[::1], i32, i32, i64)  # indptr, indices, users, items, batch
    fill = (rows[0], rows[1], types.float32[::1], types.int64, i32, i32, i64)
    outs = (i64, i64, types.float32[::1], types.float32[:, ::1], i64)
    lengths_kernel, scan_kernel, fill_kernel, _ = kernel.cuda_kernels()
    for k, sig, barrier in (
        (lengths_kernel, (*rows, i64), False),
        (scan_kernel, (i64, types.int64), True),
        (fill_kernel, (*fill, *outs), False),
    ):
        ptx, _ = cuda.compile_ptx(k.py_func, sig, cc=(9, 0))
        assert ".target sm_90" in ptx
        assert (("bar.sync" in ptx) or ("barrier.sync" in ptx)) == barrier
        assert ".f64" not in ptx  # float32 kernels must not fall back to double precision


def shared_bytes(ptx: str) -> list[int]:
    """Sizes of the shared arrays a PTX module declares."""
    return [int(n) for n in re.findall(r"\.shared \.align \d+ \.b8 \w+\[(\d+)\]", ptx)]


@pytest.mark.skipif(IN_CUDASIM, reason="the simulator cannot compile PTX (first pass only)")
def test_launch_block_equals_the_block_the_scan_was_compiled_for(monkeypatch):
    # Review finding 7: the launcher must launch with the size the scan's shared array was compiled for,
    # also when THREADS_PER_BLOCK changes after a first build. Launches are recorded, not run (no GPU).
    from numba import cuda, types

    launches = record_launches(monkeypatch, run=False)
    case = hand_case()
    batch = np.arange(len(case[2]), dtype=np.int64)
    for block in (64, 128):
        monkeypatch.setattr(kernel, "THREADS_PER_BLOCK", block)
        run_kernel(case, batch, target="cuda")
        kernel.bag_lengths(*case[:4], batch, np.zeros(len(batch) + 1, np.int64), target="cuda")
    # bag_inputs: lengths, scan, fill; then bag_lengths: lengths. Grids: rows / block, one block, a block a row.
    assert [(g, b) for _, g, b in launches] == [(1, 64), (1, 64), (9, 64), (1, 64)] + [
        (1, 128),
        (1, 128),
        (9, 128),
        (1, 128),
    ]
    for scan, _, block in (launches[1], launches[5]):
        ptx, _ = cuda.compile_ptx(scan.py_func, (types.int64[::1], types.int64), cc=(9, 0))
        assert shared_bytes(ptx) == [8 * block]  # one int64 per thread of the block it was launched with
    with pytest.raises(ValueError, match=r"\[1, 1024\], got 2048"):
        kernel.cuda_kernels(2048)


# --- gpu_ann.bags on the CPU backend -----------------------------------------------------------------------


def hand_matrix(values=None):
    indptr, indices = csr_case(HAND_ROWS, HAND_N_ITEMS)
    data = np.ones(len(indices), np.float32) if values is None else values
    host = sp.csr_matrix((data, indices, indptr), shape=(len(HAND_ROWS), HAND_N_ITEMS))
    return InteractionMatrix.from_scipy(get_backend("cpu"), host, values=values is not None)


def test_assembler_reuses_its_buffers_and_matches_reference():
    case = random_case(30, 41, 0.15, seed=11)
    host = sp.csr_matrix((np.ones(len(case[1]), np.float32), case[1], case[0]), shape=(30, 41))
    matrix = InteractionMatrix.from_scipy(get_backend("cpu"), host)
    assembler = bags.BagAssembler(matrix, Samples(case[2], case[3]), 16)
    b = assembler.buffers
    longest = int(np.diff(case[0]).max())
    assert b.capacity == 16 * longest and b.indices.dtype == b.offsets.dtype == torch.int64
    order_host = np.random.default_rng(0).permutation(len(case[2]))[:40]  # 16 + 16 + a partial 8
    order = assembler.to_device_indices(order_host)
    pointers = set()
    for start in range(0, 40, 16):
        got = assembler.assemble(order[start : start + 16])
        ref = bags_reference(*case[:2], IMPLICIT, *case[2:4], order_host[start : start + 16], case[4])
        np.testing.assert_array_equal(got.offsets.numpy(), ref[0])
        np.testing.assert_array_equal(got.indices.numpy(), ref[1])
        np.testing.assert_allclose(got.weights.numpy(), ref[2], rtol=1e-6)
        np.testing.assert_allclose(got.features.numpy(), ref[3], rtol=1e-6)
        np.testing.assert_array_equal(got.labels.numpy(), ref[4])
        pointers.add(tuple(t.data_ptr() for t in got))
    # Every batch is a view of the same five buffers: no step allocates.
    assert pointers == {
        (b.indices.data_ptr(), b.offsets.data_ptr(), b.weights.data_ptr(), b.features.data_ptr(), b.labels.data_ptr())
    }


def test_assembler_values_no_target_and_shared_buffers():
    values = np.arange(1, 16, dtype=np.float32)  # user 2 = {0, 2, 5, 9} holds 2, 3, 4, 5
    matrix = hand_matrix(values)
    train = bags.BagAssembler(matrix, Samples(np.array([2, 3], np.int32), np.array([5, 0], np.int32)), 4)
    recommend = bags.BagAssembler(
        matrix,
        Samples(np.array([2, 0], np.int32), np.array([-1, -1], np.int32)),
        2,
        train.buffers,
        allow_no_target=True,
    )
    assert recommend.buffers is train.buffers
    got = recommend.assemble(recommend.to_device_indices(np.array([0, 1])))
    # No target: the whole row, each value over w = 4; the empty row gives an empty bag.
    np.testing.assert_array_equal(got.offsets.numpy(), [0, 4, 4])
    np.testing.assert_array_equal(got.indices.numpy(), [0, 2, 5, 9])
    np.testing.assert_allclose(got.weights.numpy(), np.array([2, 3, 4, 5]) / 4, rtol=1e-7)
    np.testing.assert_array_equal(got.labels.numpy(), [-1, -1])
    got = train.assemble(train.to_device_indices(np.array([0])))
    np.testing.assert_allclose(got.weights.numpy(), np.array([2, 3, 5]) / 3, rtol=1e-7)


def test_assembler_refusals():
    matrix = hand_matrix()
    samples = Samples(np.array([3, 2, 1], np.int32), np.array([0, 5, 4], np.int32))
    small = bags.BagAssembler(matrix, samples, 2, capacity=10)
    other = bags.BagAssembler(matrix, samples, 2)
    order = small.to_device_indices(np.array([0, 1, 2]))
    assert (len(order), order.total, order[1:].total) == (3, 12, 3)
    with pytest.raises(ValueError, match="bags hold 12 entries but the buffers 10"):
        small.assemble(order[:2])
    with pytest.raises(ValueError, match="3 rows exceeds the buffer of 2"):
        small.assemble(order)
    with pytest.raises(ValueError, match="another assembler"):
        other.assemble(order[1:])
    with pytest.raises(TypeError, match="BagOrder"):
        small.assemble(np.array([0], np.int64))
    with pytest.raises(ValueError, match="step 2"):
        order[::2]
    with pytest.raises(IndexError, match=r"\[0, 3\)"):
        small.to_device_indices(np.array([3]))
    with pytest.raises(IndexError, match="item 10"):
        bags.BagAssembler(matrix, Samples(np.array([0], np.int32), np.array([10], np.int32)), 2)
    with pytest.raises(IndexError, match="negative"):
        bags.BagAssembler(matrix, Samples(np.array([0], np.int32), np.array([-1], np.int32)), 2)
    with pytest.raises(ValueError, match="hold 2 rows, fewer than the 4"):
        bags.BagAssembler(matrix, samples, 4, small.buffers)


def test_default_capacity_fits_a_batch_of_the_longest_users_samples():
    # Why the buffers hold max_rows x the longest row, not the sum of the max_rows longest rows (review
    # finding 6): a training sample is a stored entry, so the longest user has as many samples as items and
    # one batch may be all of them. Skewed case: user 0 holds items 0..29, users 1..9 one item each.
    rows = [list(range(30))] + [[u] for u in range(1, 10)]
    indptr, indices = csr_case(rows, 30)
    host = sp.csr_matrix((np.ones(len(indices), np.float32), indices, indptr), shape=(10, 30))
    matrix = InteractionMatrix.from_scipy(get_backend("cpu"), host)
    users = np.repeat(np.arange(10), np.diff(indptr)).astype(np.int32)
    samples = Samples(users, indices.astype(np.int32))  # one per stored entry, as the trainer makes them
    assembler = bags.BagAssembler(matrix, samples, 8)
    assert assembler.buffers.capacity == 8 * 30
    batch = np.arange(8)  # eight of user 0's samples: bags of 29 items each
    got = assembler.assemble(assembler.to_device_indices(batch))
    assert got.indices.shape[0] == 8 * 29 > 30 + 7  # more than the 8 longest rows hold together
    ref = bags_reference(indptr, indices, IMPLICIT, users, samples.item, batch, 30)
    np.testing.assert_array_equal(got.offsets.numpy(), ref[0])
    np.testing.assert_array_equal(got.indices.numpy(), ref[1])
    # Sized by the sum of the longest rows, the same ordinary batch is refused.
    smaller = bags.BagAssembler(matrix, samples, 8, capacity=30 + 7)
    with pytest.raises(ValueError, match="bags hold 232 entries but the buffers 37"):
        smaller.assemble(smaller.to_device_indices(batch))


def test_fixed_bags_evaluate_the_same_samples_as_fixed_batches():
    case = random_case(25, 19, 0.2, seed=2)
    host = sp.csr_matrix((np.ones(len(case[1]), np.float32), case[1], case[0]), shape=(25, 19))
    matrix = InteractionMatrix.from_scipy(get_backend("cpu"), host)
    samples = Samples(case[2], case[3])
    sparse = bags.FixedBags(matrix, samples, 8, 3, seed=4)
    dense = FixedBatches(matrix, samples, 8, 3, seed=4)
    assert len(sparse) == len(dense) == 3 and sparse.n_samples == dense.n_samples == 24
    for got, (X, y) in zip(sparse, dense):
        np.testing.assert_array_equal(got.labels.numpy(), y.numpy())
        np.testing.assert_array_equal(
            densify(*(t.numpy() for t in (got.offsets, got.indices, got.weights, got.features)), 19), X.numpy()
        )


def test_cost_estimates_by_hand():
    matrix = hand_matrix()
    # Row lengths 0, 1, 4, 10: a training sample's mean bag is (1 + 16 + 100) / 15 - 1 = 6.8 entries.
    assert bags.bytes_per_step(matrix, 4, "dense") == (3 * 4 * 13 * 4, 4 * 13 * 4 + 4 * 8)
    assert bags.bytes_per_step(matrix, 4, "dense", input_bytes=2).moved == 3 * 4 * 13 * 2
    per_entry = 3 * 12 + 2 * 2 * 4  # index + weight three times; a 2-wide float32 row gathered and scattered
    sparse = bags.bytes_per_step(matrix, 4, "sparse", embedding_dim=2)
    assert sparse.moved == int(4 * (6.8 * per_entry + 3 * 20))
    # offsets 5 x 8; 4 x the longest row (10) x (8 + 4); features 4 x 12; labels 4 x 8
    assert sparse.buffers == 5 * 8 + 4 * 10 * 12 + 4 * 3 * 4 + 4 * 8
    assert bags.choose_path(matrix, 4) == "dense"  # 10 items: the dense row is cheap
    wide = InteractionMatrix.from_pairs(get_backend("cpu"), np.zeros(3, np.int32), np.array([1, 7, 99_000]), 2, 10**5)
    assert bags.choose_path(wide, 4) == "sparse"
    with pytest.raises(ValueError, match="'both'"):
        bags.bytes_per_step(matrix, 4, "both")

"""The CUDA assembly kernel under the numba CUDA simulator (second pass: NUMBA_ENABLE_CUDASIM=1).

Inputs stay tiny: each simulated thread is a Python thread. The block is shrunk to 4 threads and the
grid to 3 blocks so rows span several column strides and the grid-stride loop over rows is taken.
"""

import numpy as np
import pytest
from cases import hand_case, random_case
from reference import assemble_reference

import gpu_ann.kernels.assemble as assemble

pytestmark = pytest.mark.cudasim


@pytest.fixture(autouse=True)
def tiny_launch(monkeypatch):
    monkeypatch.setattr(assemble, "THREADS_PER_BLOCK", 4)
    monkeypatch.setattr(assemble, "MAX_BLOCKS", 3)


IMPLICIT = np.empty(0, np.float32)  # length 0: every value 1


def run_sim(indptr, indices, users, items, batch, n_items, buffer_rows=None, values=IMPLICIT):
    rows = buffer_rows or len(batch)
    out = np.full((rows, n_items + 3), np.nan, dtype=np.float32)
    labels = np.full(rows, -7, dtype=np.int64)
    assemble.assemble_rows(indptr, indices, values, users, items, batch.astype(np.int64), out, labels, target="cuda")
    return out, labels


def test_hand_built_case_matches_reference():
    indptr, indices, users, items, n = hand_case()
    batch = np.arange(len(users))
    out, labels = run_sim(indptr, indices, users, items, batch, n)
    ref, ref_labels = assemble_reference(indptr, indices, users, items, batch, n)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(labels, ref_labels)


def test_partial_last_batch():
    indptr, indices, users, items, n = hand_case()
    batch = np.array([3, 1, 2, 6])
    out, labels = run_sim(indptr, indices, users, items, batch, n, buffer_rows=7)
    ref, ref_labels = assemble_reference(indptr, indices, users, items, batch, n)
    np.testing.assert_allclose(out[:4], ref, rtol=1e-6)
    np.testing.assert_array_equal(labels[:4], ref_labels)
    assert np.isnan(out[4:]).all() and (labels[4:] == -7).all()


def test_random_case_matches_reference():
    indptr, indices, users, items, n = random_case(12, 29, 0.2, seed=5)
    batch = np.random.default_rng(5).integers(0, len(users), size=10)
    out, labels = run_sim(indptr, indices, users, items, batch, n)
    ref, ref_labels = assemble_reference(indptr, indices, users, items, batch, n)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(labels, ref_labels)


def test_values_match_reference():
    indptr, indices, users, items, n = random_case(10, 23, 0.25, seed=7)
    values = np.random.default_rng(7).normal(size=len(indices)).astype(np.float32)
    values[::5] = 0.0  # a value of 0 is still a seen item
    batch = np.random.default_rng(8).integers(0, len(users), size=9)
    out, labels = run_sim(indptr, indices, users, items, batch, n, values=values)
    ref, ref_labels = assemble_reference(indptr, indices, users, items, batch, n, values=values)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(labels, ref_labels)


def test_bf16_output_matches_the_cpu_twin_bit_for_bit():
    indptr, indices, users, items, n = random_case(10, 37, 0.3, seed=9)
    batch = np.random.default_rng(9).integers(0, len(users), size=8).astype(np.int64)
    sim = np.zeros((8, n + 3), np.uint16)
    cpu = np.zeros((8, n + 3), np.uint16)
    labels = np.zeros(8, np.int64)
    assemble.assemble_rows(indptr, indices, np.empty(0, np.float32), users, items, batch, sim, labels, target="cuda")
    assemble.assemble_rows(indptr, indices, np.empty(0, np.float32), users, items, batch, cpu, labels, target="cpu")
    np.testing.assert_array_equal(sim, cpu)
    assert (sim != 0).any()

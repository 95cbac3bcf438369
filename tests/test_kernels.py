"""The CPU twin of the assembly kernel against the slow reference."""

import numpy as np
import pytest
from cases import hand_case, random_case
from gpu_ann.kernels.assemble import assemble_rows
from reference import assemble_reference


def run_cpu(indptr, indices, users, items, batch, n_items, buffer_rows=None):
    rows = buffer_rows or len(batch)
    out = np.full((rows, n_items + 3), np.nan, dtype=np.float32)  # poisoned: every cell must be written
    labels = np.full(rows, -7, dtype=np.int64)
    assemble_rows(indptr, indices, users, items, batch.astype(np.int64), out, labels, target="cpu")
    return out, labels


def test_hand_built_case_matches_reference_and_hand_values():
    indptr, indices, users, items, n = hand_case()
    batch = np.arange(len(users))
    out, labels = run_cpu(indptr, indices, users, items, batch, n)
    ref, ref_labels = assemble_reference(indptr, indices, users, items, batch, n)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(labels, ref_labels)
    # By hand: user 2 = {0,2,5,9}, target 5 -> {0,2,9} at 1/3, w = 3.
    row = out[2]
    np.testing.assert_allclose(row[[0, 2, 9]], 1 / 3, rtol=1e-7)
    assert row[5] == 0 and row[[1, 3, 4, 6, 7, 8]].sum() == 0
    np.testing.assert_allclose(row[10:], [0.3, np.sqrt(0.3), 0.09], rtol=1e-6)
    # The only item is the target: empty input, w clamped to 1.
    assert out[0, :10].sum() == 0
    np.testing.assert_allclose(out[0, 10:], [0.1, np.sqrt(0.1), 0.01], rtol=1e-6)
    # Held-out target not in the row: nothing removed (user 2 keeps all 4 items).
    np.testing.assert_allclose(out[7, [0, 2, 5, 9]], 0.25)
    assert out[7, 7] == 0


def test_partial_last_batch_leaves_the_rest_of_the_buffer_alone():
    indptr, indices, users, items, n = hand_case()
    batch = np.array([3, 1, 2])
    out, labels = run_cpu(indptr, indices, users, items, batch, n, buffer_rows=8)
    ref, ref_labels = assemble_reference(indptr, indices, users, items, batch, n)
    np.testing.assert_allclose(out[:3], ref, rtol=1e-6)
    np.testing.assert_array_equal(labels[:3], ref_labels)
    assert np.isnan(out[3:]).all() and (labels[3:] == -7).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_cases_match_reference(seed):
    indptr, indices, users, items, n = random_case(60, 97, 0.08, seed)
    batch = np.random.default_rng(seed).integers(0, len(users), size=200)
    out, labels = run_cpu(indptr, indices, users, items, batch, n)
    ref, ref_labels = assemble_reference(indptr, indices, users, items, batch, n)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(labels, ref_labels)


def test_seen_ness_comes_from_structure_not_values():
    # Stored values of exactly 0 (a residual of 0, say) still mark the items as seen: the matrix keeps
    # the structure of whatever CSR it is given, and the kernel reads nothing but that structure.
    import scipy.sparse as sp

    from gpu_ann.backend import get_backend
    from gpu_ann.matrix import InteractionMatrix

    values = sp.csr_matrix((np.array([0.0, 2.0, 0.0]), np.array([1, 3, 4]), np.array([0, 3])), shape=(1, 6))
    assert values.nnz == 3
    m = InteractionMatrix.from_scipy(get_backend("cpu"), values)
    assert m.nnz == 3
    out, _ = run_cpu(m.indptr, m.indices, np.array([0], np.int32), np.array([3], np.int32), np.array([0]), 6)
    np.testing.assert_allclose(out[0, :6], [0, 0.5, 0, 0, 0.5, 0])

"""CSR validation (malformed matrices never reach a kernel) and the matrix on the CPU backend."""

import numpy as np
import pytest
import scipy.sparse as sp

from gpu_ann.backend import get_backend
from gpu_ann.matrix import InteractionMatrix, MalformedMatrix, validate_csr


def test_valid_csr_passes_including_empty_rows():
    validate_csr(np.array([0, 0, 2, 2, 3]), np.array([1, 4, 0]), n_rows=4, n_cols=5)
    validate_csr(np.array([0, 0]), np.array([], dtype=np.int32), n_rows=1, n_cols=3)


@pytest.mark.parametrize(
    "indptr, indices, match",
    [
        ([0, 2, 1], [0, 1], "indptr runs from 0 to 1, expected 0 to nnz=2"),
        ([0, 1, 2], [0, 1, 2], "indptr runs from 0 to 2, expected 0 to nnz=3"),
        ([1, 2, 3], [0, 1, 2], "indptr runs from 1"),
        ([0, 2, 3], [0, 5, 1], "row 0 holds column index 5, outside"),
        ([0, 2, 3], [0, 1, -1], "row 1 holds column index -1"),
        ([0, 3, 3], [0, 2, 1], "row 0 has unsorted column indices \\(2 then 1\\)"),
        ([0, 1, 3], [0, 2, 2], "row 1 has duplicate column indices \\(2 then 2\\)"),
        ([0, 1], [0], "indptr has \\(2,\\) entries, expected \\(3,\\)"),
    ],
)
def test_malformed_csr_is_rejected_with_the_row_at_fault(indptr, indices, match):
    with pytest.raises(MalformedMatrix, match=match):
        validate_csr(np.array(indptr), np.array(indices), n_rows=2, n_cols=5)


def test_decreasing_indptr_names_the_row():
    with pytest.raises(MalformedMatrix, match="indptr decreases at row 1: 2 -> 1"):
        validate_csr(np.array([0, 2, 1, 3]), np.array([0, 1, 2]), n_rows=3, n_cols=5)


def test_rows_may_restart_lower_than_the_previous_row_ended():
    # Row 0 ends at item 4, row 1 starts at item 0: sorted within rows, fine.
    validate_csr(np.array([0, 2, 4]), np.array([3, 4, 0, 1]), n_rows=2, n_cols=5)


def test_from_pairs_matches_scipy_and_drops_duplicate_pairs():
    users = np.array([2, 0, 2, 2, 1, 0])
    items = np.array([3, 1, 0, 3, 4, 0])
    m = InteractionMatrix.from_pairs(get_backend("cpu"), users, items, n_users=3, n_items=5)
    assert m.indptr.dtype == np.int64 and m.indices.dtype == np.int32
    np.testing.assert_array_equal(m.indptr, [0, 2, 3, 5])
    np.testing.assert_array_equal(m.indices, [0, 1, 4, 0, 3])
    expected = sp.csr_matrix((np.ones(5), ([0, 0, 1, 2, 2], [0, 1, 4, 0, 3])), shape=(3, 5)).toarray()
    np.testing.assert_array_equal(m.csr.toarray(), expected)
    np.testing.assert_array_equal(m.row(2), [0, 3])


def test_from_scipy_rejects_unsorted_input_before_any_kernel():
    bad = sp.csr_matrix((np.ones(2), np.array([3, 1]), np.array([0, 2])), shape=(1, 5))
    bad.has_sorted_indices = True  # lie about it, as a hand-made matrix might
    with pytest.raises(MalformedMatrix, match="unsorted"):
        InteractionMatrix.from_scipy(get_backend("cpu"), bad)

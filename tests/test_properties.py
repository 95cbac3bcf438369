"""Property-based tests (hypothesis): CSR validation, the CPU assembly kernel and sample-index checks.

Every structure is drawn as a list of rows, each a sorted list of distinct column indices (empty rows
included); invalid structures are made from a valid one by exactly one corruption.
"""

from __future__ import annotations

import re
from unittest import mock

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import assemble_reference

from gpu_ann.backend import get_backend
from gpu_ann.batching import BatchAssembler
from gpu_ann.kernels import assemble as assemble_module
from gpu_ann.kernels.assemble import assemble_rows
from gpu_ann.matrix import InteractionMatrix, MalformedMatrix, validate_csr
from gpu_ann.splits import Samples

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MAX_ROWS = 12
MAX_COLS = 40

# One corruption each: the three that break a row, then the three that break indptr.
ROW_KINDS = ("out_of_range", "unsorted", "duplicate")
INDPTR_KINDS = ("indptr_decreasing", "indptr_end", "indptr_length")
KINDS = ROW_KINDS + INDPTR_KINDS


def to_csr(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(indptr int64, indices int32) for rows given as lists, kept in the given order."""
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(r) for r in rows])
    indices = np.array([i for r in rows for i in r], dtype=np.int32)
    return indptr, indices


@st.composite
def csr_rows(draw, min_rows: int = 1, min_cols: int = 1, target_min_len: int = 0):
    """(rows, n_cols, target): a valid structure; row ``target`` has at least ``target_min_len`` entries."""
    n_rows = draw(st.integers(min_rows, MAX_ROWS))
    n_cols = draw(st.integers(min_cols, MAX_COLS))
    target = draw(st.integers(0, n_rows - 1))
    rows = []
    for r in range(n_rows):
        lo = target_min_len if r == target else 0
        rows.append(sorted(draw(st.sets(st.integers(0, n_cols - 1), min_size=lo, max_size=n_cols))))
    return rows, n_cols, target


@st.composite
def samples_for(draw, rows: list[list[int]], n_cols: int, max_samples: int = 20):
    """(users int32, items int32): users in range, items from the user's row (training) or any item."""
    n = draw(st.integers(1, max_samples))
    users, items = [], []
    for _ in range(n):
        u = draw(st.integers(0, len(rows) - 1))
        if rows[u] and draw(st.booleans()):
            t = draw(st.sampled_from(rows[u]))
        else:
            t = draw(st.integers(0, n_cols - 1))
        users.append(u)
        items.append(t)
    return np.array(users, dtype=np.int32), np.array(items, dtype=np.int32)


@st.composite
def assembly_cases(draw):
    """A valid structure, samples on it, a batch of sample indices and how many spare buffer rows."""
    rows, n_cols, _ = draw(csr_rows())
    users, items = draw(samples_for(rows, n_cols))
    batch = draw(st.lists(st.integers(0, len(users) - 1), max_size=30))
    spare = draw(st.integers(1, 4))
    return rows, n_cols, users, items, np.array(batch, dtype=np.int64), spare


@st.composite
def corrupted(draw, kinds=KINDS):
    """(kind, row, indptr, indices, n_rows, n_cols): a valid structure with exactly one corruption.

    ``row`` is the row at fault for the row kinds, None for the indptr kinds.
    """
    kind = draw(st.sampled_from(kinds))
    rows, n_cols, r = draw(
        csr_rows(
            min_rows=2 if kind == "indptr_decreasing" else 1,
            min_cols=2 if kind == "unsorted" else 1,
            target_min_len={"unsorted": 2, "duplicate": 1}.get(kind, 0),
        )
    )
    n_rows = len(rows)
    rows = [list(row) for row in rows]
    if kind == "out_of_range":
        # Negative values go first and too-large ones last, so the row stays strictly increasing.
        if draw(st.booleans()):
            rows[r].insert(0, draw(st.integers(-(2**31), -1)))
        else:
            rows[r].append(draw(st.integers(n_cols, 2**31 - 1)))
    elif kind == "unsorted":
        i, j = sorted(draw(st.lists(st.integers(0, len(rows[r]) - 1), min_size=2, max_size=2, unique=True)))
        rows[r][i], rows[r][j] = rows[r][j], rows[r][i]
    elif kind == "duplicate":
        i = draw(st.integers(0, len(rows[r]) - 1))
        rows[r].insert(i, rows[r][i])
    indptr, indices = to_csr(rows)
    if kind in ROW_KINDS:
        return kind, r, indptr, indices, n_rows, n_cols
    nnz = len(indices)
    if kind == "indptr_decreasing":
        # An interior pointer moved past its successor or below its predecessor; the ends stay right.
        i = draw(st.integers(1, n_rows - 1))
        step = draw(st.integers(1, 5))
        if draw(st.booleans()):
            indptr[i] = indptr[i + 1] + step
        else:
            indptr[i] = indptr[i - 1] - step
    elif kind == "indptr_end":
        delta = draw(st.integers(-5, 5).filter(lambda d: d != 0))
        if draw(st.booleans()) or -delta > nnz:
            indptr[-1] += delta  # the last pointer moved
        elif delta > 0:
            indices = np.concatenate([indices, np.zeros(delta, dtype=np.int32)])  # stray trailing entries
        else:
            indices = indices[:delta]  # entries missing at the end
    else:  # indptr_length
        if draw(st.booleans()):
            indptr = np.concatenate([indptr, np.full(draw(st.integers(1, 3)), nnz, dtype=np.int64)])
        else:
            indptr = indptr[: draw(st.integers(0, n_rows))]  # one to all entries dropped from the end
    return kind, None, indptr, indices, n_rows, n_cols


def names_row(message: str, row: int) -> bool:
    """Whether ``message`` names ``row`` (and not merely a row whose number starts with the same digits)."""
    return re.search(rf"\brow {row}\b", message) is not None


@SETTINGS
@given(assembly_cases())
def test_cpu_kernel_matches_reference_and_bf16_is_torchs_rounding(case):
    """The CPU kernel equals the slow reference on any valid CSR, samples and batch (fp32, rtol 1e-6),
    its bf16 output is torch's float32 -> bfloat16 conversion of the fp32 output bit for bit, and buffer
    rows past the batch are never written. Both ways of writing a row: whole, and in column chunks (of 1
    and 4 columns here, forced whatever the batch's size)."""
    rows, n_cols, users, items, batch, spare = case
    indptr, indices = to_csr(rows)
    n = len(batch)
    width = n_cols + 3
    ref, ref_labels = assemble_reference(indptr, indices, users, items, batch, n_cols)

    for min_bytes, columns in ((2**62, 1024), (0, 1), (0, 4)):
        with mock.patch.multiple(assemble_module, CPU_CHUNK_MIN_BYTES=min_bytes, CPU_CHUNK_COLUMNS=columns):
            out = np.full((n + spare, width), np.nan, dtype=np.float32)
            labels = np.full(n + spare, -7, dtype=np.int64)
            assemble_rows(indptr, indices, np.empty(0, np.float32), users, items, batch, out, labels, target="cpu")
            np.testing.assert_allclose(out[:n], ref, rtol=1e-6, atol=0)
            np.testing.assert_array_equal(labels[:n], ref_labels)
            assert np.isnan(out[n:]).all() and (labels[n:] == -7).all()

            bits = np.full((n + spare, width), 0xFFFF, dtype=np.uint16)
            labels16 = np.full(n + spare, -7, dtype=np.int64)
            assemble_rows(indptr, indices, np.empty(0, np.float32), users, items, batch, bits, labels16, target="cpu")
            expected = torch.from_numpy(np.ascontiguousarray(out[:n])).to(torch.bfloat16).view(torch.uint16).numpy()
            np.testing.assert_array_equal(bits[:n], expected)
            np.testing.assert_array_equal(labels16[:n], ref_labels)
            assert (bits[n:] == 0xFFFF).all() and (labels16[n:] == -7).all()


@settings(max_examples=150, deadline=None)
@given(csr_rows(), st.sampled_from([np.int32, np.int64]))
def test_validate_csr_accepts_every_valid_structure(structure, dtype):
    """``validate_csr`` accepts any valid structure (empty rows, full rows, either index dtype), and
    ``from_scipy`` keeps such a structure exactly."""
    rows, n_cols, _ = structure
    indptr, indices = to_csr(rows)
    validate_csr(indptr.astype(dtype), indices.astype(dtype), len(rows), n_cols)
    host = sp.csr_matrix((np.ones(len(indices), np.float32), indices, indptr), shape=(len(rows), n_cols))
    m = InteractionMatrix.from_scipy(get_backend("cpu"), host)
    np.testing.assert_array_equal(m.indptr, indptr)
    np.testing.assert_array_equal(m.indices, indices)


@settings(max_examples=200, deadline=None)
@given(corrupted())
def test_validate_csr_rejects_each_single_corruption(case):
    """``validate_csr`` raises ``MalformedMatrix`` for every single corruption (index out of range,
    unsorted row, duplicate in a row, decreasing indptr, indptr not ending at nnz, indptr of the wrong
    length), and for a corrupt row the message names that row."""
    kind, row, indptr, indices, n_rows, n_cols = case
    with pytest.raises(MalformedMatrix) as info:
        validate_csr(indptr, indices, n_rows, n_cols)
    if kind in ROW_KINDS:
        assert names_row(str(info.value), row), f"{kind}: {info.value!r} does not name row {row}"


@SETTINGS
@given(corrupted(kinds=ROW_KINDS + ("indptr_decreasing",)))
def test_from_scipy_rejects_corrupt_matrices_before_any_kernel_runs(case):
    """A scipy CSR with one corruption makes ``InteractionMatrix.from_scipy`` raise ``MalformedMatrix``,
    and no assembly kernel is ever launched on it.

    Only the corruptions scipy's constructor lets through are drawn: it refuses an indptr of the wrong
    length or one ending past nnz itself (ValueError), and silently drops entries past ``indptr[-1]``.
    """
    kind, row, indptr, indices, n_rows, n_cols = case
    host = sp.csr_matrix((np.ones(len(indices), np.float32), indices, indptr), shape=(n_rows, n_cols))
    with (
        mock.patch.object(assemble_module, "assemble_rows_cpu") as kernel,
        mock.patch.object(assemble_module, "assemble_rows") as launcher,
    ):
        with pytest.raises(MalformedMatrix) as info:
            m = InteractionMatrix.from_scipy(get_backend("cpu"), host)
            samples = Samples(np.zeros(1, np.int32), np.zeros(1, np.int32))
            assembler = BatchAssembler(m, samples, max_rows=1)
            assembler.assemble(assembler.to_device_indices(np.zeros(1, np.int64)))
        kernel.assert_not_called()
        launcher.assert_not_called()
    if kind in ROW_KINDS:
        assert names_row(str(info.value), row)


@SETTINGS
@given(st.data())
def test_sample_indices_out_of_range_raise_index_error_else_match_reference(data):
    """``BatchAssembler.to_device_indices`` raises ``IndexError`` exactly when some index lies outside
    ``[0, n_samples)``; otherwise the assembled batch equals the reference."""
    rows, n_cols, _ = data.draw(csr_rows(), label="structure")
    users, items = data.draw(samples_for(rows, n_cols), label="samples")
    n_samples = len(users)
    index = st.one_of(
        st.integers(-3, n_samples + 2),
        st.integers(0, n_samples - 1),
        st.integers(-(2**40), 2**40),
    )
    order = np.array(data.draw(st.lists(index, max_size=30), label="order"), dtype=np.int64)
    indptr, indices = to_csr(rows)
    host = sp.csr_matrix((np.ones(len(indices), np.float32), indices, indptr), shape=(len(rows), n_cols))
    m = InteractionMatrix.from_scipy(get_backend("cpu"), host)
    assembler = BatchAssembler(m, Samples(users, items), max_rows=max(len(order), 1))

    if ((order < 0) | (order >= n_samples)).any():
        with pytest.raises(IndexError):
            assembler.to_device_indices(order)
        return
    X, y = assembler.assemble(assembler.to_device_indices(order))
    ref, ref_labels = assemble_reference(indptr, indices, users, items, order, n_cols)
    assert tuple(X.shape) == (len(order), n_cols + 3)
    np.testing.assert_allclose(X.numpy(), ref, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(y.numpy(), ref_labels)

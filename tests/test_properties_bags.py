"""Property-based tests (hypothesis) of the sparse input path: ``BagAssembler`` on the CPU backend, and on
the CUDA launch path with the CUDA bag kernels under the simulator (second pass, ``NUMBA_ENABLE_CUDASIM=1``).

Structures are drawn with ``test_properties``' strategies (random valid CSR, empty rows included; one
corruption at a time for the invalid ones). Every batch of bags is densified by a slow loop written here
and compared with ``reference.assemble_reference``, the dense path's reference, so the bags are checked
against the same definition of an input row as the dense kernel.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from cases import SimBackend
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import assemble_reference
from test_properties import ROW_KINDS, SETTINGS, corrupted, csr_rows, names_row, samples_for, to_csr

import gpu_ann.bags as bags_module
import gpu_ann.kernels.bag_inputs as bag_kernels
from gpu_ann.backend import get_backend
from gpu_ann.bags import BagAssembler
from gpu_ann.matrix import InteractionMatrix, MalformedMatrix
from gpu_ann.splits import Samples

# Finite float32 values, zero included (a stored 0 is still a seen item), none so small that v / w would
# fall into the subnormals and lose the relative precision the comparison asks for.
VALUES = st.floats(-1e3, 1e3, width=32).filter(lambda v: v == 0 or abs(v) >= 1e-6)


def densify_slowly(bags, n_items: int) -> np.ndarray:
    """Dense float64 rows from one ``Bags``, an entry at a time; a repeated item would add up (and show)."""
    offsets, indices, weights = bags.offsets.numpy(), bags.indices.numpy(), bags.weights.numpy()
    features = bags.features.numpy()
    X = np.zeros((len(offsets) - 1, n_items + 3))
    for r in range(len(offsets) - 1):
        for j in range(offsets[r], offsets[r + 1]):
            X[r, indices[j]] += weights[j]
        X[r, n_items:] = features[r]
    return X


def check_layout(bags, n_rows: int, n_items: int) -> None:
    """The shapes and dtypes torch's ``embedding_bag`` expects, and bags that are sorted sets of items."""
    offsets, indices = bags.offsets.numpy(), bags.indices.numpy()
    assert bags.indices.dtype == bags.offsets.dtype == bags.labels.dtype == torch.int64
    assert bags.weights.dtype == bags.features.dtype == torch.float32
    assert offsets.shape == (n_rows + 1,) and bags.features.shape == (n_rows, 3) and bags.labels.shape == (n_rows,)
    assert offsets[0] == 0 and (np.diff(offsets) >= 0).all()
    assert offsets[-1] == len(indices) == len(bags.weights)
    assert ((indices >= 0) & (indices < n_items)).all()
    for r in range(n_rows):
        assert (np.diff(indices[offsets[r] : offsets[r + 1]]) > 0).all()  # ascending, no repeats


def cpu_matrix(rows: list[list[int]], n_cols: int, values: np.ndarray | None) -> InteractionMatrix:
    indptr, indices = to_csr(rows)
    data = np.ones(len(indices), np.float32) if values is None else values
    host = sp.csr_matrix((data, indices, indptr), shape=(len(rows), n_cols))
    return InteractionMatrix.from_scipy(get_backend("cpu"), host, values=values is not None)


@contextlib.contextmanager
def no_bag_kernel():
    """Replace every entry to the bag kernels (launchers, CPU twins, the CUDA builder) with mocks."""
    targets = [
        (bags_module, "bag_inputs"),
        (bags_module, "bag_lengths"),
        (bag_kernels, "bag_inputs"),
        (bag_kernels, "bag_lengths"),
        (bag_kernels, "bag_inputs_cpu"),
        (bag_kernels, "bag_lengths_cpu"),
        (bag_kernels, "cuda_kernels"),
    ]
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(mock.patch.object(module, name)) for module, name in targets]


# The simulator runs each CUDA thread as a Python thread: few examples (the strategies' sizes are tiny already).
SIM_SETTINGS = settings(SETTINGS, max_examples=15)


@st.composite
def bag_cases(draw):
    """A valid structure, optional values, samples on it (some without a target), an order and a batch size."""
    rows, n_cols, _ = draw(csr_rows())
    nnz = sum(len(r) for r in rows)
    values = None
    if draw(st.booleans()):
        values = np.array(draw(st.lists(VALUES, min_size=nnz, max_size=nnz)), dtype=np.float32)
    users, items = draw(samples_for(rows, n_cols))
    allow_no_target = draw(st.booleans())
    if allow_no_target:
        # Item -1: nothing is removed from the row (the recommend path's samples).
        no_target = np.array(draw(st.lists(st.booleans(), min_size=len(items), max_size=len(items))))
        items = np.where(no_target, -1, items).astype(np.int32)
    order = np.array(draw(st.lists(st.integers(0, len(users) - 1), min_size=1, max_size=30)), dtype=np.int64)
    max_rows = draw(st.integers(1, 8))
    return rows, n_cols, values, users, items, allow_no_target, order, max_rows


@SETTINGS
@given(bag_cases())
def test_bags_densify_to_the_reference_rows(case):
    """On any valid CSR (empty rows included), with or without values, the bags of every batch of an order
    (a partial last batch included) densify to ``assemble_reference``'s rows (rtol 1e-6) and labels; the
    bags are sorted sets of in-range items laid out as ``embedding_bag`` needs; and the per-sample bag
    lengths the assembler keeps on the host are the reference's."""
    check_bags_of_every_batch(case, cpu_matrix(*case[:3]))


def check_bags_of_every_batch(case, matrix: InteractionMatrix) -> list:
    """Assemble every batch of the case's order on ``matrix`` and check it against the reference; returns
    the batches as numpy arrays."""
    rows, n_cols, values, users, items, allow_no_target, order, max_rows = case
    indptr, indices = to_csr(rows)
    assembler = BagAssembler(matrix, Samples(users, items), max_rows, allow_no_target=allow_no_target)

    expected_lengths = [sum(1 for i in rows[u] if i != t) for u, t in zip(users, items)]
    np.testing.assert_array_equal(assembler.sample_bag_lengths, expected_lengths)

    device_order = assembler.to_device_indices(order)
    batches = []
    for start in range(0, len(order), max_rows):
        batch = order[start : start + max_rows]
        got = assembler.assemble(device_order[start : start + max_rows])
        check_layout(got, len(batch), n_cols)
        ref, ref_labels = assemble_reference(indptr, indices, users, items, batch, n_cols, values=values)
        np.testing.assert_allclose(densify_slowly(got, n_cols), ref, rtol=1e-6, atol=0)
        np.testing.assert_array_equal(got.labels.numpy(), ref_labels)
        batches.append([t.numpy().copy() for t in got])
    return batches


@pytest.mark.cudasim
@SIM_SETTINGS
@given(bag_cases())
def test_cuda_bag_kernels_densify_to_the_reference_rows(case):
    """The same property on the CUDA launch path: ``BagAssembler`` on a numpy stand-in for the cuda backend
    launches the CUDA bag kernels (lengths, scan, fill; and the lengths pass of the host table) under the
    simulator, with 4-thread blocks and a 3-block grid so that rows span strides, the grid-stride loops
    run and the scan has several chunks. Besides the reference, every batch equals the CPU twin's bit for
    bit (the same float32 arithmetic)."""
    rows, n_cols, values = case[:3]
    indptr, indices = to_csr(rows)
    on_sim = InteractionMatrix(SimBackend(), indptr, indices, len(rows), n_cols, values)
    # Patched here, not by a fixture: hypothesis runs every example inside one function-scoped fixture.
    with (
        mock.patch.object(bag_kernels, "THREADS_PER_BLOCK", 4),
        mock.patch.object(bag_kernels, "MAX_BLOCKS", 3),
        mock.patch.object(bags_module, "_torch_stream", lambda device: 0),
    ):
        sim = check_bags_of_every_batch(case, on_sim)
    cpu = check_bags_of_every_batch(case, cpu_matrix(*case[:3]))
    for got, expected in zip(sim, cpu, strict=True):
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a, b)


@SETTINGS
@given(st.data())
def test_samples_and_orders_out_of_range_raise_index_error_before_any_kernel(data):
    """``BagAssembler`` raises ``IndexError`` exactly when a sample's user lies outside ``[0, n_users)`` or
    its item outside ``[0, n_items)`` (``[-1, n_items)`` with ``allow_no_target``), and
    ``to_device_indices`` exactly when an index lies outside ``[0, n_samples)``; neither launches a bag
    kernel. Otherwise the bags densify to the reference."""
    rows, n_cols, _ = data.draw(csr_rows(), label="structure")
    n_users = len(rows)
    allow_no_target = data.draw(st.booleans(), label="allow_no_target")
    n = data.draw(st.integers(1, 12), label="n_samples")
    edge = st.sampled_from([-(2**31), -2, -1, 2**31 - 1])
    users = data.draw(st.lists(st.one_of(st.integers(-2, n_users + 1), edge), min_size=n, max_size=n), label="users")
    items = data.draw(st.lists(st.one_of(st.integers(-2, n_cols + 1), edge), min_size=n, max_size=n), label="items")
    users, items = np.array(users, np.int32), np.array(items, np.int32)
    lowest = -1 if allow_no_target else 0
    matrix = cpu_matrix(rows, n_cols, None)

    if ((users < 0) | (users >= n_users) | (items < lowest) | (items >= n_cols)).any():
        with no_bag_kernel() as mocks, pytest.raises(IndexError):
            BagAssembler(matrix, Samples(users, items), n, allow_no_target=allow_no_target)
        for m in mocks:
            m.assert_not_called()
        return

    assembler = BagAssembler(matrix, Samples(users, items), n, allow_no_target=allow_no_target)
    index = st.one_of(st.integers(-3, n + 2), st.integers(0, n - 1), st.integers(-(2**40), 2**40))
    order = np.array(data.draw(st.lists(index, min_size=1, max_size=n), label="order"), dtype=np.int64)
    if ((order < 0) | (order >= n)).any():
        with no_bag_kernel() as mocks, pytest.raises(IndexError):
            assembler.assemble(assembler.to_device_indices(order))
        for m in mocks:
            m.assert_not_called()
        return
    got = assembler.assemble(assembler.to_device_indices(order))
    indptr, indices = to_csr(rows)
    ref, ref_labels = assemble_reference(indptr, indices, users, items, order, n_cols)
    np.testing.assert_allclose(densify_slowly(got, n_cols), ref, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(got.labels.numpy(), ref_labels)


@SETTINGS
@given(corrupted(kinds=ROW_KINDS + ("indptr_decreasing",)), st.sampled_from(["from_scipy", "from_csr"]), st.booleans())
def test_malformed_scipy_csr_is_refused_before_any_bag_kernel(case, entry, with_values):
    """A scipy CSR with one corruption makes ``InteractionMatrix.from_scipy`` and ``from_csr`` raise
    ``MalformedMatrix`` (naming the row at fault for a corrupt row), with or without values, and no bag
    kernel is ever launched on it. Only the corruptions scipy's own constructor lets through are drawn
    (see ``test_properties``)."""
    kind, row, indptr, indices, n_rows, n_cols = case
    data = np.linspace(-1, 1, len(indices), dtype=np.float32)
    host = sp.csr_matrix((data, indices, indptr), shape=(n_rows, n_cols))
    with no_bag_kernel() as mocks:
        with pytest.raises(MalformedMatrix) as info:
            matrix = getattr(InteractionMatrix, entry)(get_backend("cpu"), host, values=with_values)
            assembler = BagAssembler(matrix, Samples(np.zeros(1, np.int32), np.zeros(1, np.int32)), 1)
            assembler.assemble(assembler.to_device_indices(np.zeros(1, np.int64)))
    for m in mocks:
        m.assert_not_called()
    if kind in ROW_KINDS:
        assert names_row(str(info.value), row), f"{kind}: {info.value!r} does not name row {row}"


class _DeviceArray:
    """A host array posing as a CuPy one: ``get()`` is the device -> host copy."""

    def __init__(self, array: np.ndarray) -> None:
        self._array = array

    def get(self) -> np.ndarray:
        return self._array.copy()


class _DeviceCsr:
    """The part of a cupyx CSR that ``from_csr`` reads before it validates: no scipy constructor in between,
    so every corruption, the indptr ones included, reaches the validation."""

    def __init__(self, indptr, indices, shape) -> None:
        self.indptr, self.indices, self.shape = _DeviceArray(indptr), _DeviceArray(indices), shape

    def tocsr(self):
        return self

    def get(self):  # cupyx matrices have it; from_csr tells them from scipy by it
        raise AssertionError("from_csr must validate the structure, not copy the whole matrix")


class _CudaNamedBackend:
    """Only what ``from_csr`` looks at before validating: the name, and numpy as the array module."""

    name = "cuda"
    xp = np


@SETTINGS
@given(corrupted())
def test_malformed_device_csr_is_refused_by_from_csr_before_any_bag_kernel(case):
    """A cupyx-like CSR with any single corruption (index out of range, unsorted or duplicate in a row,
    decreasing indptr, indptr not ending at nnz, indptr of the wrong length) is refused by ``from_csr``'s
    host-side validation, before a bag kernel could see it."""
    kind, row, indptr, indices, n_rows, n_cols = case
    with no_bag_kernel() as mocks:
        with pytest.raises(MalformedMatrix) as info:
            InteractionMatrix.from_csr(_CudaNamedBackend(), _DeviceCsr(indptr, indices, (n_rows, n_cols)))
    for m in mocks:
        m.assert_not_called()
    if kind in ROW_KINDS:
        assert names_row(str(info.value), row), f"{kind}: {info.value!r} does not name row {row}"


def test_an_empty_batch_has_offsets_zero():
    """``Bags`` promise ``offsets[B] == total``: for ``B = 0`` that is ``offsets == [0]``, even in buffers no
    batch has written yet. torch's deterministic mode fills fresh (``torch.empty``) memory with a marker
    value, so this does not depend on what the allocator happened to return."""
    matrix = cpu_matrix([[0, 2], [], [1]], 3, None)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assembler = BagAssembler(matrix, Samples(np.array([0, 1], np.int32), np.array([2, 0], np.int32)), 4)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    got = assembler.assemble(assembler.to_device_indices(np.zeros(0, np.int64)))
    assert got.indices.numel() == got.features.shape[0] == got.labels.numel() == 0
    assert got.offsets.tolist() == [0]

"""Zero-copy hand-off: the tensors torch reads are the buffers the kernels wrote, reused every batch."""

import numpy as np
import torch
from reference import assemble_reference

from gpu_ann.backend import get_backend
from gpu_ann.batching import BatchAssembler
from gpu_ann.loader import BatchLoader
from gpu_ann.matrix import InteractionMatrix
from gpu_ann.splits import Samples


def small_setup(batch_size=4):
    users = np.array([0, 0, 1, 2, 2, 2, 3], dtype=np.int32)
    items = np.array([1, 3, 0, 0, 2, 4, 3], dtype=np.int32)
    matrix = InteractionMatrix.from_pairs(get_backend("cpu"), users, items, 4, 5)
    return matrix, Samples(users, items)


def test_torch_tensor_shares_the_kernel_buffer():
    matrix, samples = small_setup()
    asm = BatchAssembler(matrix, samples, 4)
    X, y = asm.assemble(asm.to_device_indices(np.array([0, 3, 6])))
    assert X.data_ptr() == asm.buffers.X_kernel.ctypes.data
    assert y.data_ptr() == asm.buffers.y_kernel.ctypes.data
    assert X.shape == (3, 8) and y.dtype == torch.int64
    ref, labels = assemble_reference(matrix.indptr, matrix.indices, samples.user, samples.item, [0, 3, 6], 5)
    np.testing.assert_allclose(X.numpy(), ref, rtol=1e-6)
    np.testing.assert_array_equal(y.numpy(), labels)


def test_loader_reuses_one_buffer_and_covers_each_sample_once_per_epoch():
    matrix, samples = small_setup()
    loader = BatchLoader(matrix, samples, batch_size=3, seed=1)
    assert len(loader) == 3  # 7 samples: 3 + 3 + 1
    pointers, seen = set(), []
    for X, y in loader:
        pointers.add(X.data_ptr())
        seen.extend(y.tolist())
    assert pointers == {loader.assembler.buffers.X.data_ptr()}
    assert sorted(seen) == sorted(samples.item.tolist())
    # The next epoch draws another order from the same seed stream, reproducibly.
    assert not np.array_equal(loader.epoch_order(0), loader.epoch_order(1))
    np.testing.assert_array_equal(loader.epoch_order(1), BatchLoader(matrix, samples, 3, seed=1).epoch_order(1))


def test_drop_last_and_replacement():
    matrix, samples = small_setup()
    assert len(BatchLoader(matrix, samples, 3, drop_last=True)) == 2
    order = BatchLoader(matrix, samples, 3, replacement=True, seed=3).epoch_order(0)
    assert len(order) == 7 and order.min() >= 0 and order.max() < 7


def test_sample_indices_out_of_range_are_refused():
    import pytest

    matrix, samples = small_setup()
    asm = BatchAssembler(matrix, samples, 4)
    with pytest.raises(IndexError, match=r"\[0, 7\)"):
        asm.to_device_indices(np.array([0, 7]))
    with pytest.raises(IndexError, match="item 9"):
        BatchAssembler(matrix, Samples(np.array([0], np.int32), np.array([9], np.int32)), 4)

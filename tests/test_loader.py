"""The public BatchLoader: built from ratings or a CSR, torch-iterable, zero copy, closable."""

import gc
import weakref

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from reference import assemble_reference
from torch.utils.data import DataLoader

from gpu_ann.data.table import RatingsTable
from gpu_ann.loader import Batch, BatchLoader
from gpu_ann.matrix import MalformedMatrix


def table(n_users=30, n_items=20, per_user=5, seed=0):
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), per_user).astype(np.int32)
    items = np.concatenate([rng.choice(n_items, per_user, replace=False) for _ in range(n_users)]).astype(np.int32)
    return RatingsTable(users, items, None, None, np.arange(n_users), np.arange(n_items), None, source="t")


def test_from_ratings_iterates_every_training_sample_once_per_epoch_with_reference_rows():
    t = table()
    with BatchLoader.from_ratings(t, batch_size=16, backend="cpu", seed=2) as loader:
        assert len(loader) == 8 and loader.n_items == 20 and loader.n_features == 23  # 120 samples / 16
        m = loader.matrix
        order = loader.epoch_order(0)
        users, items = loader.assembler._users, loader.assembler._items  # host arrays on the cpu backend
        labels, start = [], 0
        for batch in loader:
            assert isinstance(batch, Batch)
            X, y = batch
            ref, ref_y = assemble_reference(m.indptr, m.indices, users, items, order[start : start + len(y)], 20)
            np.testing.assert_allclose(X.numpy(), ref, rtol=1e-6)
            np.testing.assert_array_equal(y.numpy(), ref_y)
            labels += y.tolist()
            start += len(y)
        assert start == loader.n_samples == 120  # 80% of 150 interactions
        assert loader.epoch == 1  # iteration advanced the epoch


def test_from_csr_with_bf16_output_and_validation():
    csr = sp.random(10, 40, density=0.2, format="csr", random_state=3)
    csr.sum_duplicates()
    coo = csr.tocoo()
    loader = BatchLoader.from_csr(
        csr, coo.row, coo.col, batch_size=8, backend="cpu", dtype=torch.bfloat16, shuffle=False
    )
    X, y = next(iter(loader))
    assert X.dtype == torch.bfloat16 and X.shape == (8, 43)
    ref, ref_y = assemble_reference(csr.indptr, csr.indices, coo.row, coo.col, np.arange(8), 40)
    assert torch.equal(X, torch.from_numpy(ref.astype(np.float32)).to(torch.bfloat16))
    np.testing.assert_array_equal(y.numpy(), ref_y)
    bad = sp.csr_matrix((np.ones(2), np.array([5, 99]), np.array([0, 2])), shape=(1, 40))
    with pytest.raises(MalformedMatrix, match="column index 99"):
        BatchLoader.from_csr(bad, [0], [5], backend="cpu")


def test_torch_dataloader_with_batch_size_none_passes_batches_through_without_copies():
    loader = BatchLoader.from_ratings(table(), batch_size=16, backend="cpu", seed=1)
    direct = [y.clone() for _, y in loader]
    loader.set_epoch(0)
    via_torch = []
    for X, y in DataLoader(loader, batch_size=None):
        assert X.data_ptr() == loader.buffers.X.data_ptr()
        via_torch.append(y.clone())
    assert len(via_torch) == len(direct) == len(loader)
    assert all(torch.equal(a, b) for a, b in zip(direct, via_torch))


def test_torch_dataloader_that_would_collate_our_batches_is_refused():
    loader = BatchLoader.from_ratings(table(), batch_size=16, backend="cpu")
    with pytest.raises(TypeError, match=r"DataLoader\(loader, batch_size=None\)"):
        next(iter(DataLoader(loader, batch_size=4)))


def test_worker_processes_are_refused():
    loader = BatchLoader.from_ratings(table(), batch_size=16, backend="cpu")
    with pytest.raises(RuntimeError, match="num_workers=0"):
        next(iter(DataLoader(loader, batch_size=None, num_workers=1)))


def test_close_releases_the_buffers_and_closed_loaders_refuse_to_iterate():
    loader = BatchLoader.from_ratings(table(), batch_size=16, backend="cpu")
    buffer = weakref.ref(loader.buffers.X)
    with loader:
        next(iter(loader))
    gc.collect()
    assert buffer() is None
    with pytest.raises(RuntimeError, match="closed"):
        iter(loader).__next__()
    assert "closed" in repr(loader)


def test_set_epoch_makes_orders_reproducible():
    a = BatchLoader.from_ratings(table(), batch_size=16, backend="cpu", seed=5)
    b = BatchLoader.from_ratings(table(), batch_size=16, backend="cpu", seed=5)
    b.set_epoch(3)
    a.set_epoch(3)
    assert [y.tolist() for _, y in a] == [y.tolist() for _, y in b]
    np.testing.assert_array_equal(a.epoch_order(7), b.epoch_order(7))
    assert not np.array_equal(a.epoch_order(7), a.epoch_order(8))


def test_starting_mid_epoch_yields_the_tail_of_the_same_epoch():
    loader = BatchLoader.from_ratings(table(), batch_size=16, backend="cpu", seed=4)
    loader.set_epoch(2)
    whole = [y.clone() for _, y in loader]
    loader.set_epoch(2, start_batch=3)
    tail = [y.clone() for _, y in loader]
    assert len(tail) == len(whole) - 3 and all(torch.equal(a, b) for a, b in zip(whole[3:], tail))
    loader.set_epoch(2, start_batch=len(loader))
    assert list(loader) == []
    with pytest.raises(ValueError, match="start_batch must be in"):
        loader.set_epoch(0, start_batch=-1)

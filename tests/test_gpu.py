"""The CUDA backend on a real GPU (marked gpu: skipped, with the reason, where there is none)."""

import numpy as np
import pytest
import torch
from cases import random_case
from reference import assemble_reference

pytestmark = pytest.mark.gpu


def cuda_setup(seed=0, n_users=300, n_items=2000, density=0.02):
    from gpu_ann.backend import get_backend
    from gpu_ann.batching import BatchAssembler
    from gpu_ann.matrix import InteractionMatrix
    from gpu_ann.splits import Samples

    indptr, indices, users, items, n = random_case(n_users, n_items, density, seed)
    import scipy.sparse as sp

    host = sp.csr_matrix((np.ones(len(indices), np.float32), indices, indptr), shape=(n_users, n_items))
    matrix = InteractionMatrix.from_scipy(get_backend("cuda"), host)
    asm = BatchAssembler(matrix, Samples(users, items), 512)
    return asm, (indptr, indices, users, items, n)


def test_cuda_kernel_matches_reference_and_shares_the_buffer():
    asm, (indptr, indices, users, items, n) = cuda_setup()
    batch = np.random.default_rng(1).integers(0, len(users), size=300)
    X, y = asm.assemble(asm.to_device_indices(batch))
    assert X.is_cuda and X.data_ptr() == asm.buffers.X_kernel.__cuda_array_interface__["data"][0]
    assert y.data_ptr() == asm.buffers.y_kernel.__cuda_array_interface__["data"][0]
    ref, labels = assemble_reference(indptr, indices, users, items, batch, n)
    np.testing.assert_allclose(X.cpu().numpy(), ref, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(y.cpu().numpy(), labels)


def test_batch_built_on_a_side_stream_is_consumed_correctly():
    asm, (indptr, indices, users, items, n) = cuda_setup(seed=2)
    side = torch.cuda.Stream()
    batches = [np.random.default_rng(s).integers(0, len(users), size=500) for s in range(4)]
    sums = []
    with torch.cuda.stream(side):
        for batch in batches:
            X, y = asm.assemble(asm.to_device_indices(batch))
            # Consumed on the same (side) stream before the next batch overwrites the buffer.
            sums.append((X.double().sum(dim=1), y.clone()))
    torch.cuda.synchronize()
    for batch, (row_sums, labels) in zip(batches, sums):
        ref, ref_labels = assemble_reference(indptr, indices, users, items, batch, n)
        np.testing.assert_allclose(row_sums.cpu().numpy(), ref.sum(axis=1), rtol=1e-5)
        np.testing.assert_array_equal(labels.cpu().numpy(), ref_labels)


def test_training_on_cuda_beats_popularity(tmp_path):
    from test_train import real_slice

    from gpu_ann.data.readers import load_bundled_anime
    from gpu_ann.train import TrainConfig, train

    table = real_slice(load_bundled_anime(), 2000, 500)
    cfg = TrainConfig(
        backend="cuda",
        out=str(tmp_path),
        batch_size=256,
        hidden=(64, 128, 64),
        lr=2e-3,
        eval_every=50,
        eval_batches=4,
        max_epochs=2,
        seed=3,
    )
    result = train(cfg, table)
    assert result.final_validation_loss < result.popularity_validation_loss - 0.1, result

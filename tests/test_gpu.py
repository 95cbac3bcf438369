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
            device_batch = asm.to_device_indices(batch)
            # Keep the side stream busy, then poison the buffer on it: a kernel launched on any other
            # stream would run before the poison lands and the consumer would see NaN.
            torch.cuda._sleep(50_000_000)
            asm.buffers.X.fill_(float("nan"))
            X, y = asm.assemble(device_batch)
            sums.append((X.double().sum(dim=1), y.clone()))
    torch.cuda.synchronize()
    for batch, (row_sums, labels) in zip(batches, sums):
        ref, ref_labels = assemble_reference(indptr, indices, users, items, batch, n)
        np.testing.assert_allclose(row_sums.cpu().numpy(), ref.sum(axis=1), rtol=1e-5)
        np.testing.assert_array_equal(labels.cpu().numpy(), ref_labels)


def test_training_steps_do_not_synchronise_through_torch():
    import torch.nn.functional as F

    from gpu_ann.model import CandidateGenerator

    asm, (_, _, users, _, n) = cuda_setup(seed=3)
    model = CandidateGenerator(n, (64, 64, 64)).cuda()
    opt = model.configure_optimizer()
    batches = [asm.to_device_indices(np.random.default_rng(s).integers(0, len(users), 256)) for s in range(5)]
    ptrs = set()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any torch-side host-device sync now raises
    try:
        for device_batch in batches:
            X, y = asm.assemble(device_batch)
            ptrs.add(X.data_ptr())
            loss = F.cross_entropy(model(X), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert ptrs == {asm.buffers.X.data_ptr()}  # one buffer, reused: no per-step allocation
    assert torch.isfinite(loss).item()


def test_training_on_cuda_beats_popularity(tmp_path):
    from test_train import real_slice

    from gpu_ann.data.readers import load_bundled_anime
    from gpu_ann.training import TrainConfig, train

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

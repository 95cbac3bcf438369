"""The scale features on a real GPU: the sparse input path, the sampled softmax and bf16, against the CPU backend
(marked gpu: skipped, with the reason, where there is none).

Sizes are small: these check that the CUDA backend computes what the CPU backend computes, that a batch of bags
follows torch's stream, and that a sparse, sampled training step never waits for the device, not speed.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from gpu_ann.backend import get_backend
from gpu_ann.bags import BagAssembler, Bags
from gpu_ann.checkpoint import load_checkpoint
from gpu_ann.data.table import RatingsTable
from gpu_ann.loader import BatchLoader
from gpu_ann.matrix import InteractionMatrix
from gpu_ann.model import CandidateGenerator
from gpu_ann.objective import Objective
from gpu_ann.sampled import NegativeSampler
from gpu_ann.splits import Samples
from gpu_ann.training import TrainConfig, train

pytestmark = pytest.mark.gpu

PATHS = ["dense", "sparse"]
# Final validation loss, CUDA against CPU, same run. fp32: the same function summed in another order
# (cuBLAS and CUDA embedding_bag against the CPU's kernels, TF32 off by torch's default), which stays
# near float32 rounding (~1e-6) through the run's Adam steps; 1e-4 leaves a margin without hiding a
# wrong batch or gradient, which moves the loss by percents. bf16: each product keeps 8 mantissa bits
# (2**-8 = 0.4%) and the two backends round different partial sums, so about 1%.
FULL_SOFTMAX_TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2}


def clustered_table(n_users=240, n_groups=4, block=30, per_user=12, seed=0) -> RatingsTable:
    """Users in groups, each picking items from its own block of the catalogue: learnable beyond popularity."""
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), per_user).astype(np.int32)
    items = np.concatenate(
        [(u % n_groups) * block + rng.choice(block, per_user, replace=False) for u in range(n_users)]
    )
    n_items = n_groups * block
    return RatingsTable(
        user=users,
        item=items.astype(np.int32),
        rating=None,
        timestamp=None,
        user_ids=np.arange(n_users),
        item_ids=np.arange(n_items),
        item_titles=None,
        source="clustered",
    )


def config(tmp_path, name: str, **kw) -> TrainConfig:
    # One evaluation, at the last step: the best model is the last one on both backends, so the final
    # losses compare the same weights even where two evaluations of one run would be within the tolerance.
    settings = dict(hidden=(32, 32, 32), batch_size=64, lr=0.01, max_steps=60, eval_every=60, eval_batches=3,
                    patience=100, seed=5)  # fmt: skip
    return TrainConfig(out=str(tmp_path / name), **{**settings, **kw})


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("path", PATHS)
def test_full_softmax_training_on_cuda_matches_the_cpu(tmp_path, path, precision):
    t = clustered_table()
    cpu = train(config(tmp_path, "cpu", backend="cpu", input_path=path, precision=precision), t)
    cuda = train(config(tmp_path, "cuda", backend="cuda", input_path=path, precision=precision), t)
    assert cpu.steps == cuda.steps == 60
    rel = FULL_SOFTMAX_TOLERANCE[precision]
    assert cuda.final_validation_loss == pytest.approx(cpu.final_validation_loss, rel=rel)
    (a,), (b,) = cpu.history, cuda.history
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=rel)
    assert b["validation_loss"] == pytest.approx(a["validation_loss"], rel=rel)
    # The runs compared have trained: from about log(120) = 4.79 nats (the initial, near-uniform softmax) to
    # 3.5 on the CPU (measured), far past the tolerance, where the loss has flattened enough that rounding
    # differences are not amplified by a steep stretch of the curve.
    assert cpu.final_validation_loss < np.log(t.n_items) - 0.5


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("path", PATHS)
def test_sampled_softmax_on_cuda_repeats_bit_for_bit_and_beats_popularity(tmp_path, path, precision):
    # The sampler's generator lives on the device, so CUDA draws other negatives than the CPU and the two
    # backends' runs are not comparable step by step. What must hold instead: deterministic mode repeats a
    # CUDA run exactly, and the run learns what popularity cannot.
    t = clustered_table()
    kw = dict(backend="cuda", input_path=path, precision=precision, softmax="sampled", negatives=16,
              negative_sampling="popularity", deterministic=True, max_steps=200, eval_every=200)  # fmt: skip
    first = train(config(tmp_path, "first", **kw), t)
    again = train(config(tmp_path, "again", **kw), t)
    assert first.steps == again.steps == 200
    a, b = load_checkpoint(first.run_dir).model_state, load_checkpoint(again.run_dir).model_state
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert again.final_validation_loss == first.final_validation_loss
    # Popularity is about log(120) = 4.8 nats on this table; the same settings on the CPU (other draws) reach
    # 3.56-3.63 for seeds 5-7 on either path and precision (measured).
    assert first.final_validation_loss < first.popularity_validation_loss - 0.5, first


def test_lazy_adam_on_cuda_repeats_bit_for_bit_and_beats_popularity(tmp_path):
    # Lazy Adam's sparse gradients on the device (embedding_bag's and the sampled rows' gathers), coalesced by
    # RowAdam: deterministic mode must still repeat a run exactly, and the run must learn.
    t = clustered_table()
    kw = dict(backend="cuda", input_path="sparse", softmax="sampled", negatives=16, optimizer="lazy-adam",
              deterministic=True, max_steps=200, eval_every=200)  # fmt: skip
    first = train(config(tmp_path, "first", **kw), t)
    again = train(config(tmp_path, "again", **kw), t)
    a, b = load_checkpoint(first.run_dir).model_state, load_checkpoint(again.run_dir).model_state
    assert first.steps == again.steps == 200 and all(torch.equal(a[k], b[k]) for k in a)
    assert first.final_validation_loss < first.popularity_validation_loss - 0.5, first


def matrix_with_edge_rows(n_users=400, n_items=700, density=0.03, seed=0):
    """(host CSR with float32 values, samples): user 0 has no items, user 1 has every item."""
    rng = np.random.default_rng(seed)
    body = sp.random(n_users - 2, n_items, density=density, format="csr", random_state=seed, dtype=np.float32)
    full = sp.csr_matrix(rng.normal(size=(1, n_items)).astype(np.float32))
    host = sp.vstack([sp.csr_matrix((1, n_items), dtype=np.float32), full, body], format="csr")
    host.sum_duplicates()
    host.data = rng.normal(size=host.nnz).astype(np.float32)  # signed values; a stored 0 is still an item
    host.data[::7] = 0.0
    coo = host.tocoo()
    held_out = 500
    users = np.concatenate([coo.row, rng.integers(0, n_users, held_out), [0, 1]]).astype(np.int32)
    items = np.concatenate([coo.col, rng.integers(0, n_items, held_out), [3, 5]]).astype(np.int32)
    return host, Samples(users, items)


def assert_bags_equal(got: list[torch.Tensor], expected: Bags) -> None:
    for name, g, e in zip(Bags._fields, got, expected):
        g, e = g.cpu().numpy(), e.numpy()
        assert g.shape == e.shape, name
        if e.dtype == np.float32:
            np.testing.assert_allclose(g, e, rtol=1e-6, atol=0, err_msg=name)
        else:
            np.testing.assert_array_equal(g, e, err_msg=name)


@pytest.mark.parametrize("with_values", [False, True])
def test_bags_built_and_consumed_on_a_side_stream_equal_the_cpu_backends(with_values):
    host, samples = matrix_with_edge_rows()
    n_items = host.shape[1]
    cpu = BagAssembler(InteractionMatrix.from_scipy(get_backend("cpu"), host, values=with_values), samples, 300)
    cuda = BagAssembler(InteractionMatrix.from_scipy(get_backend("cuda"), host, values=with_values), samples, 300)
    rng = np.random.default_rng(1)
    n = len(samples)
    # A whole batch ending with the empty row's sample, that sample alone, and a partial batch starting with
    # the full row's (whose bag spans several strides of the fill kernel's threads).
    orders = [
        np.append(rng.integers(0, n, 299), n - 2),
        np.array([n - 2]),
        np.append([n - 1], rng.integers(0, n, 122)),
    ]
    torch.manual_seed(0)
    model = CandidateGenerator(n_items, (32, 32, 32)).eval()
    cuda_model = copy.deepcopy(model).to(cuda.backend.torch_device)
    side = torch.cuda.Stream()
    consumed = []
    with torch.cuda.stream(side), torch.no_grad():
        for order in orders:
            device_order = cuda.to_device_indices(order)
            # Keep the side stream busy, then poison the buffers on it: kernels launched on any other stream
            # would run before the poison lands, and the consumer below would read poison. The poison is
            # safe to read: offsets 0 and item 0 are in range, the NaN weights and features show in h.
            torch.cuda._sleep(50_000_000)
            b = cuda.buffers
            b.offsets.zero_()
            b.indices.zero_()
            b.weights.fill_(float("nan"))
            b.features.fill_(float("nan"))
            b.labels.fill_(-1)
            bags = cuda.assemble(device_order)
            h = cuda_model.hidden_bags(*bags[:4])  # consumed on the stream that built it
            consumed.append(([t.clone() for t in bags], h))
    torch.cuda.synchronize()
    for order, (got, h) in zip(orders, consumed):
        expected = cpu.assemble(cpu.to_device_indices(order))
        assert_bags_equal(got, expected)
        with torch.no_grad():
            torch.testing.assert_close(h.cpu(), model.hidden_bags(*expected[:4]), rtol=1e-4, atol=1e-5)


def sparse_sampled_training(precision: str):
    """(the next-batch iterator, one training step) of a sparse path, sampled softmax run on the GPU."""
    host, samples = matrix_with_edge_rows()
    n_items = host.shape[1]
    matrix = InteractionMatrix.from_scipy(get_backend("cuda"), host)
    loader = BatchLoader(matrix, samples, 256, path="sparse", seed=0)
    assert len(loader) >= 12  # the steps below stay inside one epoch: no new order to upload
    torch.manual_seed(0)
    model = CandidateGenerator(n_items, (64, 64, 64)).to(loader.device)
    optimizer = model.configure_optimizer()
    counts = np.bincount(samples.item, minlength=n_items)
    sampler = NegativeSampler(n_items, 128, "popularity", counts, power=0.75, device=loader.device, seed=0)
    objective = Objective(model, sampler, precision)

    def step(bags: Bags) -> torch.Tensor:
        loss = objective.loss(bags)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    batches = iter(loader)
    # Warm-up: the epoch's order goes to the device (a sync, once per epoch) with the first batch; kernels
    # compile, cuBLAS and the streams are set up, Adam makes its state and the allocator caches its blocks.
    for _ in range(3):
        step(next(batches))
    torch.cuda.synchronize()
    return batches, step, loader.buffers


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sparse_sampled_steps_do_not_synchronise_through_torch(precision):
    batches, step, buffers = sparse_sampled_training(precision)
    pointers = set()
    torch.cuda.set_sync_debug_mode("error")  # any torch-side host-device sync now raises, naming the op
    try:
        for _ in range(5):
            bags = next(batches)  # the next batch: three kernel launches on torch's stream
            pointers.add(tuple(t.data_ptr() for t in bags[:3]))
            loss = step(bags)  # Objective.loss (negatives drawn on the device), backward, optimizer.step
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # Offsets always start at the buffer; the indices and weights views too (only their length varies).
    assert pointers == {(buffers.indices.data_ptr(), buffers.offsets.data_ptr(), buffers.weights.data_ptr())}
    assert torch.isfinite(loss).item()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sparse_sampled_steps_leave_the_device_running_ahead(precision):
    # torch's sync debug mode sees only torch's own syncs; numba (a launch that syncs on foreign arrays) and
    # CuPy would wait unseen. So: put about a second of sleep on the stream, issue three whole steps, and
    # ask whether the sleep is still running. Any wait for the device in those steps, whoever made it, would
    # have outlasted the sleep. (The host issues a step in milliseconds: the margin is a hundredfold.)
    batches, step, _ = sparse_sampled_training(precision)
    asleep = torch.cuda.Event()
    torch.cuda._sleep(2**31)  # clock cycles: at least 1.08 s at the H200's top clock of 1.98 GHz
    asleep.record()
    for _ in range(3):
        loss = step(next(batches))
    still_asleep = not asleep.query()
    torch.cuda.synchronize()
    assert still_asleep, "a training step waited for the device (a host-device sync outside torch's view)"
    assert torch.isfinite(loss).item()

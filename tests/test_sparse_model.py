"""The sparse first layer (``forward_bags``) against the dense one (``forward``) on the same weights.

Tolerance: float32 on the CPU. The dense layer sums ``n_items`` products (zeros included) in BLAS's order,
``embedding_bag`` only the bag's, so the two differ by rounding: measured at about 1e-7 of each tensor's
largest magnitude on the real slice. Outputs and every parameter's gradient must agree within
``rtol=1e-5`` plus ``1e-5`` times the dense tensor's largest magnitude: a hundredfold margin over rounding,
and far below any real difference (a wrong weight or a missed item changes results at the 1e-2 level).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import hand_case, random_case
from reference import assemble_reference
from test_train import real_slice

from gpu_ann.backend import get_backend
from gpu_ann.bags import BagAssembler
from gpu_ann.batching import BatchAssembler
from gpu_ann.data.readers import load_bundled_anime
from gpu_ann.kernels.bag_inputs import bag_inputs
from gpu_ann.matrix import InteractionMatrix
from gpu_ann.model import CandidateGenerator
from gpu_ann.splits import random_split

TOL = 1e-5


def assert_close(sparse: torch.Tensor, dense: torch.Tensor, what: str) -> None:
    scale = float(dense.detach().abs().max())
    torch.testing.assert_close(sparse, dense, rtol=TOL, atol=TOL * scale, msg=lambda m: f"{what}: {m}")


def compare(model, X, bags, labels, no_items=False):
    """Logits and every parameter's gradient of the cross-entropy, dense against sparse.

    ``no_items``: every bag is empty, so the item table's gradient is zero on both paths.
    """
    params = list(model.parameters())
    dense = model(X)
    sparse = model.forward_bags(*bags)
    assert_close(sparse, dense, "logits")
    g_dense = torch.autograd.grad(F.cross_entropy(dense, labels), params)
    g_sparse = torch.autograd.grad(F.cross_entropy(sparse, labels), params)
    for (name, _), gs, gd in zip(model.named_parameters(), g_sparse, g_dense):
        if no_items and name == "embed.item_table":
            assert not gs.any() and not gd.any()
            continue
        assert gd.abs().max() > 0, f"{name} has no gradient: the comparison would prove nothing"
        assert_close(gs, gd, f"gradient of {name}")


def kernel_bags(case, batch, values=None):
    """Bag inputs from the CPU twin, as torch tensors (indices, offsets, weights, features) and labels."""
    indptr, indices, users, items, n = case
    batch = np.asarray(batch, np.int64)
    total = sum(int(indptr[users[s] + 1] - indptr[users[s]]) for s in batch)
    out = [np.empty(len(batch) + 1, np.int64), np.empty(total, np.int64), np.empty(total, np.float32)]
    out += [np.empty((len(batch), 3), np.float32), np.empty(len(batch), np.int64)]
    vals = np.empty(0, np.float32) if values is None else values
    bag_inputs(indptr, indices, vals, n, users, items, batch, *out)
    offsets, idx, weights, features, labels = (torch.from_numpy(a) for a in out)
    end = int(offsets[-1])  # the buffers were sized for every entry; the target's slot stays unused
    return (idx[:end], offsets, weights[:end], features), labels


@pytest.fixture(scope="module")
def real():
    table = real_slice(load_bundled_anime(), 400, 300)
    splits, _ = random_split(table, (0.8, 0.1, 0.1), seed=0)
    inputs = splits.inputs
    matrix = InteractionMatrix.from_pairs(get_backend("cpu"), inputs.user, inputs.item, table.n_users, table.n_items)
    return table, splits, matrix


@pytest.mark.parametrize("split", ["train", "validation"])
def test_real_slice_outputs_and_gradients_match_the_dense_path(real, split):
    table, splits, matrix = real
    samples = splits[split]
    order = np.random.default_rng(1).permutation(len(samples))[:128]
    dense, sparse = BatchAssembler(matrix, samples, 128), BagAssembler(matrix, samples, 128)
    X, y = dense.assemble(dense.to_device_indices(order))
    bags = sparse.assemble(sparse.to_device_indices(order))
    assert torch.equal(bags.labels, y)
    assert 0 < bags.indices.numel() < X[:, :-3].count_nonzero() + 128  # the bags hold the row's items only
    torch.manual_seed(0)
    compare(CandidateGenerator(table.n_items, (64, 48, 32)), X, bags[:4], y)


@pytest.mark.parametrize("with_values", [False, True])
def test_hand_cases_match_the_dense_reference(with_values):
    # Empty row, a row whose only item is the target, the full catalogue, targets not in the row.
    case = hand_case()
    indptr, indices, users, items, n = case
    values = np.linspace(-1, 2, len(indices)).astype(np.float32) if with_values else None
    batch = np.arange(len(users))
    bags, labels = kernel_bags(case, batch, values)
    X, ref_labels = assemble_reference(indptr, indices, users, items, batch, n, values=values)
    np.testing.assert_array_equal(labels.numpy(), ref_labels)
    torch.manual_seed(1)
    compare(CandidateGenerator(n, (6, 5, 4)), torch.from_numpy(X).float(), bags, labels)


def test_a_batch_of_empty_bags_is_the_count_features_alone():
    case = hand_case()
    bags, labels = kernel_bags(case, [0, 6])  # (1, 4): the only item is the target; (0, 3): an empty row
    assert bags[0].numel() == 0 and bags[1].tolist() == [0, 0, 0]
    torch.manual_seed(2)
    model = CandidateGenerator(case[4], (6, 5, 4))
    first = model.embed.bags(*bags)
    np.testing.assert_allclose(first.detach().numpy(), (bags[3] @ model.embed.feature_weight.T).detach().numpy())
    X = torch.zeros(2, case[4] + 3)
    X[:, -3:] = bags[3]
    compare(model, X, bags, labels, no_items=True)


def test_training_steps_on_either_path_reach_the_same_weights():
    case = random_case(40, 50, 0.15, seed=6)
    torch.manual_seed(3)
    dense_model = CandidateGenerator(case[4], (16, 12, 8))
    sparse_model = CandidateGenerator(case[4], (16, 12, 8))
    sparse_model.load_state_dict(dense_model.state_dict())
    optimizers = dense_model.configure_optimizer(1e-2), sparse_model.configure_optimizer(1e-2)
    rng = np.random.default_rng(6)
    for _ in range(3):
        batch = rng.integers(0, len(case[2]), size=32)
        bags, labels = kernel_bags(case, batch)
        X, _ = assemble_reference(*case[:4], batch, case[4])
        losses = (
            F.cross_entropy(dense_model(torch.from_numpy(X).float()), labels),
            F.cross_entropy(sparse_model.forward_bags(*bags), labels),
        )
        for loss, optimizer in zip(losses, optimizers):
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for (name, d), s in zip(dense_model.named_parameters(), sparse_model.parameters()):
        torch.testing.assert_close(s, d, rtol=TOL, atol=TOL, msg=lambda m, name=name: f"{name}: {m}")


def test_hidden_bags_with_the_output_layer_give_forward_bags():
    # What a sampled softmax does: logits of chosen items from the last hidden layer and out's rows.
    case = random_case(20, 30, 0.2, seed=9)
    bags, _ = kernel_bags(case, np.arange(10))
    torch.manual_seed(4)
    model = CandidateGenerator(case[4], (8, 8, 8))
    h = model.hidden_bags(*bags)
    chosen = torch.tensor([3, 0, 29])
    logits = h @ model.out.weight[chosen].T + model.out.bias[chosen]
    torch.testing.assert_close(logits, model.forward_bags(*bags)[:, chosen], rtol=1e-6, atol=1e-7)

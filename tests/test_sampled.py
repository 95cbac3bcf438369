"""Sampled softmax: the loss against hand-computed and dense references, the sampler, and a 10**6-item step."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpu_ann.sampled import NegativeSampler, _alias_table, sampled_softmax_loss

E = math.e


def test_loss_hand_computed_with_accidental_hit():
    # n = 4 items, d = 2. W rows: item0 [1,0], item1 [0,1], item2 [2,0], item3 [0,0]; bias [0,0,0,1].
    #            item:   0  1  2  3
    #   row 0 h=[1,0]  s=[1, 0, 2, 1]   target 0
    #   row 1 h=[0,1]  s=[0, 1, 0, 1]   target 3
    # Negatives [2, 3] drawn uniformly, k = 2: Q = k/n = 1/2, so each negative's exp(s) counts twice.
    # row 0: log(e + 2e^2 + 2e) - 1 = log(3 + 2e)
    # row 1: negative 3 is row 1's target (masked): log(e + 2*e^0) - 1 = log(1 + 2/e)
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([0.0, 0.0, 0.0, 1.0])
    y = torch.tensor([0, 3])
    negatives = torch.tensor([2, 3])
    log_q = torch.full((2,), math.log(2 / 4))
    per_row = sampled_softmax_loss(h, W, b, y, negatives, log_q, reduction="none")
    torch.testing.assert_close(per_row, torch.tensor([math.log(3 + 2 * E), math.log(1 + 2 / E)]))
    mean = sampled_softmax_loss(h, W, b, y, negatives, log_q)
    assert mean.item() == pytest.approx((math.log(3 + 2 * E) + math.log(1 + 2 / E)) / 2, rel=1e-6)
    total = sampled_softmax_loss(h, W, b, y, negatives, log_q, reduction="sum")
    assert total.item() == pytest.approx(math.log(3 + 2 * E) + math.log(1 + 2 / E), rel=1e-6)
    # With the target corrected as well (log Q = log 1/2 on the targets' logits, TensorFlow's convention):
    # row 0: log(2e + 2e^2 + 2e) - (1 + log 2) = log(2 + e);  row 1: log(2e + 2) - (1 + log 2) = log(1 + 1/e)
    corrected = sampled_softmax_loss(h, W, b, y, negatives, log_q, log_q_targets=log_q, reduction="none")
    torch.testing.assert_close(corrected, torch.tensor([math.log(2 + E), math.log(1 + 1 / E)]))


def test_every_negative_an_accidental_hit_leaves_a_zero_loss():
    # Each row's only negative is its own target: the row is left with its target alone, loss log(1) = 0.
    h = torch.randn(3, 4)
    W = torch.randn(5, 4)
    y = torch.tensor([2, 2, 2])
    loss = sampled_softmax_loss(h, W, None, y, torch.tensor([2, 2]), torch.zeros(2), reduction="none")
    torch.testing.assert_close(loss, torch.zeros(3))


def _reference_loss(h, W, b, y, negatives, log_q):
    """Slow reference: dense logits, explicit exp and sums, one row at a time."""
    S = h @ W.T + b
    rows = []
    for r in range(len(y)):
        z = torch.exp(S[r, y[r]])
        for m in range(len(negatives)):
            if negatives[m] != y[r]:
                z = z + torch.exp(S[r, negatives[m]] - log_q[m])
        rows.append(torch.log(z) - S[r, y[r]])
    return torch.stack(rows).mean()


def test_gradients_reach_only_the_sampled_rows_and_match_the_reference():
    gen = torch.Generator().manual_seed(3)
    n, B, d = 30, 5, 4
    h0 = torch.randn(B, d, generator=gen, dtype=torch.float64)
    W0 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    b0 = torch.randn(n, generator=gen, dtype=torch.float64)
    y = torch.tensor([2, 8, 8, 20, 29])
    negatives = torch.tensor([3, 3, 10, 17, 25, 2])  # a duplicate, and 2 hits row 0's target
    log_q = torch.log(torch.full((6,), 6 / n, dtype=torch.float64))
    grads = []
    for loss_fn in (sampled_softmax_loss, _reference_loss):
        h, W, b = (t.clone().requires_grad_() for t in (h0, W0, b0))
        loss_fn(h, W, b, y, negatives, log_q).backward()
        grads.append((h.grad, W.grad, b.grad))
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref)
    W_grad, b_grad = grads[0][1], grads[0][2]
    touched = sorted({2, 3, 8, 10, 17, 20, 25, 29})
    untouched = [i for i in range(n) if i not in touched]
    assert (W_grad[untouched] == 0).all() and (b_grad[untouched] == 0).all()
    assert (W_grad[touched].abs().sum(dim=1) > 0).all() and (b_grad[touched] != 0).all()


def test_all_items_without_replacement_equal_the_full_cross_entropy():
    # k = n uniform draws without replacement: every item once, Q = 1, the target masked in its own column,
    # so the sampled loss is the full softmax cross-entropy exactly (up to float64 rounding).
    gen = torch.Generator().manual_seed(0)
    n, B, d = 40, 6, 5
    h = torch.randn(B, d, generator=gen, dtype=torch.float64)
    W = torch.randn(n, d, generator=gen, dtype=torch.float64)
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    y = torch.randint(n, (B,), generator=gen)
    sampler = NegativeSampler(n, n, "uniform", replacement=False, seed=5)
    negatives, log_q = sampler.sample()
    assert sorted(negatives.tolist()) == list(range(n))
    assert (log_q == 0).all()
    expected = F.cross_entropy(h @ W.T + b, y, reduction="none")
    torch.testing.assert_close(sampled_softmax_loss(h, W, b, y, negatives, log_q, reduction="none"), expected.float())


@pytest.fixture
def one_thread():
    """Thousands of tiny float64 products: BLAS threads only wait on each other (10x slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("distribution", ["uniform", "popularity"])
def test_expectation_approaches_the_full_loss(distribution, one_thread):
    """Over R = 3000 draws per k: the partition estimate is unbiased, and the loss's bias shrinks like 1/k.

    Tolerances: E[Z_hat] = Z within 4 standard errors of the mean (k = 20); the loss's bias falls from
    k = 20 to 100 to 400; at k = 400 it is under 0.15 nats per row (the full loss is about 3.7; the
    popularity proposal here is deliberately unlike the softmax, which makes its bias the larger) and
    within 30% (plus 4 standard errors) of the second-order prediction -Var(Z_hat) / (2 Z^2), computed
    exactly from q.
    """
    gen = torch.Generator().manual_seed(0)
    n, B, d, R = 50, 4, 6, 3000
    h = torch.randn(B, d, generator=gen, dtype=torch.float64)
    W = torch.randn(n, d, generator=gen, dtype=torch.float64)
    b = 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 3, 7, 49])
    counts = np.random.default_rng(1).zipf(1.5, size=n).clip(max=100)
    S = h @ W.T + b
    full = F.cross_entropy(S, y, reduction="none")
    Z = S.exp().sum(dim=1)
    others = torch.ones_like(S).index_put_((torch.arange(B), y), torch.tensor(0.0, dtype=S.dtype))
    bias = {}
    for k in (20, 100, 400):
        sampler = NegativeSampler(n, k, distribution, item_counts=counts, seed=k)
        losses = torch.stack([sampled_softmax_loss(h, W, b, y, *sampler.sample(), reduction="none") for _ in range(R)])
        se = losses.std(dim=0) / math.sqrt(R)
        bias[k] = losses.mean(dim=0) - full
        if k == 20:
            z_hat = torch.exp(losses + S[torch.arange(B), y])  # loss = log Z_hat - s_y
            assert ((z_hat.mean(dim=0) - Z).abs() <= 4 * z_hat.std(dim=0) / math.sqrt(R)).all()
        if k == 400:
            q = torch.from_numpy(sampler.probabilities())
            var_one = (S.exp() ** 2 / q * others).sum(dim=1) - (S.exp() * others).sum(dim=1) ** 2
            predicted = -var_one / k / (2 * Z**2)
            assert (bias[k].abs() < 0.15).all()
            assert ((bias[k] - predicted).abs() <= 0.3 * predicted.abs() + 4 * se).all()
    assert bias[20].mean() < bias[100].mean() < bias[400].mean() < 0


def test_alias_table_gives_the_exact_distribution():
    weights = np.array([0.0, 1.0, 2.0, 3.0, 0.0, 4.5, 0.25])
    keep, alias = _alias_table(weights)
    n = len(weights)
    implied = keep / n
    np.add.at(implied, alias, (1 - keep) / n)
    np.testing.assert_allclose(implied, weights / weights.sum(), atol=1e-15)
    big = np.random.default_rng(0).random(1000) ** 4
    keep, alias = _alias_table(big)
    implied = keep / len(big)
    np.add.at(implied, alias, (1 - keep) / len(big))
    np.testing.assert_allclose(implied, big / big.sum(), rtol=1e-9)


def test_popularity_draws_follow_the_smoothed_counts():
    counts = np.array([0, 5, 1, 20, 0, 74])
    sampler = NegativeSampler(6, 50_000, "popularity", item_counts=counts, power=0.75, pseudo_count=1.0, seed=1)
    q = (counts + 1.0) ** 0.75
    q /= q.sum()
    np.testing.assert_allclose(sampler.probabilities(), q)
    negatives, log_q = sampler.sample()
    freq = np.bincount(negatives.numpy(), minlength=6) / 50_000
    assert (np.abs(freq - q) <= 5 * np.sqrt(q * (1 - q) / 50_000)).all()
    np.testing.assert_allclose(log_q.numpy(), np.log(50_000 * q)[negatives.numpy()], rtol=1e-6)
    items = torch.tensor([[0, 5], [3, 3]])
    np.testing.assert_allclose(sampler.log_expected_count(items).numpy(), np.log(50_000 * q)[items.numpy()], rtol=1e-6)
    # pseudo_count 0: an item never seen is never drawn.
    unseen = NegativeSampler(6, 20_000, "popularity", item_counts=counts, pseudo_count=0.0, seed=2)
    assert not np.isin(unseen.sample()[0].numpy(), [0, 4]).any()


def test_uniform_log_expected_count():
    sampler = NegativeSampler(1000, 64)
    negatives, log_q = sampler.sample()
    assert negatives.dtype == torch.int64 and negatives.shape == (64,)
    assert 0 <= negatives.min() and negatives.max() < 1000
    torch.testing.assert_close(log_q, torch.full((64,), math.log(64 / 1000)))
    torch.testing.assert_close(sampler.log_expected_count(torch.tensor([1, 2])), torch.full((2,), math.log(0.064)))


@pytest.mark.parametrize("distribution", ["uniform", "popularity"])
def test_same_seed_same_draws_and_state_round_trip(distribution):
    counts = np.arange(100)

    def make(seed):
        return NegativeSampler(100, 16, distribution, item_counts=counts, seed=seed)

    a, b = make(7), make(7)
    for _ in range(3):
        assert torch.equal(a.sample()[0], b.sample()[0])
    assert not torch.equal(make(7).sample()[0], make(8).sample()[0])
    state = a.get_state()
    assert state.dtype == torch.uint8 and state.device.type == "cpu"
    after = [a.sample()[0] for _ in range(2)]
    resumed = make(0)
    resumed.set_state(state)
    for expected in after:
        assert torch.equal(resumed.sample()[0], expected)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"distribution": "zipf"}, "unknown negative distribution 'zipf'"),
        ({"distribution": "popularity"}, "needs item_counts"),
        ({"distribution": "popularity", "item_counts": np.ones(9)}, r"shape \(9,\), expected \(10,\)"),
        ({"distribution": "popularity", "item_counts": -np.ones(10)}, "non-negative"),
        ({"distribution": "popularity", "item_counts": np.zeros(10), "pseudo_count": 0.0}, "not all 0"),
        ({"distribution": "popularity", "item_counts": np.ones(10), "replacement": False}, "only supported"),
        ({"k": 11, "replacement": False}, "cannot draw k=11 distinct"),
    ],
)
def test_sampler_refuses_bad_settings(kwargs, match):
    args = {"n_items": 10, "k": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        NegativeSampler(**args)


def test_loss_refuses_mismatched_shapes():
    h, W, y = torch.zeros(2, 3), torch.zeros(5, 3), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"h \(2, 3\) and weight \(5, 4\)"):
        sampled_softmax_loss(h, torch.zeros(5, 4), None, y, torch.tensor([1]), torch.zeros(1))
    with pytest.raises(ValueError, match=r"targets have shape \(3,\), expected \(2,\)"):
        sampled_softmax_loss(h, W, None, torch.zeros(3, dtype=torch.int64), torch.tensor([1]), torch.zeros(1))
    with pytest.raises(ValueError, match="must both be"):
        sampled_softmax_loss(h, W, None, y, torch.tensor([1, 2]), torch.zeros(1))
    with pytest.raises(ValueError, match="unknown reduction 'max'"):
        sampled_softmax_loss(h, W, None, y, torch.tensor([1]), torch.zeros(1), reduction="max")


def test_million_item_catalogue_trains_on_the_cpu():
    # 10**6 items, h2 = 8: the output layer is 9M parameters (36 MB, 144 MB with its gradient and Adam's state);
    # a step computes 16 x 1025 logits. The full loss on the batch (checked here, 16 x 10**6) must fall.
    n, B, k, d = 10**6, 16, 1024, 8
    rng = np.random.default_rng(0)
    counts = np.bincount(np.minimum(rng.zipf(1.2, size=200_000), n) - 1, minlength=n)
    sampler = NegativeSampler(n, k, "popularity", item_counts=counts, power=0.75, seed=0)
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Linear(16, d), torch.nn.ReLU())
    out = torch.nn.Linear(d, n)
    optimizer = torch.optim.Adam([*body.parameters(), *out.parameters()], lr=0.05)
    x = torch.randn(B, 16)
    y = torch.from_numpy(rng.integers(0, 1000, size=B))

    def full_loss():
        with torch.no_grad():
            return F.cross_entropy(out(body(x)), y).item()

    before = full_loss()
    sampled = []
    for _ in range(8):
        loss = sampled_softmax_loss(body(x), out.weight, out.bias, y, *sampler.sample())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sampled.append(loss.item())
    after = full_loss()
    assert all(math.isfinite(v) for v in sampled)
    assert sampled[-1] < sampled[0]
    assert after < before - 1.0, (before, after)

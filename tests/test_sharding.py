"""``--shard-users``: the deal of users to ranks, each rank's rows and samples, padded epochs, and a
2-process gloo run whose summed evaluation equals a single-process reference on the whole split."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from reference import assemble_reference
from test_torchrun import gpu_ann_train, ratings_csv

from gpu_ann.backend import get_backend
from gpu_ann.batching import FixedBatches, fixed_subset
from gpu_ann.checkpoint import load_checkpoint, load_data
from gpu_ann.data.table import RatingsTable
from gpu_ann.loader import BatchLoader
from gpu_ann.model import CandidateGenerator
from gpu_ann.sharding import shard_users
from gpu_ann.splits import TRAIN, VALIDATION, Samples, splits_from_assignment
from gpu_ann.values import input_matrix


def test_snake_deal_by_hand():
    # Training samples per user 5, 4, 3, 2, 1, 0: most first, dealt 0, 1, 1, 0, 0, 1.
    users = np.repeat(np.arange(6), [5, 4, 3, 2, 1, 0])
    a, b = (shard_users(users, 6, r, 2) for r in (0, 1))
    assert a.users.tolist() == [0, 3, 4] and b.users.tolist() == [1, 2, 5]
    assert a.epoch_samples == b.epoch_samples == 8  # rank 0 has 5 + 2 + 1, rank 1 has 4 + 3 + 0


@pytest.mark.parametrize("world_size", [2, 3, 7])
def test_every_user_owned_once_and_loads_balanced(world_size):
    rng = np.random.default_rng(world_size)
    n_users = 500
    counts = rng.zipf(1.6, n_users).clip(max=200) * (rng.random(n_users) < 0.9)  # heavy tail, some with none
    train_users = rng.permutation(np.repeat(np.arange(n_users), counts))
    shards = [shard_users(train_users, n_users, r, world_size) for r in range(world_size)]
    owned = np.concatenate([s.users for s in shards])
    assert np.array_equal(np.sort(owned), np.arange(n_users))
    loads = [int(counts[s.users].sum()) for s in shards]
    assert sum(loads) == len(train_users)
    assert max(loads) - min(loads) <= counts.max()  # the snake deal's bound
    assert all(s.epoch_samples == max(loads) for s in shards)


def test_more_ranks_than_trained_users_is_refused():
    with pytest.raises(ValueError, match="needs at least 3 users with training samples, the data has 2"):
        shard_users(np.array([0, 0, 4]), 5, 0, 3)


def test_local_samples_are_renumbered_to_the_ranks_rows():
    shard = shard_users(np.repeat(np.arange(6), [5, 4, 3, 2, 1, 0]), 6, 0, 2)  # users 0, 3, 4
    local = shard.local(Samples(np.array([4, 1, 0, 3, 5], np.int32), np.array([10, 11, 12, 13, 14], np.int32)))
    assert local.user.tolist() == [2, 0, 1] and local.item.tolist() == [10, 12, 13]


@pytest.mark.parametrize("mode", ["implicit", "rating", "residual"])
def test_a_ranks_matrix_holds_exactly_its_users_global_rows(mode):
    rng = np.random.default_rng(1)
    n_users, n_items = 40, 25
    pairs = np.array([(u, i) for u in range(n_users) for i in rng.choice(n_items, 6, replace=False)])
    table = RatingsTable(
        user=pairs[:, 0].astype(np.int32), item=pairs[:, 1].astype(np.int32),
        rating=rng.integers(1, 11, len(pairs)).astype(np.float32), timestamp=None,
        user_ids=np.arange(n_users), item_ids=np.arange(n_items), item_titles=None,
    )  # fmt: skip
    assignment = np.where(rng.random(len(pairs)) < 0.8, TRAIN, VALIDATION).astype(np.uint8)
    backend = get_backend("cpu")
    whole = input_matrix(backend, table, assignment, mode).csr
    users = shard_users(table.user[assignment == TRAIN], n_users, 1, 3).users
    part = input_matrix(backend, table, assignment, mode, users).csr
    assert part.shape == (len(users), n_items)
    # Values (biases for "residual") are fitted on the whole table, so the rows match exactly.
    assert (abs(part - whole[users]) > 0).nnz == 0


def test_epoch_samples_pads_by_repeating_the_start_of_the_order():
    matrix = input_matrix(
        get_backend("cpu"),
        RatingsTable(user=np.array([0, 1, 2], np.int32), item=np.array([1, 0, 1], np.int32), rating=None,
                     timestamp=None, user_ids=np.arange(3), item_ids=np.arange(2), item_titles=None),
        np.zeros(3, np.uint8),
    )  # fmt: skip
    samples = Samples(np.array([0, 1, 2], np.int32), np.array([1, 0, 1], np.int32))
    loader = BatchLoader(matrix, samples, 2, seed=3, epoch_samples=7)
    order = loader.epoch_order(0)
    plain = np.random.default_rng([3, 0]).permutation(3)
    assert order.tolist() == np.resize(plain, 7).tolist()
    assert len(loader) == 4 and sum(len(y) for _, y in loader) == 7
    with pytest.raises(ValueError, match="at least the 3 samples"):
        BatchLoader(matrix, samples, 2, epoch_samples=2)


def _scored_rows(fixed) -> list[tuple]:
    """Every (input row, label) a set of fixed batches scores, as tuples (the batches reuse one buffer)."""
    return [(*x.tolist(), int(label)) for X, y in fixed for x, label in zip(X, y)]


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_ranks_together_score_the_subset_one_process_scores(world_size):
    rng = np.random.default_rng(5)
    n_users, n_items = 30, 20
    pairs = np.array([(u, i) for u in range(n_users) for i in rng.choice(n_items, rng.integers(2, 9), replace=False)])
    table = RatingsTable(
        user=pairs[:, 0].astype(np.int32), item=pairs[:, 1].astype(np.int32), rating=None, timestamp=None,
        user_ids=np.arange(n_users), item_ids=np.arange(n_items), item_titles=None,
    )  # fmt: skip
    assignment = np.where(rng.random(len(pairs)) < 0.6, TRAIN, VALIDATION).astype(np.uint8)
    splits = splits_from_assignment(table, assignment)
    backend = get_backend("cpu")
    batch, n_batches, seed = 4, 3, 7
    whole = input_matrix(backend, table, assignment)
    one = _scored_rows(FixedBatches(whole, splits.validation, batch, n_batches, seed))
    assert len(one) == batch * n_batches < len(splits.validation)  # a real subset of the split
    together = []
    for rank in range(world_size):
        shard = shard_users(splits.train.user, n_users, rank, world_size)
        part = input_matrix(backend, table, assignment, users=shard.users)
        owned = shard.evaluation_subset(splits.validation, batch, n_batches, seed)
        together += _scored_rows(FixedBatches(part, owned, batch, None, seed))
    # The same samples (each its input row without the target, and the target), none twice, none missing.
    assert sorted(together) == sorted(one)


def _reference_validation_loss(run_dir, n_batches: int | None = None, batch_size: int = 8) -> float:
    """Cross-entropy of the saved best model on the validation split (the whole of it, or the fixed subset of
    ``n_batches`` one process scores), in one process, with dense rows built in numpy."""
    table, assignment = load_data(run_dir)
    splits = splits_from_assignment(table, assignment)
    csr = sp.csr_matrix(
        (np.ones(len(splits.train)), (splits.train.user, splits.train.item)), shape=(table.n_users, table.n_items)
    )
    csr.sort_indices()
    ckpt = load_checkpoint(run_dir)
    model = CandidateGenerator(table.n_items, tuple(ckpt.config["hidden"]))
    model.load_state_dict(ckpt.model_state)
    model.eval()
    v = splits.validation
    chosen = fixed_subset(len(v), batch_size, n_batches, ckpt.config["seed"])
    x, y = assemble_reference(csr.indptr, csr.indices, v.user, v.item, chosen, table.n_items)
    with torch.no_grad():
        return float(F.cross_entropy(model(torch.from_numpy(x).float()), torch.from_numpy(y)))


def test_two_sharded_ranks_train_identical_replicas_and_sum_evaluation_over_users(tmp_path):
    # 37 users: uneven shares of users and samples, so one rank pads its epoch to the other's length.
    data = ratings_csv(tmp_path / "ratings.csv", n_users=37, n_items=30, per_user=7, seed=4)
    flags = ["--batch-size", "8", "--max-epochs", "2", "--eval-every", "5", "--replica-check-every", "1"]
    flags += ["--shard-users", "--input-path", "dense", "--lr", "0.01"]
    done = gpu_ann_train(tmp_path / "run", data, *flags, nproc=2)
    held = [int(n) for n in re.findall(r"rank \d holds (\d+) of 37 users", done.stdout + done.stderr)]
    assert sorted(held) == [18, 19]  # each rank logged its own share of the users
    per_epoch = {int(n) for n in re.findall(r"(\d+) training samples per epoch on every rank", done.stderr)}
    assert len(per_epoch) == 1  # both ranks agree on the padded epoch length
    steps = 2 * -(-per_epoch.pop() // 8)
    assert load_checkpoint(tmp_path / "run").step <= steps
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == -(-steps // 5)  # rank 0 logged each evaluation once, both ranks took every step
    printed = float(re.search(r"validation loss \(best model, whole split\): ([\d.]+)", done.stdout).group(1))
    # Each rank scored only its own users' validation samples; their sums over both ranks are the whole split.
    assert printed == pytest.approx(_reference_validation_loss(tmp_path / "run"), abs=1.5e-4)
    # The logged losses are those of the fixed subset (2 batches of 8) one process would score: the best one
    # is the saved model's.
    best = json.loads(metrics[-1])["best_validation_loss"]
    assert best == pytest.approx(_reference_validation_loss(tmp_path / "run", n_batches=2), rel=1e-5)

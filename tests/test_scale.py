"""Training past one dense batch: the sparse input path, the sampled softmax, bf16, torch.compile and the
memory planner, each through ``train`` as a user runs it."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from gpu_ann.backend import get_backend
from gpu_ann.checkpoint import load_checkpoint
from gpu_ann.data.table import RatingsTable
from gpu_ann.planner import MemoryBudgetExceeded
from gpu_ann.training import TrainConfig, resume_run, train


def table(n_users=60, n_items=40, per_user=7, seed=0) -> RatingsTable:
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), per_user).astype(np.int32)
    # Skewed item choice, so popularity sampling differs from uniform.
    p = 1.0 / np.arange(1, n_items + 1)
    items = np.concatenate([rng.choice(n_items, per_user, replace=False, p=p / p.sum()) for _ in range(n_users)])
    return RatingsTable(
        user=users,
        item=items.astype(np.int32),
        rating=None,
        timestamp=None,
        user_ids=np.arange(n_users),
        item_ids=np.arange(n_items),
        item_titles=None,
        source="test",
    )


def config(tmp_path, name, **kw) -> TrainConfig:
    settings = dict(
        backend="cpu", hidden=(8, 8, 8), batch_size=16, max_steps=12, eval_every=6, eval_batches=2, patience=100
    )
    return TrainConfig(out=str(tmp_path / name), **{**settings, **kw})


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir).model_state


def test_sparse_path_trains_the_same_weights_as_the_dense_path(tmp_path):
    t = table()
    dense = train(config(tmp_path, "dense", input_path="dense"), t)
    sparse = train(config(tmp_path, "sparse", input_path="sparse"), t)
    assert dense.steps == sparse.steps == 12
    a, b = weights(dense.run_dir), weights(sparse.run_dir)
    assert a.keys() == b.keys()
    # Same samples, same initial weights, the same function: only float summation order differs (EmbeddingBag
    # sums the bag, the dense path multiplies a mostly-zero row), amplified a little by 12 Adam steps.
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    assert sparse.final_validation_loss == pytest.approx(dense.final_validation_loss, rel=1e-5)


def test_auto_path_picks_sparse_only_for_a_wide_catalogue(tmp_path, caplog):
    with caplog.at_level("INFO", logger="gpu_ann.training"):
        train(config(tmp_path, "narrow", max_steps=1, eval_every=1), table())
        # 20,000 items and 7 per user: a dense row is 20,003 floats, a bag about 6 entries.
        train(config(tmp_path, "wide", max_steps=1, eval_every=1), table(n_items=20_000))
    paths = [r.getMessage().split(",")[0] for r in caplog.records if r.getMessage().startswith("input path")]
    assert paths == ["input path dense", "input path sparse"]


def clustered_table(n_users=80, n_groups=4, block=10, per_user=7, seed=0) -> RatingsTable:
    """Users in groups, each picking items from its own block: learnable far beyond popularity."""
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), per_user).astype(np.int32)
    items = [(u % n_groups) * block + rng.choice(block, per_user, replace=False) for u in range(n_users)]
    n_items = n_groups * block
    return RatingsTable(users, np.concatenate(items).astype(np.int32), None, None, np.arange(n_users),
                        np.arange(n_items), None, "clustered")  # fmt: skip


@pytest.mark.parametrize("sampling", ["uniform", "popularity"])
def test_sampled_softmax_trains_and_beats_popularity(tmp_path, sampling):
    cfg = config(
        tmp_path, sampling, softmax="sampled", negatives=16, negative_sampling=sampling, lr=0.02, max_steps=200,
        eval_every=50, input_path="sparse", hidden=(16, 16, 16),
    )  # fmt: skip
    result = train(cfg, clustered_table())
    # Popularity is about log(40) = 3.7 nats here; the full softmax reaches 2.5 in 200 steps (measured), the
    # sampled one (16 of 40 items a step) 2.5-2.9: the full-softmax validation loss falls far below popularity
    # although training never computes it.
    assert result.final_validation_loss < result.popularity_validation_loss - 0.6


def assert_identical(a, b, where: str) -> None:
    """``a == b`` all the way down: tensors bit for bit and of the same dtype, dicts key for key."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def without_clock_and_place(payload: dict) -> dict:
    """A checkpoint payload less what differs between any two runs: wall-clock times and the run directory."""
    payload = {**payload, "config": {k: v for k, v in payload["config"].items() if k != "out"}}
    payload.pop("elapsed_s", None)
    if "history" in payload:
        clock = ("samples_per_s", "elapsed_s")
        payload["history"] = [{k: v for k, v in r.items() if k not in clock} for r in payload["history"]]
    return payload


@pytest.mark.parametrize("optimizer", ["adam", "auto"])  # auto: lazy Adam for the output layer here
def test_resume_of_a_sampled_run_is_bit_identical(tmp_path, optimizer):
    from gpu_ann.checkpoint import MODEL_FILE, STATE_FILE

    t = table()
    # At lr 0.3 validation improves at steps 2, 4 and 6 only: the run is resumed at step 8 with one evaluation
    # without improvement behind it and ends with three, so early stopping's count crosses the resume too.
    kw = dict(softmax="sampled", negatives=5, input_path="sparse", max_steps=12, eval_every=2, lr=0.3,
              optimizer=optimizer)  # fmt: skip
    train(config(tmp_path, "whole", **kw), t)
    part = config(tmp_path, "part", **{**kw, "max_steps": 8})
    train(part, t)
    # Continue the 8-step run to 12 steps: the sampler's generator state must come back from last.pt.
    state = torch.load(tmp_path / "part" / STATE_FILE, weights_only=True)
    state["config"]["max_steps"], state["finished"] = 12, False
    torch.save(state, tmp_path / "part" / STATE_FILE)
    resumed = resume_run(tmp_path / "part")
    assert resumed.steps == 12
    whole_state, resumed_state = (torch.load(tmp_path / d / STATE_FILE, weights_only=True) for d in ("whole", "part"))
    # Everything a further resume would continue from: weights, Adam's moments and step counts, the sampler's
    # and torch's generators, the step / epoch / batch counters, early stopping and the evaluation history.
    assert set(whole_state) >= {"model_state", "optimizer_state", "sampler_rng", "torch_rng", "step", "epoch",
                                "batch_in_epoch", "best_validation_loss", "bad_evals", "history"}  # fmt: skip
    moments = whole_state["optimizer_state"]
    if optimizer == "auto":  # LazyAdam's: Adam's state and SparseAdam's, both filled
        assert moments["lazy_names"] == ["out.weight", "out.bias"] and moments["dense"]["state"]
        moments = moments["lazy"]
    assert whole_state["sampler_rng"] is not None and moments["state"]
    assert whole_state["step"] == 12 and len(whole_state["history"]) == 6
    if optimizer == "adam":  # the trajectory the lr was chosen for (lazy Adam's has its own)
        assert state["bad_evals"] == 1 and whole_state["bad_evals"] == 3
    # The sampler's generator moved on after step 8: comparing it is not comparing two copies of one value.
    assert not torch.equal(state["sampler_rng"], resumed_state["sampler_rng"])
    assert_identical(without_clock_and_place(whole_state), without_clock_and_place(resumed_state), "last.pt")
    whole_best, resumed_best = (torch.load(tmp_path / d / MODEL_FILE, weights_only=True) for d in ("whole", "part"))
    for key in ("model_state", "optimizer_state", "step", "epoch", "best_validation_loss", "data_fingerprint"):
        assert_identical(whole_best[key], resumed_best[key], f"model.pt[{key!r}]")


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_bf16_autocast_stays_close_to_fp32(tmp_path, path):
    t = table()
    # lr 1e-3 (not the default 1e-2): Adam's first steps move every weight by about lr whatever the gradient's
    # size, so a larger lr turns bf16 rounding of a near-zero gradient's sign into a full-size weight difference.
    fp32 = train(config(tmp_path, "fp32", input_path=path, lr=1e-3), t)
    bf16 = train(config(tmp_path, "bf16", input_path=path, precision="bf16", lr=1e-3), t)
    # bf16 keeps 8 bits of mantissa (relative step 2**-8 = 0.4%); 12 steps of a tiny model stay within 1%.
    assert bf16.final_validation_loss == pytest.approx(fp32.final_validation_loss, rel=0.01)
    a, b = weights(fp32.run_dir), weights(bf16.run_dir)
    for k in a:
        assert b[k].dtype == torch.float32  # master weights stay fp32
        torch.testing.assert_close(b[k], a[k], rtol=0.05, atol=0.02, msg=k)


@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="torch.compile needs a C compiler"
)
def test_compiled_loss_matches_eager(tmp_path):
    t = table()
    eager = train(config(tmp_path, "eager", max_steps=4, eval_every=4), t)
    compiled = train(config(tmp_path, "compiled", max_steps=4, eval_every=4, compile=True), t)
    a, b = weights(eager.run_dir), weights(compiled.run_dir)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_planner_refuses_before_anything_is_written(tmp_path):
    cfg = config(tmp_path, "refused", memory_budget=36_000)  # about 42 KB needed at batch 16, 30 KB at 1
    with pytest.raises(MemoryBudgetExceeded) as info:
        train(cfg, table())
    message = str(info.value)
    assert "but the limit is 35.2 KiB (--memory-budget); nothing was allocated" in message
    assert "--batch-size of at most" in message and "--softmax sampled" in message
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("rank, sharded", [(0, False), (1, False), (1, True)])
def test_the_trainer_plans_for_its_precision_and_its_rank(tmp_path, rank, sharded):
    from types import SimpleNamespace

    from gpu_ann.batching import fixed_subset
    from gpu_ann.model import CandidateGenerator
    from gpu_ann.run_setup import memory_plan
    from gpu_ann.sharding import shard_users
    from gpu_ann.training import _read_and_split

    cfg = config(tmp_path, "plan", precision="bf16", input_path="dense", shard_users=sharded)
    t = table()
    _, splits, assignment = _read_and_split(cfg, t, None)
    replicas = SimpleNamespace(rank=rank, world_size=2, is_main=rank == 0)  # what the planner reads of Replicas
    shard = shard_users(splits.train.user, t.n_users, rank, 2) if sharded else None
    plan = memory_plan(cfg, t, splits, assignment, get_backend("cpu"), replicas, shard)
    terms, settings = plan.terms(), plan.settings
    assert settings["precision"] == "bf16" and settings["out_dtype"] == torch.bfloat16 and settings["world_size"] == 2
    assert terms["autocast"] > 0
    # The flat all-reduce buffer holds every parameter as float32.
    assert terms["gradient_buffer"] == 4 * sum(p.numel() for p in CandidateGenerator(t.n_items, (8, 8, 8)).parameters())
    if sharded:
        held = int(shard.owns(splits.train.user).sum())  # the rank's own users' samples
        order = shard.epoch_samples  # padded to the largest rank's epoch
        # Its part of the fixed subsets one process scores (2 batches of 16), and its whole validation split.
        scored = [fixed_subset(len(splits[n]), 16, 2, 0) for n in ("train", "validation")]
        evaluated = sum(int(shard.owns(splits[n].user[i]).sum()) for n, i in zip(("train", "validation"), scored))
        evaluated += int(shard.owns(splits.validation.user).sum())
        assert settings["n_users"] == len(shard.users) < t.n_users
    else:
        held, order = len(splits.train), -(-len(splits.train) // 2)  # all samples, this rank's half of the order
        evaluated = len(splits.train) + 2 * len(splits.validation) if rank == 0 else 0  # only rank 0 evaluates
    assert settings["n_samples"] == held
    assert settings["n_eval_samples"] == evaluated
    assert terms["samples"] == held * 8 + order * 8 + evaluated * 16


def test_unknown_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown softmax 'partial'"):
        train(config(tmp_path, "x", softmax="partial"), table())
    with pytest.raises(ValueError, match="unknown input_path 'wide'"):
        train(config(tmp_path, "x", input_path="wide"), table())


def test_deterministic_mode_is_on_for_the_run_only_and_repeats_it(tmp_path, monkeypatch):
    import gpu_ann.training as training

    seen = []
    original = training._train

    def spy(*args):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return original(*args)

    monkeypatch.setattr(training, "_train", spy)
    t = table()
    a = train(config(tmp_path, "a", deterministic=True, input_path="sparse", softmax="sampled", negatives=5), t)
    b = train(config(tmp_path, "b", deterministic=True, input_path="sparse", softmax="sampled", negatives=5), t)
    assert seen == [True, True] and not torch.are_deterministic_algorithms_enabled()
    for k, v in weights(a.run_dir).items():
        assert torch.equal(weights(b.run_dir)[k], v), k


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_smaller_evaluation_batches_give_the_same_whole_split_loss(tmp_path, path):
    t = table()
    whole = train(config(tmp_path, "whole", input_path=path), t)
    small = train(config(tmp_path, "small", input_path=path, eval_batch_size=5), t)
    # The same training; the final loss is over the whole validation split either way, only batched differently.
    assert small.final_validation_loss == pytest.approx(whole.final_validation_loss, rel=1e-5)
    with pytest.raises(ValueError, match=r"--eval-batch-size must lie in \[1, --batch-size=16\]"):
        train(config(tmp_path, "x", eval_batch_size=17), t)

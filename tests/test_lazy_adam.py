"""Sparse gradients for the item tables and lazy Adam (``--optimizer lazy-adam``), against dense references."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpu_ann.bags import Bags
from gpu_ann.model import CandidateGenerator
from gpu_ann.objective import Objective
from gpu_ann.optim import LazyAdam, lazy_parameter_names
from gpu_ann.sampled import NegativeSampler, gather_rows, sampled_softmax_loss


def test_sparse_gather_gradient_equals_the_dense_one():
    gen = torch.Generator().manual_seed(3)
    n, B, d = 30, 5, 4
    h0 = torch.randn(B, d, generator=gen, dtype=torch.float64)
    W0 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    b0 = torch.randn(n, generator=gen, dtype=torch.float64)
    y = torch.tensor([2, 8, 8, 20, 29])
    negatives = torch.tensor([3, 3, 10, 17, 25, 2])  # a repeated negative, and one that is row 0's target
    log_q = torch.log(torch.full((6,), 6 / n, dtype=torch.float64))
    grads = {}
    for sparse in (False, True):
        h, W, b = (t.clone().requires_grad_() for t in (h0, W0, b0))
        loss = sampled_softmax_loss(h, W, b, y, negatives, log_q, sparse_grad=sparse)
        loss.backward()
        grads[sparse] = (loss.detach(), h.grad, W.grad, b.grad)
    assert grads[True][2].is_sparse and grads[True][3].is_sparse and not grads[False][2].is_sparse
    # The sparse gradient holds one row per gathered row (targets then negatives, repeats kept), nothing else.
    assert grads[True][2]._indices().tolist() == [[2, 8, 8, 20, 29, 3, 3, 10, 17, 25, 2]]
    for dense, sparse in zip(grads[False], grads[True]):
        torch.testing.assert_close(sparse.to_dense() if sparse.is_sparse else sparse, dense, rtol=0, atol=1e-14)


def test_gather_rows_without_sparse_grad_is_index_select():
    table = torch.arange(12.0).reshape(6, 2).requires_grad_()
    rows = torch.tensor([4, 0, 4])
    assert torch.equal(gather_rows(table, rows), table[rows])
    gather_rows(table, rows).sum().backward()
    assert not table.grad.is_sparse and table.grad[:, 0].tolist() == [1, 0, 0, 0, 2, 0]


def _bags():
    # Two users' rows over 9 items: bag 0 holds items 1, 4 (weights 1/2), bag 1 items 4, 7, 8 (1/3), and
    # a third bag is empty.
    indices = torch.tensor([1, 4, 4, 7, 8])
    offsets = torch.tensor([0, 2, 5, 5])
    weights = torch.tensor([0.5, 0.5, 1 / 3, 1 / 3, 1 / 3])
    features = torch.tensor([[0.5, 0.7, 0.25], [0.3, 0.5, 0.1], [0.0, 0.0, 0.0]])
    return Bags(indices, offsets, weights, features, torch.tensor([2, 3, 0]))


def test_sparse_bag_gradient_equals_the_dense_paths():
    torch.manual_seed(0)
    model = CandidateGenerator(9, (4, 5, 3)).double()
    bags = _bags()
    dense_rows = torch.zeros(3, 9 + 3, dtype=torch.float64)
    for r in range(3):
        a, b = bags.offsets[r], bags.offsets[r + 1]
        dense_rows[r, bags.indices[a:b]] += bags.weights[a:b].double()
        dense_rows[r, 9:] = bags.features[r]
    grads = []
    for run in ("dense rows", "dense bags", "sparse bags"):
        model.zero_grad(set_to_none=True)
        if run == "dense rows":
            out = model(dense_rows)
        else:
            w = bags.weights.double()
            out = model.out(model.hidden_bags(bags.indices, bags.offsets, w, bags.features, run == "sparse bags"))
        F.cross_entropy(out, bags.labels).backward()
        grads.append(model.embed.item_table.grad)
    assert grads[2].is_sparse and not grads[1].is_sparse
    assert sorted(grads[2]._indices()[0].tolist()) == [1, 4, 4, 7, 8]
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-14)
    torch.testing.assert_close(grads[2].to_dense(), grads[0], rtol=0, atol=1e-14)


def _numpy_lazy_adam(table, dense, steps, lr, betas=(0.9, 0.999), eps=1e-8):
    """The reference: lazy Adam on ``table`` (rows of each step's gradient only), Adam on ``dense``, float64."""
    b1, b2 = betas
    table, dense = table.copy(), dense.copy()
    m_t, v_t, m_d, v_d = (np.zeros_like(a) for a in (table, table, dense, dense))
    for t, (rows, values, dense_grad) in enumerate(steps, start=1):
        g = np.zeros_like(table)
        np.add.at(g, rows, values)  # repeated rows add up
        touched = np.unique(rows)
        m_t[touched] = b1 * m_t[touched] + (1 - b1) * g[touched]
        v_t[touched] = b2 * v_t[touched] + (1 - b2) * g[touched] ** 2
        # Lazy Adam's form (TensorFlow's LazyAdam, torch's SparseAdam): eps before the bias correction.
        step = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        table[touched] -= step * m_t[touched] / (np.sqrt(v_t[touched]) + eps)
        m_d = b1 * m_d + (1 - b1) * dense_grad
        v_d = b2 * v_d + (1 - b2) * dense_grad**2
        dense -= lr / (1 - b1**t) * m_d / (np.sqrt(v_d / (1 - b2**t)) + eps)
    return table, dense


def test_lazy_adam_matches_the_numpy_reference_and_leaves_untouched_rows():
    rng = np.random.default_rng(5)
    table0, dense0 = rng.normal(size=(12, 3)), rng.normal(size=(4,))
    # Four steps; rows 6..11 are never touched, row 2 repeats within a step, row 0 misses step 3.
    row_sets = [[0, 2, 2, 5], [0, 1], [3, 4, 5], [0, 2, 4, 5, 1]]
    steps = [(np.array(r), rng.normal(size=(len(r), 3)), rng.normal(size=4)) for r in row_sets]
    table = torch.nn.Parameter(torch.from_numpy(table0.copy()))
    dense = torch.nn.Parameter(torch.from_numpy(dense0.copy()))
    optimizer = LazyAdam([("table", table), ("dense", dense)], lazy=["table"], lr=0.05)
    for rows, values, dense_grad in steps:
        optimizer.zero_grad()
        table.grad = torch.sparse_coo_tensor(
            torch.from_numpy(rows)[None], torch.from_numpy(values), table.shape, check_invariants=True
        )
        dense.grad = torch.from_numpy(dense_grad)
        optimizer.step()
    want_table, want_dense = _numpy_lazy_adam(table0, dense0, steps, lr=0.05)
    np.testing.assert_allclose(table.detach().numpy(), want_table, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dense.detach().numpy(), want_dense, rtol=1e-12, atol=1e-12)
    assert np.array_equal(table.detach().numpy()[6:], table0[6:])  # never in a gradient: exactly unchanged
    assert not np.allclose(table.detach().numpy()[:6], table0[:6])


def test_lazy_adam_equals_adam_when_every_row_is_in_every_step():
    # With every row in every gradient the two differ only in where eps sits: below 1e-7 relative here.
    rng = np.random.default_rng(2)
    start = rng.normal(size=(6, 2))
    lazy_p, adam_p = (torch.nn.Parameter(torch.from_numpy(start.copy())) for _ in range(2))
    lazy = LazyAdam([("t", lazy_p)], lazy=["t"], lr=0.01)
    adam = torch.optim.Adam([adam_p], lr=0.01)
    for _ in range(5):
        g = torch.from_numpy(rng.normal(size=(6, 2)))
        lazy_p.grad = g.to_sparse(1)  # every row present
        adam_p.grad = g.clone()
        lazy.step()
        adam.step()
    torch.testing.assert_close(lazy_p.detach(), adam_p.detach(), rtol=1e-7, atol=1e-9)
    assert not torch.equal(lazy_p.detach(), torch.from_numpy(start))


def test_state_dict_round_trip_continues_the_same_updates():
    rng = np.random.default_rng(9)
    grads = [(torch.tensor([[1, 3, 3]]), torch.from_numpy(rng.normal(size=(3, 2))),
              torch.from_numpy(rng.normal(size=2)))
             for _ in range(4)]  # fmt: skip

    def fresh():
        t = torch.nn.Parameter(torch.ones(5, 2, dtype=torch.float64))
        d = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
        return t, d, LazyAdam([("t", t), ("d", d)], lazy=["t"], lr=0.1)

    def run(t, d, optimizer, part):
        for rows, values, dense_grad in part:
            t.grad = torch.sparse_coo_tensor(rows, values, (5, 2), check_invariants=True)
            d.grad = dense_grad.clone()
            optimizer.step()

    t1, d1, o1 = fresh()
    run(t1, d1, o1, grads)
    t2, d2, o2 = fresh()
    run(t2, d2, o2, grads[:2])
    state = o2.state_dict()
    t3, d3, o3 = fresh()
    with torch.no_grad():
        t3.copy_(t2)
        d3.copy_(d2)
    o3.load_state_dict(state)
    run(t3, d3, o3, grads[2:])
    assert torch.equal(t1, t3) and torch.equal(d1, d3)
    with pytest.raises(ValueError, match="not a lazy-adam optimiser state.*--optimizer adam"):
        o3.load_state_dict(torch.optim.Adam([d3]).state_dict())
    with pytest.raises(ValueError, match=r"updates \['t'\] lazily, this run \['d'\]"):
        LazyAdam([("t", t3), ("d", d3)], lazy=["d"]).load_state_dict(state)


def test_lazy_adam_refuses_unknown_or_no_lazy_parameters():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"lazy parameters \['q'\] are not among the model's \['p'\]"):
        LazyAdam([("p", p)], lazy=["q"])
    with pytest.raises(ValueError, match="at least one lazy parameter"):
        LazyAdam([("p", p)], lazy=[])
    # A lazy parameter whose loss gave it a dense gradient is named, with where the names must go; nothing moves.
    t, d = torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = LazyAdam([("t", t), ("d", d)], lazy=["t"])
    t.grad, d.grad = torch.ones(3, 2), torch.ones(2)
    with pytest.raises(RuntimeError, match=r"lazy parameter 't' has a dense gradient.*Objective\(sparse_grad=\.\.\.\)"):
        optimizer.step()
    assert not t.any() and not d.any()


def test_lazy_parameter_names_follow_path_and_softmax():
    assert lazy_parameter_names("dense", "full") == ()
    assert lazy_parameter_names("sparse", "full") == ("embed.item_table",)
    assert lazy_parameter_names("dense", "sampled") == ("out.weight", "out.bias")
    assert lazy_parameter_names("sparse", "sampled") == ("embed.item_table", "out.weight", "out.bias")
    names = dict(CandidateGenerator(4, (2, 2, 2)).named_parameters())
    assert all(n in names for n in lazy_parameter_names("sparse", "sampled"))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_objective_steps_with_lazy_adam_touch_only_the_rows_read(precision):
    torch.manual_seed(0)
    n = 40
    model = CandidateGenerator(n, (4, 6, 4))
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sampler = NegativeSampler(n, 5, "uniform", seed=3)
    lazy = lazy_parameter_names("sparse", "sampled")
    objective = Objective(model, sampler, precision, sparse_grad=lazy)
    optimizer = model.configure_optimizer(1e-2, lazy)
    assert isinstance(optimizer, LazyAdam)
    bags = _bags()
    read_out = set(bags.labels.tolist())
    for _ in range(3):
        generator_state = sampler.get_state()
        read_out |= set(sampler.sample()[0].tolist())
        sampler.set_state(generator_state)  # the objective draws the same negatives
        loss = objective.loss(bags)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        assert model.embed.item_table.grad.is_sparse and model.out.weight.grad.is_sparse
        assert model.out.bias.grad.is_sparse and not model.mlp[0].weight.grad.is_sparse
        optimizer.step()
    assert math.isfinite(loss.item())
    now = model.state_dict()
    moved = {k for k in now if not torch.equal(now[k], start[k])}
    assert moved == set(now)  # every parameter moved somewhere
    item_rows = (now["embed.item_table"] != start["embed.item_table"]).any(dim=1).nonzero().flatten().tolist()
    assert item_rows == [1, 4, 7, 8]  # the items in the bags, no others
    out_rows = set((now["out.weight"] != start["out.weight"]).any(dim=1).nonzero().flatten().tolist())
    assert out_rows == read_out


def test_objective_refuses_compile_with_sparse_gradients_and_half_an_output_layer():
    with pytest.raises(ValueError, match="compile and sparse_grad"):
        Objective(CandidateGenerator(4, (2, 2, 2)), compile=True, sparse_grad=["embed.item_table"])
    with pytest.raises(ValueError, match="must name out.weight and out.bias together"):
        Objective(CandidateGenerator(4, (2, 2, 2)), sparse_grad=["out.weight"])


def test_training_with_lazy_adam_runs_saves_and_resumes_identically(tmp_path, monkeypatch):
    import gpu_ann.training as training
    from gpu_ann.checkpoint import load_checkpoint, load_resume_state
    from gpu_ann.data.table import RatingsTable

    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(40), 6).astype(np.int32)
    items = np.concatenate([rng.choice(30, 6, replace=False) for _ in range(40)]).astype(np.int32)
    table = RatingsTable(users, items, None, None, np.arange(40), np.arange(30), None, source="tiny")
    cfg = training.TrainConfig(
        backend="cpu", batch_size=16, hidden=(8, 8, 8), max_steps=20, eval_every=4, eval_batches=1, patience=100,
        seed=2, input_path="sparse", softmax="sampled", negatives=8, optimizer="lazy-adam",
    )  # fmt: skip
    whole = tmp_path / "whole"
    result = training.train(dataclasses.replace(cfg, out=str(whole)), table)
    assert result.steps == 20 and math.isfinite(result.final_validation_loss)
    assert load_checkpoint(whole).config["optimizer"] == "lazy-adam"
    assert 'optimizer = "lazy-adam"' in (whole / "config.toml").read_text()
    assert set(load_resume_state(whole).optimizer_state) == {"dense", "lazy", "lazy_names"}

    class Crash(Exception):
        pass

    real = training.save_resume_state

    def save_then_crash(run_dir, state):
        real(run_dir, state)
        if state.step == 12:
            raise Crash

    cut = tmp_path / "cut"
    monkeypatch.setattr(training, "save_resume_state", save_then_crash)
    with pytest.raises(Crash):
        training.train(dataclasses.replace(cfg, out=str(cut)), table)
    monkeypatch.setattr(training, "save_resume_state", real)
    training.resume_run(cut)
    a, b = load_resume_state(whole), load_resume_state(cut)
    assert a.finished and b.finished and a.step == b.step == 20
    assert all(torch.equal(a.model_state[k], b.model_state[k]) for k in a.model_state)
    assert [r["validation_loss"] for r in a.history] == [r["validation_loss"] for r in b.history]


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(input_path="dense", softmax="full"), "With the dense input path and the full softmax every gradient"),
        (dict(input_path="sparse", softmax="sampled", compile=True), "cannot be combined with --compile"),
    ],
)
def test_training_refuses_lazy_adam_where_it_cannot_work(tmp_path, change, match):
    import gpu_ann.training as training

    cfg = training.TrainConfig(backend="cpu", optimizer="lazy-adam", out=str(tmp_path / "run"), **change)
    with pytest.raises(ValueError, match=match):
        training.train(cfg)
    assert not (tmp_path / "run").exists()


def test_auto_path_that_resolves_dense_is_refused_with_the_reason(tmp_path):
    import gpu_ann.training as training
    from gpu_ann.data.table import RatingsTable

    # 30 items and rows of 6: the dense row moves fewer bytes than the bags, so auto picks dense.
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(40), 6).astype(np.int32)
    items = np.concatenate([rng.choice(30, 6, replace=False) for _ in range(40)]).astype(np.int32)
    table = RatingsTable(users, items, None, None, np.arange(40), np.arange(30), None, source="tiny")
    cfg = training.TrainConfig(backend="cpu", optimizer="lazy-adam", out=str(tmp_path / "run"), batch_size=16)
    with pytest.raises(ValueError, match=r"dense \(chosen by --input-path auto"):
        training.train(cfg, table)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("softmax", ["sampled", "full"])
def test_lazy_adam_learns_what_popularity_cannot(tmp_path, softmax):
    # Users in four groups, each with its own block of items: popularity is about log(120) = 4.8 nats; a model
    # that learns the groups is far below. Lazy Adam must learn it as Adam does (both measured here).
    from test_gpu_scale import clustered_table

    from gpu_ann.training import TrainConfig, train

    t = clustered_table()
    losses = {}
    for optimizer in ("adam", "lazy-adam"):
        cfg = TrainConfig(
            backend="cpu", out=str(tmp_path / optimizer), hidden=(32, 32, 32), batch_size=64, lr=0.01,
            max_steps=200, eval_every=200, eval_batches=3, patience=100, seed=5, input_path="sparse",
            softmax=softmax, negatives=16, optimizer=optimizer,
        )  # fmt: skip
        result = train(cfg, t)
        losses[optimizer] = result.final_validation_loss
        assert result.final_validation_loss < result.popularity_validation_loss - 0.5, (optimizer, result)
    # The two optimisers differ (untouched rows move under Adam only), so not equal, but alike: within 10%.
    assert losses["lazy-adam"] != losses["adam"]
    assert losses["lazy-adam"] == pytest.approx(losses["adam"], rel=0.1), losses


def test_auto_makes_lazy_the_tables_whose_step_reads_fewer_rows_than_they_have():
    from gpu_ann.optim import lazy_tables

    both = ("embed.item_table", "out.weight", "out.bias")
    # 10**6 items, batch 256, bags of 150: 38,400 bag entries and 1,280 output rows, both far below 10**6.
    assert lazy_tables("auto", "sparse", "sampled", 10**6, 256, 150.0, 1024) == both
    # 17,500 items, batch 1,024, bags of 250: 256,000 bag entries (more than the table), 2,048 output rows.
    assert lazy_tables("auto", "sparse", "sampled", 17_500, 1024, 250.0, 1024) == ("out.weight", "out.bias")
    assert lazy_tables("auto", "sparse", "full", 17_500, 1024, 250.0) == ()
    # The boundary: as many rows as the table is not fewer.
    assert lazy_tables("auto", "dense", "sampled", 2048, 1024, 99.0, 1024) == ()
    assert lazy_tables("auto", "dense", "sampled", 2049, 1024, 99.0, 1024) == ("out.weight", "out.bias")
    assert lazy_tables("auto", "sparse", "full", 10_001, 100, 100.0) == ("embed.item_table",)
    # Nothing sparse to be lazy with; compile; plain Adam; and lazy-adam, which takes every table whatever the sizes.
    assert lazy_tables("auto", "dense", "full", 10**6, 256, 150.0) == ()
    assert lazy_tables("auto", "sparse", "sampled", 10**6, 256, 150.0, 1024, compile=True) == ()
    assert lazy_tables("adam", "sparse", "sampled", 10**6, 256, 150.0, 1024) == ()
    assert lazy_tables("lazy-adam", "sparse", "sampled", 100, 1024, 250.0, 1024) == both
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        lazy_tables("sgd", "sparse", "sampled", 100, 16, 5.0, 8)


def test_auto_counts_the_rows_of_every_rank():
    from gpu_ann.optim import lazy_tables

    both = ("embed.item_table", "out.weight", "out.bias")
    # Under torchrun every rank's rows are gathered and stepped on: 10**6 items, batch 256, bags of 150 give
    # 38,400 bag entries a rank, 307,200 on 8 ranks (fewer than the items), 1,228,800 on 32 (not); the output
    # layer's 1,280 rows a rank stay far below on both.
    assert lazy_tables("auto", "sparse", "sampled", 10**6, 256, 150.0, 1024, world_size=8) == both
    assert lazy_tables("auto", "sparse", "sampled", 10**6, 256, 150.0, 1024, world_size=32) == (
        "out.weight",
        "out.bias",
    )
    # The boundary, W x (B + k): 2 x 2,048 = 4,096 rows are not fewer than 4,096 items, but than 4,097.
    assert lazy_tables("auto", "dense", "sampled", 4096, 1024, 99.0, 1024, world_size=2) == ()
    assert lazy_tables("auto", "dense", "sampled", 4097, 1024, 99.0, 1024, world_size=2) == ("out.weight", "out.bias")
    assert lazy_tables("auto", "sparse", "full", 10_001, 100, 50.0, world_size=2) == ("embed.item_table",)
    assert lazy_tables("auto", "sparse", "full", 10_000, 100, 50.0, world_size=2) == ()
    # lazy-adam takes every table whatever the ranks.
    assert lazy_tables("lazy-adam", "sparse", "sampled", 100, 1024, 250.0, 1024, world_size=4) == both
    with pytest.raises(ValueError, match="world_size must be at least 1, got 0"):
        lazy_tables("auto", "sparse", "sampled", 100, 16, 5.0, 8, world_size=0)


@pytest.mark.parametrize("world_size, lazy", [(1, ("out.weight", "out.bias")), (2, ())])
def test_the_trainer_and_the_planner_decide_alike_for_the_ranks(tmp_path, monkeypatch, world_size, lazy):
    # The trainer's choice (plan_run) and the tables the planner counts come from the same rule with the same
    # sizes and world size: 16 + 8 = 24 output rows a rank are fewer than the 30 items, two ranks' 48 are not
    # (the item table's ~16 x 5 bag entries a rank are not either way).
    from types import SimpleNamespace

    import gpu_ann.planner as planner
    from gpu_ann.backend import get_backend
    from gpu_ann.optim import lazy_tables
    from gpu_ann.run_setup import plan_run
    from gpu_ann.training import TrainConfig, _read_and_split

    counted = []

    def spy(*args, **kwargs):
        counted.append(lazy_tables(*args, **kwargs))
        return counted[-1]

    monkeypatch.setattr(planner, "lazy_tables", spy)
    cfg = TrainConfig(backend="cpu", batch_size=16, hidden=(8, 8, 8), input_path="sparse", softmax="sampled",
                      negatives=8, memory_budget=2**40, out=str(tmp_path / "run"))  # fmt: skip
    t = _tiny_table()
    _, splits, assignment = _read_and_split(cfg, t, None)
    replicas = SimpleNamespace(rank=0, world_size=world_size, is_main=True)  # what plan_run reads of Replicas
    path, chosen = plan_run(cfg, t, splits, assignment, get_backend("cpu"), replicas, None)
    assert path == "sparse" and chosen == lazy
    assert counted == [lazy]  # the planner counted the same tables


def _tiny_table():
    from gpu_ann.data.table import RatingsTable

    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(40), 6).astype(np.int32)
    items = np.concatenate([rng.choice(30, 6, replace=False) for _ in range(40)]).astype(np.int32)
    return RatingsTable(users, items, None, None, np.arange(40), np.arange(30), None, source="tiny")


@pytest.mark.parametrize(
    "settings, lazy",
    [
        # 30 items: 16 rows + 8 negatives = 24 output rows, fewer than 30: the output layer goes lazy.
        (dict(input_path="sparse", softmax="sampled", negatives=8), ["out.weight", "out.bias"]),
        # 16 + 16 = 32 rows, not fewer: plain Adam.
        (dict(input_path="sparse", softmax="sampled", negatives=16), None),
        # The dense path with the full softmax: plain Adam.
        (dict(input_path="dense"), None),
    ],
)
def test_the_default_auto_picks_per_run(tmp_path, settings, lazy):
    from gpu_ann.checkpoint import load_resume_state
    from gpu_ann.training import TrainConfig, train

    cfg = TrainConfig(backend="cpu", batch_size=16, hidden=(8, 8, 8), max_steps=4, eval_every=4, eval_batches=1,
                      out=str(tmp_path / "run"), **settings)  # fmt: skip
    assert cfg.optimizer == "auto"
    train(cfg, _tiny_table())
    state = load_resume_state(tmp_path / "run").optimizer_state
    if lazy is None:
        assert set(state) == {"state", "param_groups"}  # torch.optim.Adam's
    else:
        assert state["lazy_names"] == lazy


def test_a_run_saved_before_the_option_resumes_with_adam(tmp_path, monkeypatch):
    # A config without "optimizer" is an older run's, trained with Adam: it must resume with Adam, although
    # auto would make this run's output layer lazy (24 rows of 30) and Adam's state would not load into it.
    import gpu_ann.training as training
    from gpu_ann.checkpoint import STATE_FILE, load_resume_state

    cfg = training.TrainConfig(backend="cpu", batch_size=16, hidden=(8, 8, 8), max_steps=12, eval_every=4,
                               eval_batches=1, patience=100, input_path="sparse", softmax="sampled", negatives=8,
                               optimizer="adam", out=str(tmp_path / "run"))  # fmt: skip

    class Crash(Exception):
        pass

    real = training.save_resume_state

    def save_then_crash(run_dir, state):
        real(run_dir, state)
        if state.step == 8:  # the second evaluation's (the first one's is in the staged directory)
            raise Crash

    monkeypatch.setattr(training, "save_resume_state", save_then_crash)
    with pytest.raises(Crash):
        training.train(cfg, _tiny_table())
    monkeypatch.setattr(training, "save_resume_state", real)
    path = tmp_path / "run" / STATE_FILE
    payload = torch.load(path, weights_only=True)
    del payload["config"]["optimizer"]
    torch.save(payload, path)
    result = training.resume_run(tmp_path / "run")
    assert result.steps == 12
    assert set(load_resume_state(tmp_path / "run").optimizer_state) == {"state", "param_groups"}


def test_row_adam_matches_torch_sparse_adam():
    # RowAdam computes SparseAdam's update with row gathers: the same weights and moments after several steps
    # of repeated, missing and empty rows (float32, as training runs).
    from gpu_ann.optim import RowAdam

    gen = torch.Generator().manual_seed(4)
    start = torch.randn(50, 3, generator=gen)
    ours, theirs = (torch.nn.Parameter(start.clone()) for _ in range(2))
    row_adam, sparse_adam = RowAdam([ours], lr=0.02), torch.optim.SparseAdam([theirs], lr=0.02)
    for step in range(40):
        rows = torch.randint(0, 20, (0 if step == 3 else 30,), generator=gen)  # step 3: an empty gradient
        values = torch.randn(len(rows), 3, generator=gen)
        for p in (ours, theirs):
            p.grad = torch.sparse_coo_tensor(rows[None], values, (50, 3), check_invariants=True)
        row_adam.step()
        sparse_adam.step()
    # The same float32 operations in the same order: equal to the bit, weights and both moments.
    assert torch.equal(ours.detach(), theirs.detach())
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(row_adam.state[ours][key], sparse_adam.state[theirs][key])
    assert row_adam.state[ours]["step"] == sparse_adam.state[theirs]["step"] == 40
    assert torch.equal(ours.detach()[20:], start[20:])  # rows 20..49 never had a gradient
    ours.grad = torch.zeros(50, 3)
    with pytest.raises(RuntimeError, match=r"row-sparse gradients \(sparse_dim 1\); a parameter of shape"):
        row_adam.step()
    ours.grad = torch.ones(50, 3).to_sparse()  # sparse in both dimensions
    with pytest.raises(RuntimeError, match="has sparse_dim 2"):
        row_adam.step()

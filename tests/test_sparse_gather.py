"""Lazy Adam's row groups: the output layer's weight and bias coalesced with one sort, equal to the bit to
coalescing each; LazyAdam against torch's SparseAdam and Adam; and, on a GPU, the host-device syncs of a
torchrun step (the gathers of ``gpu_ann.sparse_gather`` faked in one process)."""

from __future__ import annotations

import warnings

import pytest
import torch

from gpu_ann.bags import Bags
from gpu_ann.model import CandidateGenerator
from gpu_ann.objective import Objective
from gpu_ann.optim import RowAdam, lazy_parameter_names
from gpu_ann.sampled import NegativeSampler
from gpu_ann.sparse_rows import coalesce_together, row_groups, shares_rows

CUDA = pytest.param("cuda", marks=pytest.mark.gpu)


def test_row_groups_pair_the_output_layers_weight_and_bias():
    both = ("embed.item_table", "out.weight", "out.bias")
    assert row_groups(both) == (("embed.item_table",), ("out.weight", "out.bias"))
    assert row_groups(("out.bias", "out.weight")) == (("out.weight", "out.bias"),)
    assert row_groups(("embed.item_table",)) == (("embed.item_table",),)
    assert row_groups(("out.weight",)) == (("out.weight",),)  # half a pair is a table alone
    assert row_groups(()) == ()


def _shared(device: str, n: int = 40, nnz: int = 300, width: int = 5, seed: int = 0) -> tuple:
    """A weight's and a bias's uncoalesced gradients on one index tensor, rows repeated many times."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, n, (1, nnz), generator=gen).to(device)
    weight = torch.randn(nnz, width, generator=gen).to(device)
    bias = torch.randn(nnz, generator=gen).to(device)
    make = lambda v, shape: torch.sparse_coo_tensor(rows, v, shape, check_invariants=True)  # noqa: E731
    return make(weight, (n, width)), make(bias, (n,))


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_coalescing_together_equals_coalescing_each_bit_for_bit(device):
    weight, bias = _shared(device)
    assert shares_rows([weight, bias])
    together = coalesce_together([weight, bias])
    for got, alone in zip(together, (weight.coalesce(), bias.coalesce())):
        assert got.is_coalesced() and got.shape == alone.shape
        assert torch.equal(got.indices(), alone.indices())
        assert torch.equal(got.values(), alone.values())  # the same additions in the same order, per column
        assert got.coalesce() is got  # RowAdam's coalesce returns it as it is: no second sort
    assert together[0].indices().data_ptr() == together[1].indices().data_ptr()  # one row tensor for both
    # Gradients on different index tensors (equal or not) do not count as sharing.
    other = torch.sparse_coo_tensor(bias._indices().clone(), bias._values(), bias.shape, check_invariants=True)
    assert not shares_rows([weight, other])


def _bags() -> Bags:
    # Three rows: items {1, 4}, {4, 7, 8}, {} (an empty bag); item 4 in two bags.
    return Bags(
        torch.tensor([1, 4, 4, 7, 8]),
        torch.tensor([0, 2, 5, 5]),
        torch.tensor([1.0, 0.5, 1.0, 2.0, 1.0]),
        torch.rand(3, 3, generator=torch.Generator().manual_seed(1)),
        torch.tensor([3, 8, 8]),
    )


def test_lazy_adam_sorts_each_row_group_once_and_steps_as_sparse_adam(monkeypatch):
    # The reference: torch's SparseAdam on the lazy parameters (each gradient coalesced on its own) and Adam on
    # the others. LazyAdam coalesces the output layer's weight and bias together and must give the same bits.
    torch.manual_seed(0)
    models = [CandidateGenerator(20, (4, 6, 5)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    start = models[0].out.bias.detach().clone()
    lazy = lazy_parameter_names("sparse", "sampled")
    objectives = [Objective(m, NegativeSampler(20, 6, "uniform", seed=3), sparse_grad=lazy) for m in models]
    ours = models[0].configure_optimizer(1e-2, lazy)
    named = dict(models[1].named_parameters())
    sparse_adam = torch.optim.SparseAdam([named[n] for n in lazy], lr=1e-2)
    adam = torch.optim.Adam([p for n, p in named.items() if n not in lazy], lr=1e-2)
    sorts = []
    coalesce = torch.Tensor.coalesce

    def counted(self):
        sorts.extend([] if self.is_coalesced() else [tuple(self.shape)])  # a coalesced tensor is returned as is
        return coalesce(self)

    for _ in range(3):
        for model, objective in zip(models, objectives):
            model.zero_grad(set_to_none=True)
            objective.loss(_bags()).backward()
        monkeypatch.setattr(torch.Tensor, "coalesce", counted)
        ours.step()
        monkeypatch.setattr(torch.Tensor, "coalesce", coalesce)
        sparse_adam.step()
        adam.step()
        # One sort per row group: the output layer's weight beside its bias (5 + 1 columns), then the item
        # table alone (4 columns), in RowAdam; RowAdam finds the output layer's gradients coalesced.
        assert sorts == [(20, 6), (20, 4)], sorts
        sorts.clear()
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(models[0].out.bias, start)  # the output layer did move


def _syncs(fn) -> int:
    """The host-device syncs torch sees while ``fn()`` runs (its sync debug mode warns at each)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


@pytest.mark.gpu
def test_a_torchrun_step_syncs_twice_per_row_group_and_once_for_the_counts():
    # The step of a two-rank run without its collectives: the gathers are faked in one process (both "ranks"
    # send this one's rows). Each row group is coalesced on the rank and again once gathered; the row counts
    # of every group are read on the host once; RowAdam then sorts nothing.
    from gpu_ann import sparse_gather

    def two_ranks(out, tensor):
        out.view(2, -1).copy_(tensor.unsqueeze(0).expand(2, -1))
        return [out, tensor]

    weight_grad, bias_grad = _shared("cuda", width=5)
    table_grad = _shared("cuda", width=4, seed=1)[0]
    table, weight, bias = (
        torch.nn.Parameter(torch.zeros(g.shape, device="cuda")) for g in (table_grad, weight_grad, bias_grad)
    )
    groups = [(table,), (weight, bias)]
    optimizer = RowAdam([table, weight, bias])
    # A coalesce learns how many distinct rows there are: a sync inside thrust, which torch's debug mode may
    # not see, so the count of one coalesce is measured rather than assumed.
    per_coalesce = _syncs(lambda: table_grad.coalesce())

    def step():
        local = [sparse_gather.local_rows(g) for g in ([table_grad], [weight_grad, bias_grad])]
        gathered, _ = sparse_gather.gather_rows(local, 2, gather=two_ranks)
        for group, (rows, values) in zip(groups, gathered):
            for p, grad in zip(group, sparse_gather.merged_gradients(rows, values, 2, group)):
                p.grad = grad
        optimizer.step()

    assert _syncs(step) == 2 * len(groups) * per_coalesce + 1
    # Both "ranks" sent the same rows: their mean is this rank's gradient, and RowAdam moved exactly those rows.
    assert torch.equal(weight.grad.to_dense(), weight_grad.coalesce().to_dense())
    moved = set(weight.detach().ne(0).any(dim=1).nonzero().flatten().tolist())
    assert moved == set(weight_grad._indices()[0].tolist())


@pytest.fixture
def one_rank_gloo(tmp_path, monkeypatch):
    """A one-process gloo group, and the probe's memory of this process left as the test found it."""
    import torch.distributed as dist

    from gpu_ann import sparse_gather

    monkeypatch.setattr(sparse_gather, "_PROBED", {})
    monkeypatch.setattr(sparse_gather, "WITHOUT_SINGLE_GATHER", {})
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield sparse_gather
    dist.destroy_process_group()


def test_a_backend_without_the_one_tensor_gather_is_found_once_and_empty_gathers_work(one_rank_gloo, monkeypatch):
    sparse_gather = one_rank_gloo
    calls = []

    def no_single(out, tensor):
        calls.append(tensor.numel())
        raise RuntimeError("no support for _allgather_base in Gloo process group")

    monkeypatch.setattr(sparse_gather, "_GATHER_SINGLE", no_single)
    values = torch.arange(6, dtype=torch.float32)
    out = torch.empty(6)
    sparse_gather.all_gather_flat(out, values)
    assert torch.equal(out, values) and calls == [1]  # the one-number probe, then all_gather
    assert list(sparse_gather.WITHOUT_SINGLE_GATHER) == ["gloo"]
    # Every rank sending no rows (each failed the same check): a [W x 0] gather, not a reshape error.
    empty = torch.empty(0)
    sparse_gather.all_gather_flat(empty, torch.empty(0))
    assert empty.shape == (0,) and calls == [1]


def test_a_failing_gather_on_a_backend_that_has_it_is_raised_not_taken_for_a_missing_one(one_rank_gloo, monkeypatch):
    # Were it taken for a missing collective, this rank alone would switch to all_gather while the others
    # wait in the one-tensor gather: a hang.
    sparse_gather = one_rank_gloo
    sparse_gather.all_gather_flat(torch.empty(1, dtype=torch.int64), torch.ones(1, dtype=torch.int64))  # probes
    assert sparse_gather.WITHOUT_SINGLE_GATHER == {}

    def out_of_memory(out, tensor):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(sparse_gather, "_GATHER_SINGLE", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        sparse_gather.all_gather_flat(torch.empty(3), torch.ones(3))
    assert sparse_gather.WITHOUT_SINGLE_GATHER == {}

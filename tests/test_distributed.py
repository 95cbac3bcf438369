"""``gpu_ann.distributed.Replicas`` in 2 gloo processes on the CPU: gradient averaging in one reused buffer,
the replica check's hash (one ulp, and changes a sum would miss), and rank 0's decision reaching rank 1."""

from __future__ import annotations

import functools
import hashlib
import os
import queue

import numpy as np
import pytest
import torch

from gpu_ann.distributed import tensor_digest

TIMEOUT = 120  # a hang (a rank waiting for a collective the other never joins) fails instead of blocking CI


def _start(worker, rank: int, store_path: str, results, args: tuple) -> None:
    """Spawned process: join a 2-rank gloo group through a file store, run ``worker``, hand back its result."""
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        results.put((rank, worker(rank, *args)))
    finally:
        dist.destroy_process_group()


def run_two_ranks(worker, tmp_path, *args) -> list:
    """``worker(rank, *args)`` on ranks 0 and 1 (a module-level function, for spawn); their results by rank.

    Waits at most ``TIMEOUT`` seconds: a rank that never returns fails the test, and both are killed.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store = str(tmp_path / "store")
    procs = [ctx.Process(target=_start, args=(worker, r, store, results, args)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=TIMEOUT) for _ in procs)
    except queue.Empty:
        raise AssertionError(f"a rank did not finish within {TIMEOUT} s (waiting in a collective?)") from None
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    return [got[0], got[1]]


def _averaging_worker(rank: int) -> dict:
    from gpu_ann.distributed import Replicas

    replicas = Replicas("cpu")
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    averaged, pointers = [], []
    for step in range(3):
        # Rank r's gradient is (r + 1) * (step + 1) everywhere: the mean is 1.5 * (step + 1).
        for p in model.parameters():
            p.grad = torch.full_like(p, (rank + 1.0) * (step + 1))
        replicas.average_gradients(model.parameters())
        averaged.append(all(torch.equal(p.grad, torch.full_like(p, 1.5 * (step + 1))) for p in model.parameters()))
        pointers.append(replicas.gradient_buffer.data_ptr())
    return dict(averaged=averaged, pointers=pointers, size=replicas.gradient_buffer.numel())


def test_gradients_are_averaged_in_one_buffer_made_once(tmp_path):
    for got in run_two_ranks(_averaging_worker, tmp_path):
        assert got["averaged"] == [True, True, True]
        assert got["size"] == 3 * 2 + 2  # every gradient of Linear(3, 2), flat
        assert len(set(got["pointers"])) == 1, got["pointers"]  # the same buffer at every step: no new one


def _sparse_averaging_worker(rank: int) -> dict:
    from gpu_ann.distributed import Replicas

    replicas = Replicas("cpu")
    table = torch.nn.Parameter(torch.zeros(6, 2))
    dense = torch.nn.Parameter(torch.zeros(3))
    # Rank 0 touches rows 1 (twice) and 4, rank 1 rows 4 and 5 (and rank 1 more rows: uneven counts).
    rows = {0: [1, 4, 1], 1: [4, 5]}[rank]
    values = torch.arange(1.0, 2 * len(rows) + 1).reshape(-1, 2) * (10 if rank else 1)
    table.grad = torch.sparse_coo_tensor(torch.tensor([rows]), values, (6, 2), check_invariants=True)
    dense.grad = torch.full((3,), float(rank + 1))
    replicas.average_gradients([table, dense], sparse=[table])
    return dict(
        is_sparse=table.grad.is_sparse,
        table=table.grad.to_dense().tolist(),
        dense=dense.grad.tolist(),
        buffer=replicas.gradient_buffer.numel(),
    )


def test_sparse_gradients_are_gathered_and_averaged(tmp_path):
    # The mean over the ranks of the dense sums: rank 0 row 1 = [1, 2] + [5, 6], row 4 = [3, 4]; rank 1 row 4 =
    # [10, 20], row 5 = [30, 40]; halved. Every rank gets the same gradient, sparse, and the dense one averaged.
    want = [[0, 0], [3, 4], [0, 0], [0, 0], [6.5, 12], [15, 20]]
    for got in run_two_ranks(_sparse_averaging_worker, tmp_path):
        assert got["is_sparse"]
        assert got["table"] == want
        assert got["dense"] == [1.5, 1.5, 1.5]
        assert got["buffer"] == 3  # the flat buffer holds the dense gradient only


def _check_worker(rank: int, change: str) -> str:
    from gpu_ann.distributed import Replicas, ReplicasDiverged

    replicas = Replicas("cpu")
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    replicas.check_identical(model.parameters(), step=1)  # identical on both ranks: passes
    if rank == 1:
        bits = model.weight.data.view(-1).view(torch.int32)  # the float32 weights' bit patterns
        if change == "one ulp":
            bits[4] += 1  # the next float32 after weight[1, 1]
        else:  # one weight one ulp up, another one ulp down: the bit patterns' sum stays the same
            bits[0] += 1
            bits[5] -= 1
    try:
        replicas.check_identical(model.parameters(), step=2)
    except ReplicasDiverged as exc:
        return str(exc)
    return ""


def test_replica_check_detects_one_ulp(tmp_path):
    got = run_two_ranks(_check_worker, tmp_path, "one ulp")
    assert got[0] == "after step 2 the weights of rank 1 differ from rank 0's (parameter 0 of 2, shape (2, 3))"
    assert got[1] == "after step 2 the weights of rank 0 differ from rank 1's (parameter 0 of 2, shape (2, 3))"


def test_replica_check_detects_changes_that_keep_the_sum(tmp_path):
    # The check before compared sums of each parameter's int32 bit patterns, which these two changes keep.
    weight = torch.nn.Linear(3, 2).weight.detach().clone()
    bits = weight.view(-1).view(torch.int32)
    before = int(bits.sum(dtype=torch.int64))
    bits[0] += 1
    bits[5] -= 1
    assert int(bits.sum(dtype=torch.int64)) == before  # a sum cannot see them
    got = run_two_ranks(_check_worker, tmp_path, "two ulps, opposite")
    assert got[0].startswith("after step 2 the weights of rank 1 differ from rank 0's (parameter 0 of 2")


def test_tensor_digest_hashes_the_bytes_in_memory_order():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    expected = int.from_bytes(hashlib.blake2b(t.numpy().tobytes(), digest_size=8).digest(), "little", signed=True)
    assert tensor_digest(t) == expected
    # A transposed view hashes as its contiguous copy, the bytes of its elements in row-major order.
    view = t.T
    copy = np.ascontiguousarray(view.numpy()).tobytes()
    assert tensor_digest(view) == int.from_bytes(hashlib.blake2b(copy, digest_size=8).digest(), "little", signed=True)
    assert tensor_digest(view) != tensor_digest(t)
    assert -(2**63) <= tensor_digest(t) < 2**63  # fits an int64 tensor
    nudged = t.clone()
    nudged[2, 3] = torch.nextafter(nudged[2, 3], torch.tensor(100.0))
    assert tensor_digest(nudged) != tensor_digest(t)


def _agree_worker(rank: int) -> bool:
    from gpu_ann.distributed import Replicas

    return Replicas("cpu").agree(rank == 0)  # only rank 0's decision counts


def test_rank_zero_decides_for_all(tmp_path):
    assert run_two_ranks(_agree_worker, tmp_path) == [True, True]


def _lazy_gradients(rank: int) -> dict:
    """Rank ``rank``'s gradients of a small model with lazy tables, as a step makes them (uncoalesced, repeated rows).

    The item table's rows are a bag's entries; the output layer's weight and bias hold one index tensor between
    them, as one gather gives both (``gpu_ann.sampled.gather_rows``). Rank 1 reads more rows than rank 0.
    """
    gen = torch.Generator().manual_seed(10 + rank)
    entries = torch.randint(0, 12, (9 + 4 * rank,), generator=gen)  # repeats within a rank, overlaps across
    gathered = torch.randint(0, 12, (5 + rank,), generator=gen).unsqueeze(0)
    sparse = functools.partial(torch.sparse_coo_tensor, check_invariants=True)
    return {
        "table": sparse(entries[None], torch.randn(len(entries), 3, generator=gen), (12, 3)),
        "weight": sparse(gathered, torch.randn(gathered.shape[1], 4, generator=gen), (12, 4)),
        "bias": sparse(gathered, torch.randn(gathered.shape[1], generator=gen), (12,)),
        "dense": torch.full((2,), float(rank + 1)),
    }


def _old_mean(grads: list) -> torch.Tensor:
    """The mean as each parameter was gathered before: each rank's coalesced, concatenated, over W, coalesced."""
    ranks = [g.coalesce() for g in grads]
    rows = torch.cat([g.indices() for g in ranks], dim=1)
    values = torch.cat([g.values() for g in ranks]).div_(len(grads))
    return torch.sparse_coo_tensor(rows, values, grads[0].shape, check_invariants=True).coalesce()


def _counting(calls: list, name: str, fn):
    def counted(*args, **kwargs):
        calls.append(name)
        return fn(*args, **kwargs)

    return counted


def _lazy_step_worker(rank: int, fallback: bool) -> dict:
    import torch.distributed as dist

    from gpu_ann import sparse_gather
    from gpu_ann.distributed import Replicas
    from gpu_ann.optim import RowAdam

    params = {k: torch.nn.Parameter(torch.zeros(g.shape)) for k, g in _lazy_gradients(0).items()}
    groups = [(params["table"],), (params["weight"], params["bias"])]
    collectives, reads = [], []
    if fallback:  # a backend without the one-tensor all-gather: it raises before sending anything

        def no_single(out, tensor):
            raise RuntimeError("no support for _allgather_base in Gloo process group")

        sparse_gather._GATHER_SINGLE = no_single
    sparse_gather._GATHER_SINGLE = _counting(collectives, "gather single", sparse_gather._GATHER_SINGLE)
    dist.all_gather = _counting(collectives, "all_gather", dist.all_gather)
    dist.all_reduce = _counting(collectives, "all_reduce", dist.all_reduce)
    # Every way a tensor's value reaches the host (on CUDA, each a host-device sync), and every coalesce that
    # sorts (on CUDA, each a sync too: the number of distinct rows).
    for method in ("tolist", "item", "__int__", "__float__", "__bool__", "__index__"):
        setattr(torch.Tensor, method, _counting(reads, method, getattr(torch.Tensor, method)))
    sorts, coalesce = [], torch.Tensor.coalesce

    def counted_coalesce(t):
        if not t.is_coalesced():  # a coalesced tensor is returned as it is
            sorts.append(tuple(t.shape))
        return coalesce(t)

    torch.Tensor.coalesce = counted_coalesce
    replicas = Replicas("cpu")
    for k, g in _lazy_gradients(rank).items():
        params[k].grad = g
    replicas.average_gradients(params.values(), sparse=groups)
    RowAdam([params[k] for k in ("table", "weight", "bias")]).step()  # finds every gradient coalesced
    mine = dict(collectives=list(collectives), reads=list(reads), sorts=list(sorts))
    torch.Tensor.coalesce = coalesce
    theirs = [_lazy_gradients(r) for r in range(2)]  # both ranks' gradients, made again here for the reference
    weight, bias = params["weight"].grad, params["bias"].grad
    return dict(
        **mine,
        same_bits={
            k: torch.equal(params[k].grad.to_dense(), _old_mean([t[k] for t in theirs]).to_dense())
            for k in ("table", "weight", "bias")
        },  # fmt: skip
        coalesced=[params[k].grad.is_coalesced() for k in ("table", "weight", "bias")],
        shared_rows=weight.indices().data_ptr() == bias.indices().data_ptr(),
        dense=params["dense"].grad.tolist(),
        without=dict(sparse_gather.WITHOUT_SINGLE_GATHER),
    )


@pytest.mark.parametrize("fallback", [False, True])
def test_a_lazy_step_gathers_every_table_with_three_collectives_and_one_read(tmp_path, fallback):
    for got in run_two_ranks(_lazy_step_worker, tmp_path, fallback):
        # The dense all-reduce, then the row counts of both groups, their rows and their values: three gathers,
        # after the process's one probe of the one-tensor gather (with the fallback it raises, and all_gather
        # is used from then on). One value read on the host: the counts (it was one per rank per parameter).
        gathers = ["gather single", *(["all_gather"] if fallback else ["gather single"]) * 3]
        assert got["collectives"] == ["all_reduce", *gathers]
        assert got["reads"] == ["tolist"]
        # Each group sorted twice, on the rank and gathered (the output layer's weight beside its bias: 4 + 1
        # columns), and never again by RowAdam: four sorts, where each parameter was sorted twice before (six).
        assert got["sorts"] == [(12, 3), (12, 5), (12, 3), (12, 5)]
        # The same bits as each parameter gathered and coalesced on its own, coalesced for RowAdam, and the
        # output layer's weight and bias on one row tensor.
        assert got["same_bits"] == {"table": True, "weight": True, "bias": True}
        assert got["coalesced"] == [True, True, True] and got["shared_rows"]
        assert got["dense"] == [1.5, 1.5]
        assert list(got["without"]) == (["gloo"] if fallback else [])


def _held_gathers_worker(rank: int) -> dict:
    import gc
    import weakref

    from gpu_ann import distributed
    from gpu_ann.distributed import Replicas

    params = {k: torch.nn.Parameter(torch.zeros(g.shape)) for k, g in _lazy_gradients(0).items()}
    groups = [(params["table"],), (params["weight"], params["bias"])]

    def step(replicas) -> list:
        for k, g in _lazy_gradients(rank).items():
            params[k].grad = g
        replicas.average_gradients(params.values(), sparse=groups)
        return [weakref.ref(t) for t in replicas._last_sparse_gathers]

    def alive(refs) -> list:
        gc.collect()
        return [r() is not None for r in refs]

    first = Replicas("cpu")
    one, two = step(first), step(first)
    got = dict(after_two_steps=(alive(one), alive(two)))
    first.close()
    last = distributed._RECENT_COLLECTIVE_TENSORS[-1]
    got["handed_over"] = first._last_sparse_gathers is None and all(a is r() for a, r in zip(last, two, strict=True))
    del last
    # A second run in the same process starts with none of the first's, which stay referenced (a gloo worker
    # may still release them) until later collectives take their place in the bounded hold.
    second = Replicas("cpu")
    got["second_starts_empty"] = second._last_sparse_gathers is None
    step(second)
    got["first_run_kept"] = alive(two)
    for _ in range(distributed._RECENT_COLLECTIVE_TENSORS.maxlen):
        distributed._hold(torch.zeros(1))
    got["first_run_released"] = alive(two)
    return got


def test_sparse_gathers_are_held_one_step_at_a_time_by_their_run(tmp_path):
    for got in run_two_ranks(_held_gathers_worker, tmp_path):
        # Six tensors a step (the counts, rows and values, sent and gathered); the first step's are gone once
        # the second step's exist: never more than one step's.
        first, second = got["after_two_steps"]
        assert first == [False] * 6 and second == [True] * 6
        assert got["handed_over"] and got["second_starts_empty"]
        assert got["first_run_kept"] == [True] * 6
        assert got["first_run_released"] == [False] * 6

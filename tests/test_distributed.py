"""``gpu_ann.distributed.Replicas`` in 2 gloo processes on the CPU: gradient averaging in one reused buffer,
the replica check's hash (one ulp, and changes a sum would miss), and rank 0's decision reaching rank 1."""

from __future__ import annotations

import hashlib
import os
import queue

import numpy as np
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

"""Lazy Adam's step alone: :class:`gpu_ann.optim.RowAdam` against ``torch.optim.SparseAdam``, same gradients.

The two compute the same update (``tests/test_lazy_adam.py`` holds them to it); this measures what the
row-gather form saves. Two tables of ``--lazy-items`` rows x 64, as the 10**6-item run of
``bench/large_catalogue.py`` has them: the first layer's, whose gradient holds one row per bag entry of a
batch of 256 (40,000 entries, drawn with a power-law popularity as real bags are), and the output layer's,
with the 1,280 rows of 256 targets and 1,024 negatives. ``conftest.summarise`` reports RowAdam's step rate
over SparseAdam's, measured in the same run.
"""

from __future__ import annotations

import pytest
import torch
from conftest import record, sync

from gpu_ann.optim import RowAdam

WIDTH = 64  # h0 = h2 of the large-catalogue run
BAG_ENTRIES = 40_000  # a batch of 256 bags at that run's mean bag length (the planner's estimate)
OUTPUT_ROWS = 256 + 1024  # targets and negatives
N_GRADIENTS = 8  # distinct gradients cycled through

OPTIMIZERS = {"torch-sparse-adam": torch.optim.SparseAdam, "row-adam": RowAdam}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_lazy_optimizer_step(benchmark, backend, request, name):
    n = request.config.getoption("--lazy-items")
    device = backend.torch_device
    gen = torch.Generator().manual_seed(0)
    popularity = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** 0.8

    def gradient(rows: torch.Tensor) -> torch.Tensor:
        values = torch.randn(len(rows), WIDTH, generator=gen)
        return torch.sparse_coo_tensor(rows[None], values, (n, WIDTH), check_invariants=True).to(device)

    grads = [
        (
            gradient(torch.multinomial(popularity, BAG_ENTRIES, replacement=True, generator=gen)),
            gradient(torch.randint(0, n, (OUTPUT_ROWS,), generator=gen)),
        )
        for _ in range(N_GRADIENTS)
    ]
    tables = [torch.nn.Parameter(torch.zeros(n, WIDTH, device=device)) for _ in range(2)]
    optimizer = OPTIMIZERS[name](tables, lr=1e-3)
    step = iter(range(10**9))

    def one_step():
        for table, grad in zip(tables, grads[next(step) % N_GRADIENTS]):
            table.grad = grad
        optimizer.step()
        sync(backend)

    for _ in range(2):  # warm-up: the moments are allocated at the first step
        one_step()
    benchmark.pedantic(one_step, rounds=20, warmup_rounds=2, iterations=1)
    record(benchmark, "optimizer-step", name, 256, n, "fp32", calls=1)

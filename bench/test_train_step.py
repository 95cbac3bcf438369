"""Training-step throughput of every variant the trainer offers, against dense + full softmax, fp32, eager.

A step is what ``gpu_ann.training.train`` does per batch: assemble the batch (dense rows or bags), the loss
of :class:`gpu_ann.objective.Objective` (full or sampled softmax, fp32 or bf16 autocast, eager or
``torch.compile``), backward, Adam (or lazy Adam, ``--train-optimizers``). Every variant runs on the same
synthetic matrix and the same sample indices in the same run, so their samples/s compare directly
(``conftest.summarise`` reports each one's ratio to ``dense+full`` fp32 eager at the same size). Also
reported: the share of the step spent in assembly (assembly timed alone in the same run), achieved TFLOP/s
from counted multiply-adds, and on the GPU, MFU against a bf16 8192³ matmul measured in the same run. The
next batch's kernel is queued on torch's stream right behind the step that reads the current one, so the
host never waits for it; on the device the two are serial, and the assembly share says what that costs.
"""

from __future__ import annotations

import shutil
import statistics
import time

import numpy as np
import pytest
import torch
from conftest import RESULTS, Measurement, TrainCase, record, sync, synthetic_matrix

from gpu_ann import synthetic
from gpu_ann.bags import BagAssembler
from gpu_ann.batching import BatchAssembler
from gpu_ann.matrix import InteractionMatrix
from gpu_ann.model import N_FEATURES, CandidateGenerator
from gpu_ann.objective import Objective
from gpu_ann.optim import lazy_parameter_names
from gpu_ann.sampled import NegativeSampler
from gpu_ann.splits import Samples

USERS = 20_000
ITEMS_PER_USER = 175  # MyAnimeList 2020's mean
N_BATCHES = 8  # distinct batches cycled through, so that no step reuses the previous one's inputs
SLOW_STEP_S = 5.0  # a warm-up step slower than this (bf16 on a CPU without bf16 units) is timed once


def step_flops(
    n_items: int, hidden: tuple[int, int, int], batch: int, bag_entries: float, negatives: int | None
) -> float:
    """Multiply-add FLOPs (2 per multiply-add) of one step: forward, weight gradients, input gradients.

    The batch needs no gradient, so the first layer computes none for its input. Its forward and weight
    gradient are a ``B x (n + 3) x h0`` product each on the dense path; on the sparse path a weighted
    sum of ``h0``-wide rows per bag entry (the same arithmetic on the nonzeros only) and its scatter.
    The output layer computes ``n`` logits per row with the full softmax, ``k + 1`` with the sampled one.

    Parameters
    ----------
    n_items : int
        Catalogue size ``n``.
    hidden : tuple of three ints
        ``(h0, h1, h2)``.
    batch : int
        Rows per step ``B``.
    bag_entries : float
        Sparse path: bag entries per row, on average over the timed batches; 0 on the dense path.
    negatives : int or None
        ``k`` of the sampled softmax, None for the full softmax.

    Returns
    -------
    float
        FLOPs of one step.
    """
    h0, h1, h2 = hidden
    first = bag_entries * h0 + N_FEATURES * h0 if bag_entries else (n_items + N_FEATURES) * h0
    outputs = n_items if negatives is None else negatives + 1
    middle = h0 * h1 + h1 * h2
    return 2.0 * batch * (2 * first + 3 * middle + 3 * h2 * outputs)


@pytest.fixture(scope="session")
def matmul_peak(backend):
    """bf16 matmul rate (FLOP/s) on the GPU, measured once in this run; None on the CPU."""
    if backend.name != "cuda":
        return None
    a = torch.randn(8192, 8192, device=backend.torch_device, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    end.synchronize()
    rate = 20 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3)
    RESULTS.append(
        Measurement("ceiling", "bf16-matmul", 8192, 8192, "bf16", 2 * 8192**3 / rate, extra={"tflops": rate / 1e12})
    )
    return rate


def median_seconds(fn, rounds=5) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def method_name(backend, case: TrainCase, negatives: int) -> str:
    """``"step-cpu dense+full"``, ``"step-cuda sparse+sampled-1024 compiled"``: what the results table shows."""
    softmax = case.softmax if case.softmax == "full" else f"sampled-{negatives}"
    suffix = (" compiled" if case.compiled else "") + (" lazy-adam" if case.optimizer == "lazy-adam" else "")
    return f"step-{backend.name} {case.path}+{softmax}" + suffix


def compile_unavailable(backend) -> str | None:
    """Why ``torch.compile`` cannot run here, or None: inductor builds C++ on the CPU and Triton on the GPU."""
    if backend.name == "cpu" and shutil.which("cc") is None and shutil.which("gcc") is None:
        return "torch.compile needs a C compiler on the CPU (none on PATH)"
    if backend.name == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch.compile needs Triton on the GPU (not installed)"
    return None


def test_train_step(benchmark, backend, matmul_peak, train_case, request):
    case = train_case
    negatives = request.config.getoption("--train-negatives")
    if case.compiled and (reason := compile_unavailable(backend)):
        pytest.skip(reason)
    csr = synthetic_matrix(USERS, case.n_items, USERS * ITEMS_PER_USER)
    users, items = synthetic.samples_of(csr)
    samples = Samples(users, items)
    matrix = InteractionMatrix.from_scipy(backend, csr)
    # As the trainer builds them: bf16 dense batches are written in bf16 (half the bytes), bags stay fp32.
    if case.path == "dense":
        dtype = torch.bfloat16 if case.dtype == "bf16" else torch.float32
        asm = BatchAssembler(matrix, samples, case.batch, dtype=dtype)
    else:
        asm = BagAssembler(matrix, samples, case.batch)
    order = asm.to_device_indices(np.random.default_rng(0).integers(0, len(users), N_BATCHES * case.batch))
    batches = [order[i * case.batch : (i + 1) * case.batch] for i in range(N_BATCHES)]
    bag_entries = (
        float(np.mean([b.total for b in batches])) / case.batch if case.path == "sparse" else 0.0
    )  # host-side totals: no sync

    torch.manual_seed(0)
    model = CandidateGenerator(csr.shape[1]).to(backend.torch_device)
    # lazy-adam: sparse gradients for the item tables the step reads rows of, as the trainer makes them.
    lazy = lazy_parameter_names(case.path, case.softmax) if case.optimizer == "lazy-adam" else ()
    optimizer = model.configure_optimizer(lazy=lazy)
    sampler = None
    if case.softmax == "sampled":
        # The trainer's proposal: training counts (here every sample) to the power 0.75, plus one.
        counts = np.bincount(items, minlength=csr.shape[1])
        sampler = NegativeSampler(
            csr.shape[1], negatives, "popularity", counts, power=0.75, device=backend.torch_device, seed=0
        )
    if case.compiled:
        # Dynamo keeps one cache per code object, shared by every Objective: start each compiled variant
        # afresh, or after its recompile limit it would silently run eagerly.
        torch._dynamo.reset()
    objective = Objective(model, sampler, case.dtype, compile=case.compiled, sparse_grad=lazy)

    def step(i):
        loss = objective.loss(asm.assemble(batches[i % N_BATCHES]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def timed_step(i) -> float:
        started = time.perf_counter()
        step(i)
        sync(backend)
        return time.perf_counter() - started

    try:
        first = timed_step(0)  # warm-up: kernel compile, torch.compile, allocator, autocast caches
    except Exception as exc:
        if not case.compiled:
            raise
        # Only compiling may fail for want of a toolchain this machine lacks; the eager variants show the step works.
        first_line = (str(exc).splitlines() or [""])[0][:200]
        pytest.skip(f"torch.compile failed here: {type(exc).__name__}: {first_line}")
    # Compiled: a second warm-up step, so that a recompile for other batch shapes is not timed, and so that
    # the choice of rounds below is made on a step without the compile.
    warm = timed_step(1) if case.compiled else first
    if backend.name == "cuda":
        reps, rounds, warmup_rounds = 8, 5, 1
    elif warm < SLOW_STEP_S:
        reps, rounds, warmup_rounds = 2, 3, 0
    else:
        reps, rounds, warmup_rounds = 1, 1, 0

    def steps():
        for i in range(reps):
            step(i)
        sync(backend)

    def assembly_only():
        for i in range(reps):
            asm.assemble(batches[i % N_BATCHES])
        sync(backend)

    benchmark.pedantic(steps, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    assembly = median_seconds(assembly_only, rounds=max(rounds, 3)) / reps
    seconds = benchmark.stats.stats.median / reps
    flops = step_flops(
        csr.shape[1], model.hidden_sizes, case.batch, bag_entries, negatives if case.softmax == "sampled" else None
    )
    extra = {"assembly_fraction": assembly / seconds, "tflops": flops / seconds / 1e12, "steps_timed": reps * rounds}
    if case.compiled:
        extra["first_step_s"] = first  # compiling included
    if matmul_peak:
        extra["mfu"] = flops / seconds / matmul_peak
    record(
        benchmark, "train-step", method_name(backend, case, negatives), case.batch, csr.shape[1], case.dtype,
        calls=reps, **extra,
    )  # fmt: skip

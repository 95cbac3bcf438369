"""The memory planner: hand-computed estimates, the refusal message, and the estimate against a measured peak."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from gpu_ann.backend import get_backend
from gpu_ann.memory_budget import device_budget
from gpu_ann.model import CandidateGenerator
from gpu_ann.planner import MemoryBudgetExceeded, MemoryPlan, check, estimate, format_bytes

# The tiny run of the hand-computed cases: 3 users x 5 items, 7 stored entries (one training sample each),
# hidden (h0, h1, h2) = (2, 3, 4), batch B = 2.
TINY = dict(n_users=3, n_items=5, nnz=7, n_samples=7, batch_size=2, hidden=(2, 3, 4), device="cpu")

# Parameters of CandidateGenerator(5, (2, 3, 4)), layer by layer:
#   item table 5 x 2 = 10, count-feature weight 2 x 3 = 6      (the first layer, no bias)
#   Linear(2, 3): 2 x 3 + 3 = 9;  Linear(3, 4): 3 x 4 + 4 = 16;  Linear(4, 5) (output): 4 x 5 + 5 = 25
TINY_PARAMS = 10 + 6 + 9 + 16 + 25  # = 66
TINY_LARGEST_TENSOR = 4 * 5  # the output weight, 20 elements


def test_tiny_parameter_count_matches_the_model():
    # The hand count the cases below rest on, checked against the model itself.
    model = CandidateGenerator(5, (2, 3, 4))
    assert sum(p.numel() for p in model.parameters()) == TINY_PARAMS
    assert max(p.numel() for p in model.parameters()) == TINY_LARGEST_TENSOR


def test_dense_full_softmax_by_hand():
    plan = estimate(**TINY)
    csr = (3 + 1) * 8 + 7 * 4  # int64 indptr of 4 entries + int32 indices of 7 = 60
    samples = 7 * (4 + 4 + 8)  # int32 user + int32 item per sample, + int64 epoch order = 112
    batch = 2 * (5 + 3) * 4 + 2 * 8  # float32 X [2, 8] + int64 y [2] = 80
    parameters = 66 * 4  # = 264, and as much again for the gradients
    optimizer = 2 * 66 * 4  # Adam's two moments = 528
    optimizer_step = 2 * 20 * 4  # CPU Adam, one tensor at a time: two temporaries of the largest (20) = 160
    activations = 2 * 2 * (2 + 2 * 3 + 2 * 4) * 4  # 2 B (h0 + 2 h1 + 2 h2) float32 = 256
    logits = 3 * 2 * 5 * 4  # logits, log-softmax and gradient, [B, n] each = 120
    evaluation = 2 * 2 * 5 * 4 + 2 * (2 + 3 + 4) * 4  # logits + log-softmax, and the hidden layers = 152
    assert plan.terms() == dict(
        csr=csr,
        samples=samples,
        sampler=0,
        batch=batch,
        parameters=parameters,
        gradients=parameters,
        optimizer=optimizer,
        optimizer_step=optimizer_step,
        activations=activations,
        logits=logits,
        evaluation=evaluation,
        gradient_buffer=0,  # one process: no all-reduce buffer
        autocast=0,  # fp32: no bf16 copies
    )
    assert plan.persistent == 60 + 112 + 0 + 80 + 264 + 264 + 528  # = 1308
    # The step's transients (256 + 120 = 376) beat the optimiser step (160) and evaluation (152).
    assert plan.total == 1308 + 376 == 1684


def test_sparse_sampled_by_hand():
    plan = estimate(**TINY, path="sparse", softmax="sampled", negatives=3, max_row_length=4)
    sampler = 5 * (8 + 8 + 4)  # alias table: float64 keep + int64 alias, and float32 log Q, per item = 100
    # Bags of up to L = 4 items: int64 index + float32 weight per entry (2 x 4 x 12 = 96), int64 offsets [B + 1]
    # (24), float32 features [B, 3] (24), int64 labels (16).
    batch = 2 * 4 * (8 + 4) + 3 * 8 + 2 * 3 * 4 + 2 * 8  # = 160
    activations = 256 + 2 * 4 * 3 * 8  # the dense path's 256, + three int64 B x L index arrays (192) = 448
    # Logits of the target and k = 3 negatives, three [B, k + 1] float32 arrays (96), the accidental-hit mask
    # [B, k] of bools (6), the gathered output rows [B + k, h2] and their gradient (160).
    logits = 3 * 2 * (3 + 1) * 4 + 2 * 3 + 2 * (2 + 3) * 4 * 4  # = 262
    expected = dict(
        csr=60,
        samples=112,
        sampler=sampler,
        batch=batch,
        parameters=264,
        gradients=264,
        optimizer=528,
        optimizer_step=160,
        activations=activations,
        logits=logits,
        evaluation=152,  # evaluation is always over the full softmax, as in the dense case
        gradient_buffer=0,
        autocast=0,
    )
    assert plan.terms() == expected
    assert plan.persistent == 60 + 112 + 100 + 160 + 264 + 264 + 528  # = 1488
    assert plan.total == 1488 + 448 + 262 == 2198


def test_lazy_adam_sparse_sampled_by_hand():
    sparse = dict(path="sparse", softmax="sampled", negatives=3, max_row_length=4)
    adam = estimate(**TINY, **sparse).terms()
    plan = estimate(**TINY, **sparse, optimizer="lazy-adam")
    # Dense gradients only for the count-feature weight (6) and the MLP (9 + 16): 31 x 4 = 124. The sparse ones
    # hold a float32 row and an int64 index per entry: the item table's B x L = 8 rows of h0 = 2 (8 x 16 = 128),
    # the output weight's B + k = 5 rows of h2 = 4 (5 x 24 = 120) and the bias's 5 rows of 1 (5 x 12 = 60).
    gradients = 124 + 128 + 120 + 60  # = 432
    # Adam on the dense parameters: two temporaries of the largest (12) = 96. RowAdam, per table, the coalesced
    # gradient of U = min(R, n) rows and the rows' old moments and their updates, four [U, d] float32: item
    # (U = 5 of the 8 rows) 5 x 16 + 4 x 5 x 2 x 4 = 240, output weight 5 x 24 + 4 x 5 x 4 x 4 = 440, bias
    # 5 x 12 + 4 x 5 x 4 = 140; the largest, 440.
    assert plan.terms() == {**adam, "gradients": gradients, "optimizer_step": 440}
    assert adam["optimizer"] == plan.terms()["optimizer"] == 528  # the moments stay dense
    # Two torchrun ranks: the flat buffer holds the dense gradients only (124); the sparse rows of both ranks
    # are gathered, padded and then concatenated: 2 x 2 x (128 + 120 + 60) = 1232.
    ranks = estimate(**TINY, **sparse, optimizer="lazy-adam", world_size=2).terms()
    assert ranks["gradient_buffer"] == 124 + 1232
    # ... and RowAdam then steps both ranks' rows: with 1,000 items (so that U = min(W R, n) is W R), the output
    # weight's 5 rows give 5 x 24 + 4 x 5 x 4 x 4 = 440 alone, its 10 rows 10 x 24 + 4 x 10 x 4 x 4 = 880.
    wide = {**TINY, "n_items": 1000, **sparse, "optimizer": "lazy-adam"}
    assert estimate(**wide).terms()["optimizer_step"] == 440
    assert estimate(**wide, world_size=2).terms()["optimizer_step"] == 880
    # With the expected bag length given (2.5 items), B x 2.5 = 5 rows of the item table, not B x L = 8.
    expected = estimate(**TINY, **sparse, optimizer="lazy-adam", mean_bag_length=2.5).terms()
    assert expected["gradients"] == gradients - 3 * 16
    # The first layer alone (full softmax): its table lazy, the output layer dense (25 x 4).
    alone = estimate(**TINY, path="sparse", max_row_length=4, optimizer="lazy-adam").terms()
    assert alone["gradients"] == (6 + 9 + 16 + 25) * 4 + 128
    with pytest.raises(ValueError, match="lazy-adam' needs path 'sparse' or softmax 'sampled'"):
        estimate(**TINY, optimizer="lazy-adam")


def test_auto_decides_on_the_mean_bag_length_as_given():
    # The trainer decides on the whole matrix's mean bag (600 here: 2 x 600 = 1,200 rows, not fewer than the
    # 1,000 items, so Adam), the same on every rank; a rank whose longest row is 4 must not plan a lazy table
    # the run will not have, though its clamped rows (2 x 4 = 8) would be fewer.
    settings = {**TINY, "n_items": 1000, "path": "sparse", "max_row_length": 4}
    auto = estimate(**settings, optimizer="auto", mean_bag_length=600.0).terms()
    assert auto == estimate(**settings, optimizer="adam", mean_bag_length=600.0).terms()
    # With a mean of 3 (6 rows) auto takes the table lazily, and counts its rows: 6 x (2 x 4 + 8) = 96.
    lazy = estimate(**settings, optimizer="auto", mean_bag_length=3.0).terms()
    assert lazy["gradients"] == (6 + 9 + 16 + 4 * 1000 + 1000) * 4 + 96


def test_auto_decides_on_every_ranks_rows():
    # Under torchrun RowAdam steps on every rank's gathered rows: with 10 items and 2 x 2 = 4 bag entries a
    # rank, 2 ranks read 8 rows (fewer: lazy, as the trainer decides with the same world size), 3 ranks 12 (Adam).
    settings = {**TINY, "n_items": 10, "path": "sparse", "max_row_length": 4, "mean_bag_length": 2.0}
    two = estimate(**settings, optimizer="auto", world_size=2).terms()
    assert two["gradients"] == (6 + 9 + 16 + 4 * 10 + 10) * 4 + 4 * (2 * 4 + 8)
    assert two == estimate(**settings, optimizer="lazy-adam", softmax="full", world_size=2).terms()
    three = estimate(**settings, optimizer="auto", world_size=3).terms()
    assert three == estimate(**settings, optimizer="adam", world_size=3).terms()


def test_a_resumed_run_is_planned_with_the_lazy_tables_it_saved():
    # auto at 600 items a bag would plan Adam (1,200 rows > 1,000 items); a run saved with the table lazy (an
    # older rule, say) is planned as it will train, lazily; one saved with Adam, as Adam whatever auto says.
    settings = {**TINY, "n_items": 1000, "path": "sparse", "max_row_length": 4, "mean_bag_length": 600.0}
    saved_lazy = estimate(**settings, optimizer="auto", lazy_names=("embed.item_table",)).terms()
    assert saved_lazy == estimate(**settings, optimizer="lazy-adam", softmax="full").terms()
    assert saved_lazy != estimate(**settings, optimizer="auto").terms()
    small = {**settings, "mean_bag_length": 3.0}  # where auto would choose the table lazily
    assert estimate(**small, optimizer="auto", lazy_names=()).terms() == estimate(**small, optimizer="adam").terms()


@pytest.mark.parametrize(
    "change, expected",
    [
        # bfloat16 batches: X [2, 8] at 2 bytes + y = 32 + 16.
        (dict(out_dtype=torch.bfloat16), dict(batch=2 * 8 * 2 + 2 * 8)),
        # A float32 value per stored entry: + 7 x 4 on the CSR.
        (dict(values=True), dict(csr=60 + 7 * 4)),
        # Evaluation sets add their samples (same 16 bytes each) to the sample arrays.
        (dict(n_eval_samples=10), dict(samples=(7 + 10) * 16)),
        # An evaluation batch of 8 rows: 2 x 8 x 5 x 4 + 8 x 9 x 4.
        (dict(eval_batch_size=8), dict(evaluation=320 + 288)),
        # foreach Adam on CUDA: one temporary as large as all parameters.
        (dict(device="cuda"), dict(optimizer_step=66 * 4)),
        # Plain SGD keeps no moments and makes no step temporaries.
        (dict(optimizer="sgd"), dict(optimizer=0, optimizer_step=0)),
        # Two torchrun ranks: each holds all 7 samples' pairs (7 x 8) but only its share of the epoch order,
        # ceil(7 / 2) = 4 x 8; and a flat all-reduce buffer of every gradient, 66 x 4.
        (dict(world_size=2), dict(samples=7 * 8 + 4 * 8, gradient_buffer=264)),
        # --shard-users: the rank's epoch is the largest rank's length, 5 here.
        (dict(world_size=2, epoch_samples=5), dict(samples=7 * 8 + 5 * 8, gradient_buffer=264)),
    ],
)
def test_one_setting_changes_its_terms(change, expected):
    base = estimate(**TINY).terms()
    assert estimate(**{**TINY, **change}).terms() == {**base, **expected}
    assert all(base[name] != value for name, value in expected.items())  # each really changed


def test_bf16_dense_full_softmax_by_hand():
    # autocast casts every parameter to bf16 on the dense path (the item table too: matmul reads it), 66 x 2,
    # and the backward makes the bf16 gradient of one copy at a time, the largest (the output weight, 20) x 2.
    autocast = (66 + 20) * 2  # = 172
    cpu = estimate(**TINY, precision="bf16")
    base = estimate(**TINY).terms()
    assert cpu.terms() == {
        **base,
        "batch": 2 * 8 * 2 + 2 * 8,  # the batch buffer follows the precision: bf16 X [2, 8] + int64 y = 48
        "autocast": autocast,
        "evaluation": 152 + 66 * 2,  # + the weight copies (no gradients without autograd) = 284
    }
    # Persistent 60 + 112 + 48 + 264 + 264 + 528 = 1276; the step 256 + 120 + 172 = 548 is the largest transient.
    assert cpu.total == 1276 + 548 == 1824
    # On CUDA the freed bf16 logits [2, 5] stay in the caching allocator's block: + 2 x 5 x 2 = 20, in the
    # training step's logits and in evaluation.
    cuda = estimate(**{**TINY, "device": "cuda"}, precision="bf16").terms()
    assert cuda["logits"] == 120 + 20 and cuda["evaluation"] == 284 + 20 and cuda["autocast"] == autocast


def test_bf16_sparse_sampled_by_hand():
    plan = estimate(**TINY, path="sparse", softmax="sampled", negatives=3, max_row_length=4, precision="bf16")
    fp32 = estimate(**TINY, path="sparse", softmax="sampled", negatives=3, max_row_length=4).terms()
    # embedding_bag reads the item table in float32: of the first layer only the feature weight 2 x 3 = 6 is
    # cast; then the MLP's 6 + 3 + 12 + 4; of the output layer the k = 3 gathered rows (3 x 4 = 12) and their
    # biases (3). Sum 46, largest 12; the bags have no dense buffer whose dtype would follow the precision.
    assert plan.terms() == {
        **fp32,
        "autocast": (46 + 12) * 2,  # = 116
        # Evaluation is over the full softmax: the copies of all parameters the matmuls read, 6 + 25 + 25 = 56.
        "evaluation": 152 + 56 * 2,
    }


def test_total_takes_the_largest_transient():
    # Persistent 1 + 2 + ... + 7 = 28; transients: step 8 + 9 = 17, optimiser step 10, evaluation 11.
    assert MemoryPlan(1, 2, 3, 4, 5, 6, 7, 10, 8, 9, 11).total == 28 + 17
    assert MemoryPlan(1, 2, 3, 4, 5, 6, 7, 30, 8, 9, 11).total == 28 + 30
    assert MemoryPlan(1, 2, 3, 4, 5, 6, 7, 10, 8, 9, 40).total == 28 + 40
    # The all-reduce buffer (12) is held for the whole run; the bf16 copies (13) join the step's transients.
    assert MemoryPlan(1, 2, 3, 4, 5, 6, 7, 10, 8, 9, 11, gradient_buffer=12, autocast=13).total == 40 + 30


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(3 * 2**30 // 2) == "1.50 GiB"
    assert format_bytes(50 * 2**20) == "50.0 MiB"
    assert format_bytes(300 * 2**20) == "300 MiB"


# A catalogue large enough that the full softmax costs gigabytes at this batch size.
BIG = dict(
    n_users=10_000,
    n_items=200_000,
    nnz=2_000_000,
    n_samples=2_000_000,
    batch_size=4096,
    max_row_length=800,
    device="cuda",
)


def test_check_passes_within_the_budget():
    plan = estimate(**BIG)
    assert check(plan, plan.total) is None  # the limit itself fits
    assert check(plan, 10 * plan.total, where="free memory on cuda:0") is None


def test_check_refuses_with_estimate_limit_and_what_fits():
    plan = estimate(**BIG)
    budget = int(0.6 * plan.total)
    with pytest.raises(MemoryBudgetExceeded) as raised:
        check(plan, budget, where="--memory-budget")
    message = str(raised.value)
    assert isinstance(raised.value, ValueError)
    assert f"estimated {format_bytes(plan.total)}" in message
    assert f"limit is {format_bytes(budget)} (--memory-budget)" in message
    assert "nothing was allocated" in message
    # The largest term by far is the full softmax's logits; the message names it.
    assert "logits, softmax and their gradients" in message

    # The batch size it suggests fits, and one more row would not.
    found = re.search(r"--batch-size of at most (\d+) \(est\. ([^)]+)\)", message)
    assert found, message
    best = int(found.group(1))
    assert 1 <= best < BIG["batch_size"]
    assert estimate(**{**BIG, "batch_size": best}).total <= budget
    assert estimate(**{**BIG, "batch_size": best + 1}).total > budget
    assert found.group(2) == format_bytes(estimate(**{**BIG, "batch_size": best}).total)

    # The sparse path, the sampled softmax (1024 negatives by default) and both, each with its estimate.
    sparse = estimate(**{**BIG, "path": "sparse"}).total
    sampled = estimate(**{**BIG, "softmax": "sampled", "negatives": 1024}).total
    both = estimate(**{**BIG, "path": "sparse", "softmax": "sampled", "negatives": 1024}).total
    assert both < sampled < plan.total and sparse < plan.total  # each really saves memory here
    assert f"--input-path sparse (est. {format_bytes(sparse)})" in message
    assert f"--softmax sampled (with 1024 negatives) (est. {format_bytes(sampled)})" in message
    assert f"both (est. {format_bytes(both)})" in message


def test_check_when_no_batch_size_fits():
    plan = estimate(**BIG)
    at_one = estimate(**{**BIG, "batch_size": 1}).total
    with pytest.raises(MemoryBudgetExceeded, match=r"no --batch-size fits") as raised:
        check(plan, at_one - 1)
    assert f"({format_bytes(at_one)} at 1)" in str(raised.value)


def test_check_offers_only_what_the_plan_does_not_use():
    # Already sparse with a sampled softmax: the batch size and lazy Adam's sparse gradients are left to change.
    # Lazy Adam is offered where it saves memory: 4096 bags of 50 items are 204,800 gradient rows, far fewer
    # than the 2 million rows of the dense item-table gradient.
    settings = {**BIG, "n_items": 2_000_000, "path": "sparse", "softmax": "sampled", "negatives": 512,
                "mean_bag_length": 50.0}  # fmt: skip
    plan = estimate(**settings)
    with pytest.raises(MemoryBudgetExceeded) as raised:
        check(plan, plan.total // 2)
    message = str(raised.value)
    assert "--batch-size of at most" in message
    assert "--input-path sparse" not in message and "--softmax sampled" not in message
    lazy = estimate(**settings, optimizer="lazy-adam").total
    assert lazy < plan.total and f"--optimizer lazy-adam (est. {format_bytes(lazy)})" in message
    lazy_plan = estimate(**settings, optimizer="lazy-adam")
    with pytest.raises(MemoryBudgetExceeded) as raised:
        check(lazy_plan, lazy_plan.total // 2)
    assert "--optimizer lazy-adam" not in str(raised.value)
    # 200,000 items and bags of 200: 819,200 sparse rows outweigh the 200,000 dense ones, so it is not offered.
    long_bags = estimate(**{**settings, "n_items": 200_000, "mean_bag_length": 200.0})
    assert estimate(**{**long_bags.settings, "optimizer": "lazy-adam"}).total > long_bags.total
    with pytest.raises(MemoryBudgetExceeded) as raised:
        check(long_bags, long_bags.total // 2)
    assert "--optimizer lazy-adam" not in str(raised.value)
    # A dense plan without max_row_length cannot be re-estimated on the sparse path, so it is not offered; nor
    # is lazy Adam, which has nothing sparse to work on there.
    dense = estimate(**{**BIG, "max_row_length": None})
    with pytest.raises(MemoryBudgetExceeded) as raised:
        check(dense, dense.total // 2)
    assert "--input-path sparse" not in str(raised.value) and "--softmax sampled" in str(raised.value)
    assert "--optimizer lazy-adam" not in str(raised.value)


def test_a_compiled_run_plans_adam_and_is_offered_lazy_adam_only_without_compile():
    # torch.compile traces no sparse gradient: "auto" plans Adam for a compiled run, and the advice names the
    # change the trainer would accept (lazy-adam together with --compile is refused there).
    settings = {**BIG, "n_items": 2_000_000, "path": "sparse", "softmax": "sampled", "negatives": 512,
                "mean_bag_length": 50.0}  # fmt: skip
    compiled = estimate(**settings, optimizer="auto", compiled=True)
    assert compiled.terms() == estimate(**settings, optimizer="adam").terms()
    assert estimate(**settings, optimizer="auto").total < compiled.total  # uncompiled auto goes lazy
    with pytest.raises(MemoryBudgetExceeded) as raised:
        check(compiled, compiled.total // 2)
    lazy = estimate(**settings, optimizer="lazy-adam").total
    assert f"--optimizer lazy-adam without --compile (est. {format_bytes(lazy)})" in str(raised.value)


def _meminfo_kib(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/meminfo")


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="reads /proc/meminfo (Linux)")
def test_device_budget_on_the_cpu():
    total = _meminfo_kib("MemTotal") * 1024
    for device in ("cpu", torch.device("cpu"), get_backend("cpu")):
        budget = device_budget(device)
        assert isinstance(budget, int)
        assert 0 < budget <= total


def test_device_budget_reads_memavailable_in_kib_and_caps_it(tmp_path, monkeypatch):
    import gpu_ann.memory_budget as memory_budget

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       2000 kB\nMemFree:         100 kB\nMemAvailable:   1500 kB\n")
    monkeypatch.setattr(memory_budget, "MEMINFO", str(meminfo))
    monkeypatch.setattr(memory_budget, "_cgroup_headroom", lambda: None)
    assert device_budget("cpu") == 1500 * 1024
    monkeypatch.setattr(memory_budget, "_cgroup_headroom", lambda: 4096)  # a container limit below MemAvailable
    assert device_budget("cpu") == 4096


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(path="csr"), r"unknown path 'csr'"),
        (dict(softmax="partial"), r"unknown softmax 'partial'"),
        (dict(optimizer="adagrad"), r"unknown optimizer 'adagrad'"),
        (dict(device="tpu"), r"unknown device 'tpu'"),
        (dict(precision="fp16"), r"unknown precision 'fp16'"),
        (dict(world_size=0), r"sizes must be positive: .*world_size=0"),
        (dict(epoch_samples=-1), r"sizes must be positive: .*epoch_samples=-1"),
        (dict(softmax="sampled"), r"sampled softmax needs negatives >= 1, got None"),
        (dict(softmax="sampled", negatives=0), r"sampled softmax needs negatives >= 1, got 0"),
        (dict(path="sparse"), r"sparse path needs max_row_length >= 1 .*got None"),
        (dict(path="sparse", max_row_length=0), r"sparse path needs max_row_length >= 1 .*got 0"),
        (dict(batch_size=0), r"sizes must be positive: .*batch_size=0"),
        (dict(hidden=(2, 0, 4)), r"sizes must be positive: .*hidden=\(2, 0, 4\)"),
        (dict(nnz=-1), r"sizes must be positive: .*nnz=-1"),
    ],
)
def test_estimate_refuses_bad_settings(change, match):
    with pytest.raises(ValueError, match=match):
        estimate(**{**TINY, **change})


# Runs in a fresh interpreter: builds the data, the loader (or bag assembler), the model and Adam, takes a few
# full training steps and one evaluation pass through the trainer's Objective in the given precision, and
# prints the growth of the resident set over the baseline taken after imports and a tiny warm-up run of the
# same code (numba compilation, torch's kernels and thread pools), next to the planner's estimate for the
# same sizes.
MEASURE = textwrap.dedent(
    """
    import gc, json, resource, sys
    import numpy as np
    import torch
    from gpu_ann import planner
    from gpu_ann.backend import get_backend
    from gpu_ann.bags import BagAssembler, FixedBags
    from gpu_ann.path_cost import row_statistics
    from gpu_ann.batching import FixedBatches
    from gpu_ann.loader import BatchLoader
    from gpu_ann.matrix import InteractionMatrix
    from gpu_ann.model import CandidateGenerator
    from gpu_ann.objective import Objective
    from gpu_ann.optim import lazy_parameter_names
    from gpu_ann.sampled import NegativeSampler
    from gpu_ann.splits import Samples

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    def peak_rss():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    def run(n_users, n_items, per_user, batch, hidden, path, softmax, k, steps, eval_batches, precision="fp32",
            optimizer="adam"):
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        users = np.repeat(np.arange(n_users), per_user)
        items = rng.integers(0, n_items, size=users.size)
        matrix = InteractionMatrix.from_pairs(get_backend("cpu"), users, items, n_users, n_items)
        del users, items
        lengths = np.diff(matrix.indptr)
        # One training sample per stored entry; the evaluation samples are a tenth of them, drawn at random.
        train = Samples(np.repeat(np.arange(n_users, dtype=np.int32), lengths), matrix.indices.copy())
        pick = rng.choice(len(train), len(train) // 10, replace=False)
        held = Samples(train.user[pick], train.item[pick])
        model = CandidateGenerator(n_items, hidden)
        lazy = lazy_parameter_names(path, softmax) if optimizer == "lazy-adam" else ()
        adam = model.configure_optimizer(lazy=lazy)
        sampler = None
        if softmax == "sampled":
            counts = np.bincount(train.item, minlength=n_items)
            sampler = NegativeSampler(n_items, k, "popularity", counts, power=0.75)
        # The trainer's loss and evaluation: autocast (bf16), the full or sampled softmax, either input path.
        objective = Objective(model, sampler, precision, sparse_grad=lazy)
        if path == "dense":
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # the trainer's batch dtype
            loader = BatchLoader(matrix, train, batch, seed=0, drop_last=True, dtype=dtype)
            batches = iter(loader)
            evaluation = FixedBatches(matrix, held, batch, eval_batches, buffers=loader.buffers)
            next_batch = lambda: next(batches)
        else:
            assembler = BagAssembler(matrix, train, batch)
            order = assembler.to_device_indices(rng.permutation(len(train)))
            starts = iter(range(0, len(train), batch))
            evaluation = FixedBags(matrix, held, batch, eval_batches, buffers=assembler.buffers)

            def next_batch():
                s = next(starts)
                return assembler.assemble(order[s : s + batch])

        for _ in range(steps):  # the training loop's order: forward, zero_grad, backward, step
            loss = objective.loss(next_batch())
            adam.zero_grad(set_to_none=True)
            loss.backward()
            adam.step()
            del loss
        model.eval()
        with torch.no_grad():
            sum(float(objective.summed_cross_entropy(b)) for b in evaluation)
        return planner.estimate(
            n_users, n_items, matrix.nnz, len(train), batch, tuple(hidden), path=path, softmax=softmax,
            negatives=k if softmax == "sampled" else None, max_row_length=int(lengths.max()), device="cpu",
            n_eval_samples=len(held), precision=precision, optimizer=optimizer,
            mean_bag_length=row_statistics(lengths)[0],
        )

    config = json.loads(sys.argv[1])
    run(**{**config, "n_users": 20, "n_items": 50, "per_user": 5, "batch": 8, "hidden": [4, 8, 4], "k": 4})
    gc.collect()
    baseline = rss()
    try:  # restart the peak count from the current resident set (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # the peak so far then comes from the imports and the warm-up: reported, and checked by the test
    peak_before = peak_rss()
    plan = run(**config)
    print(json.dumps({
        "baseline": baseline, "peak_before": peak_before, "peak": peak_rss(),
        "total": plan.total, "terms": plan.terms(),
    }))
    """
)

# The counted bytes dominate: a 20,000-item catalogue with hidden (256, 512, 256) has 10.5 M parameters, so
# weights, gradients and Adam's moments are 168 MB; the dense path adds the [512, 20,003] float32 batch
# (41 MB) and the full softmax's logits (123 MB). The sparse path with 1,024 sampled negatives leaves the
# step's transients small, and its peak is the full-softmax evaluation batch (84 MB).
MEASURED_RUN = dict(
    n_users=2000, n_items=20_000, per_user=100, batch=512, hidden=[256, 512, 256], k=1024, steps=3, eval_batches=2
)

# Measured / estimated peak must lie within a factor 1.3 either way. The estimate leaves out what is not torch's or
# the kernels' (the host copies of the data, the interpreter's small objects, BLAS workspaces) and rounds some
# transients up (three full [B, n] arrays for the loss), so neither direction is exact. The runs train through the
# trainer's Objective (autocast in bf16, the batch buffer in the precision's dtype). At these sizes the measured
# ratios were 0.94 (dense + full), 1.11 (sparse + sampled), 0.86 (dense + full in bf16; 1.04 for sparse + sampled in
# bf16, not run here) and 1.10 (sparse + sampled with lazy Adam, whose peak is RowAdam's step on the item table:
# 51,200 bag entries coalesced into 20,000 rows) with malloc's mmap threshold pinned as below (glibc's default sliding
# threshold keeps freed blocks resident, which raises them). The hand-computed cases above pin each term's arithmetic;
# this factor checks the model of what is resident at the peak, and fails when about a third of it is missed or
# counted twice: the dense run without its logits term (307 MiB measured / 211 MiB, 1.46), the sparse run without
# Adam's moments (273 / 166, 1.65), or the dense run with them counted twice (307 / 408, 0.75). The bf16 weight copies
# are 2 bytes a parameter against the 16 of weights, gradients and Adam's moments, too few for the factor to see: the
# hand-computed bf16 cases pin them.
FACTOR = 1.3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the resident set from /proc/self (Linux)")
@pytest.mark.parametrize(
    ("path", "softmax", "precision", "optimizer"),
    [
        ("dense", "full", "fp32", "adam"),
        ("sparse", "sampled", "fp32", "adam"),
        ("dense", "full", "bf16", "adam"),
        ("sparse", "sampled", "fp32", "lazy-adam"),
    ],
)
def test_estimate_against_measured_peak_on_the_cpu(path, softmax, precision, optimizer):
    env = dict(
        os.environ,
        # One BLAS thread: no per-thread workspaces in the measurement, and no contention on a shared machine.
        OMP_NUM_THREADS="1",
        # A fixed mmap threshold: every block of 128 KiB or more is mapped on allocation and unmapped on free,
        # so the resident set follows what is allocated rather than what glibc kept from earlier frees.
        MALLOC_MMAP_THRESHOLD_="131072",
    )
    config = json.dumps({**MEASURED_RUN, "path": path, "softmax": softmax, "precision": precision,
                         "optimizer": optimizer})  # fmt: skip
    done = subprocess.run([sys.executable, "-c", MEASURE, config], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # Not getrusage's ru_maxrss: a child started with vfork + exec inherits the parent's peak in it (here, the
    # pytest process's), and it would include the warm-up. VmHWM, restarted at the baseline, has neither.
    assert result["peak_before"] - result["baseline"] < 0.05 * result["total"], result
    assert result["total"] > 200 * 2**20, result  # the counted bytes dominate the interpreter's noise
    ratio = (result["peak"] - result["baseline"]) / result["total"]
    print(
        f"{path} + {softmax} ({precision}, {optimizer}): measured {format_bytes(result['peak'] - result['baseline'])}, "
        f"estimated {format_bytes(result['total'])}, ratio {ratio:.3f}"
    )
    assert 1 / FACTOR <= ratio <= FACTOR, result

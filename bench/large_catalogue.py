"""Train on a synthetic catalogue of a million items: the sparse input path with a sampled softmax, one command.

    python bench/large_catalogue.py                 # 10^6 items, 30,000 users, 1.5M interactions (CPU: minutes)
    python bench/large_catalogue.py --quick         # a tiny version of the same run (the smoke test's)

The ratings are drawn by :func:`gpu_ann.synthetic.generate` with the marginals of the bundled anime data
(items per user, item popularity by rank), so the rows have a real data set's lengths. Training is
:func:`gpu_ann.training.train` as ``gpu-ann train`` runs it, with ``input_path="sparse"`` and
``softmax="sampled"``: a batch is the users' items as bags (memory per step independent of the catalogue)
and the loss touches the targets' and ``--negatives`` sampled items' output rows only. Evaluation, as
always, is the full softmax over every item, on ``--eval-batches`` fixed batches and at the end on the whole
validation split (kept small by ``--validation-share``: each of its batches scores every item).

Before training, the memory planner's estimate for these settings is printed next to its estimate for the
dense design (densified rows, full softmax) at the same settings, at the batch size and at 4 and 16 times
it, each checked against the budget ``train`` uses, with the bytes each input path moves per step. After
it: training samples/s from the :class:`~gpu_ann.training.TrainResult`, optionally the time of a few dense
steps for comparison (``--dense-steps``), and a JSON record of the run (``large_catalogue.json`` in ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from gpu_ann import planner, synthetic
from gpu_ann.backend import get_backend
from gpu_ann.data.readers import load_bundled_anime
from gpu_ann.data.table import RatingsTable, ReadSummary
from gpu_ann.loader import BatchLoader
from gpu_ann.matrix import InteractionMatrix
from gpu_ann.memory_budget import device_budget
from gpu_ann.model import CandidateGenerator
from gpu_ann.objective import Objective
from gpu_ann.optim import OPTIMIZERS
from gpu_ann.path_cost import row_statistics, step_bytes
from gpu_ann.splits import FOLD_IN, TRAIN, make_split
from gpu_ann.training import TrainConfig, train

# Sizes of the full run and of --quick; an option given on the command line wins over both.
FULL = dict(items=1_000_000, users=30_000, interactions=1_500_000, batch_size=256, hidden=(64, 128, 64),
            negatives=1024, steps=300, eval_batches=2, validation_share=0.002)  # fmt: skip
QUICK = dict(items=20_000, users=400, interactions=8_000, batch_size=32, hidden=(8, 8, 8), negatives=64, steps=4,
             eval_batches=1, validation_share=0.05)  # fmt: skip
RESULT_FILE = "large_catalogue.json"
TRAIN_RESULT_FIELDS = ("steps", "seconds", "samples_per_second", "best_validation_loss", "final_validation_loss",
                       "popularity_validation_loss", "history")  # fmt: skip


def _hidden(text: str) -> tuple[int, int, int]:
    sizes = tuple(int(x) for x in text.split(","))
    if len(sizes) != 3 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive widths such as 64,128,64, got {text!r}")
    return sizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; sizes left unset take the full run's values, or with ``--quick`` the tiny run's.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name; default ``sys.argv[1:]``.

    Returns
    -------
    argparse.Namespace
    """
    p = argparse.ArgumentParser(
        prog="python bench/large_catalogue.py",
        description="Generate a synthetic catalogue of 10^6 items shaped like the bundled anime ratings and "
        "train the candidate generator on it with the sparse input path and a sampled softmax.",
    )

    def size(flag, key, kind, what):
        p.add_argument(flag, type=kind, default=None, help=f"{what} (default {FULL[key]:,}; --quick: {QUICK[key]:,})")

    size("--items", "items", int, "catalogue size")
    size("--users", "users", int, "synthetic users")
    size("--interactions", "interactions", int, "synthetic interactions (the draw gives about this many)")
    size("--batch-size", "batch_size", int, "samples per training and evaluation batch")
    size("--negatives", "negatives", int, "sampled negatives per batch")
    size("--steps", "steps", int, "training steps")
    size("--eval-batches", "eval_batches", int, "fixed batches per split in each evaluation (full softmax)")
    size("--validation-share", "validation_share", float, "share of interactions in each of validation and test")
    p.add_argument(
        "--hidden",
        type=_hidden,
        default=None,
        help=f"hidden widths h0,h1,h2 (default {','.join(map(str, FULL['hidden']))}; "
        f"--quick: {','.join(map(str, QUICK['hidden']))})",
    )
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: half of --steps)")
    p.add_argument(
        "--negative-sampling",
        choices=("popularity", "uniform"),
        default="popularity",
        help="proposal of the negatives: training count**0.75 (default) or uniform",
    )
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="fp32 (default) or bf16 autocast")
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the loss computation with torch.compile; it cannot trace sparse gradients, so --optimizer "
        "auto then trains with Adam and lazy-adam is refused",
    )
    p.add_argument("--backend", choices=("auto", "cpu", "cuda"), default="auto", help="where to train (default auto)")
    p.add_argument(
        "--memory-budget",
        type=float,
        default=None,
        metavar="GIB",
        help="memory the run may use, in GiB (default: 90%% of the device's free memory, as gpu-ann train)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=1e-3,
        help="Adam learning rate (default 1e-3; gpu-ann train's is 1e-2, tuned on the bundled data)",
    )
    p.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="auto",
        help="auto (default, as gpu-ann train): lazy-adam for the item tables whose step reads fewer rows than "
        "they have (here both); lazy-adam: sparse gradients and lazy Adam updates of the item tables' rows a step "
        "touches; adam: dense gradients and Adam over every row, every step",
    )
    p.add_argument(
        "--dense-steps",
        type=int,
        default=0,
        help="after training, also time this many steps of the dense design (densified rows, full softmax) on "
        "the same data, model and batch (default 0: not run; it needs the planner's dense+full estimate in memory)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the split and the model (default 0)")
    p.add_argument(
        "--out",
        default="runs/large-catalogue",
        help=f"run directory: checkpoint, logs and {RESULT_FILE} (default runs/large-catalogue)",
    )
    p.add_argument("--quick", action="store_true", help="a tiny run of the same command (seconds), for the smoke test")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.eval_every is None:
        args.eval_every = max(args.steps // 2, 1)
    for name in ("items", "users", "interactions", "batch_size", "negatives", "steps", "eval_batches", "eval_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.dense_steps < 0:
        p.error(f"--dense-steps must be at least 0, got {args.dense_steps}")
    if not 0 < args.validation_share < 0.5:
        p.error(f"--validation-share must lie in (0, 0.5), got {args.validation_share}")
    return args


def synthetic_table(n_users: int, n_items: int, n_interactions: int, seed: int) -> RatingsTable:
    """A ratings table of implicit interactions drawn with the bundled anime data's marginals.

    Parameters
    ----------
    n_users, n_items : int
        Its shape; users and items are their own raw ids.
    n_interactions : int
        Target number of interactions (see :func:`gpu_ann.synthetic.generate`).
    seed : int
        Seed of the draw.

    Returns
    -------
    RatingsTable
        Without ratings or timestamps; every user has at least one item.
    """
    csr = synthetic.generate(synthetic.fit(load_bundled_anime()), n_users, n_items, n_interactions, seed=seed)
    users, items = synthetic.samples_of(csr)
    return RatingsTable(
        user=users,
        item=items,
        rating=None,
        timestamp=None,
        user_ids=np.arange(n_users, dtype=np.int64),
        item_ids=np.arange(n_items, dtype=np.int64),
        item_titles=None,
        source=f"synthetic {n_users:,} x {n_items:,} (anime marginals, seed {seed})",
        summary=ReadSummary(rows_read=len(users)),
    )


def _input_rows(cfg: TrainConfig, table: RatingsTable):
    """``(splits, row_lengths)``: the split ``train`` makes (same protocol, seed) and the input rows' lengths."""
    splits, assignment = make_split(table, cfg.protocol, cfg.split, cfg.seed)
    inputs = np.isin(assignment, (TRAIN, FOLD_IN))
    return splits, np.bincount(table.user[inputs], minlength=table.n_users)


def _memory_plans(cfg: TrainConfig, table: RatingsTable, splits, lengths: np.ndarray, device: str) -> dict:
    """The planner's estimates for this run (its optimiser) and for the dense design (Adam), as ``train`` sizes them."""
    common = dict(
        n_users=table.n_users,
        n_items=table.n_items,
        nnz=int(lengths.sum()),
        n_samples=len(splits.train),
        batch_size=cfg.batch_size,
        hidden=tuple(cfg.hidden),
        out_dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float32,
        max_row_length=max(int(lengths.max()), 1),
        device=device,
        # As train() counts them: the training and validation sets, and the whole validation split at the end.
        n_eval_samples=len(splits.train) + 2 * len(splits.validation),
    )
    return {
        "sparse+sampled": planner.estimate(
            **common,
            path="sparse",
            softmax="sampled",
            negatives=cfg.negatives,
            optimizer=cfg.optimizer,
            mean_bag_length=row_statistics(lengths)[0],
            compiled=cfg.compile,
        ),
        "dense+full": planner.estimate(**common, path="dense", softmax="full"),
    }


def _check(plan: planner.MemoryPlan, budget: int, where: str) -> str | None:
    """The planner's refusal message for ``plan`` under ``budget``, or None when it fits."""
    try:
        planner.check(plan, budget, where)
    except planner.MemoryBudgetExceeded as exc:
        return str(exc)
    return None


def planner_report(cfg: TrainConfig, table: RatingsTable, splits, lengths: np.ndarray, backend) -> dict:
    """Print and return the planner's view of this run and of the dense design at the same settings.

    Both are checked against the budget :func:`gpu_ann.training.train` uses, at the run's batch size and at
    4 and 16 times it; with the bytes each input path moves per step at the run's batch size.

    Parameters
    ----------
    cfg : TrainConfig
        The run's settings.
    table : RatingsTable
        Its data.
    splits : gpu_ann.splits.Splits
        Its split.
    lengths : numpy.ndarray
        Items in each user's input row.
    backend : CpuBackend or CudaBackend
        Where it trains.

    Returns
    -------
    dict
        For the JSON record: budget, per batch size each design's estimate (bytes, terms) and refusal
        message (None when it fits), bytes moved per step.
    """
    if cfg.memory_budget is not None:
        budget, where = cfg.memory_budget, "--memory-budget"
    else:  # what train() uses when no budget is given
        budget = int(0.9 * device_budget(backend))
        where = f"90% of the memory free on {backend.torch_device}"
    print(f"memory planner (hidden {cfg.hidden}), budget {planner.format_bytes(budget)} ({where}):")
    scan = []
    for batch in (cfg.batch_size, 4 * cfg.batch_size, 16 * cfg.batch_size):
        plans = _memory_plans(dataclasses.replace(cfg, batch_size=batch), table, splits, lengths, backend.name)
        row = {"batch": batch}
        for name, plan in plans.items():
            refusal = _check(plan, budget, where)
            row[name] = {"total_bytes": plan.total, "terms": plan.terms(), "refused": refusal}
            terms = ", ".join(f"{label} {planner.format_bytes(v)}" for label, v in plan.largest(2))
            verdict = "fits" if refusal is None else "REFUSED"
            print(f"  batch {batch:>6,}  {name:<15}{planner.format_bytes(plan.total):>11}  {verdict:<8} ({terms})")
        scan.append(row)
    # The bytes of the work that differs between the input paths (batch written, read by the forward and
    # by the weight gradient; bag entries and the table rows they gather and scatter).
    stats, input_bytes = row_statistics(lengths), 2 if cfg.precision == "bf16" else 4
    moved = {
        path: step_bytes(
            table.n_items, stats, cfg.batch_size, path, embedding_dim=cfg.hidden[0], input_bytes=input_bytes
        ).moved
        for path in ("dense", "sparse")
    }
    print(
        f"  input bytes moved per step at batch {cfg.batch_size}: dense {planner.format_bytes(moved['dense'])}, "
        f"sparse {planner.format_bytes(moved['sparse'])} ({moved['dense'] / moved['sparse']:,.0f}x fewer)"
    )
    return {"budget_bytes": budget, "budget_from": where, "by_batch": scan, "input_bytes_moved_per_step": moved}


def time_dense_steps(cfg: TrainConfig, table: RatingsTable, splits, backend, steps: int) -> float:
    """Seconds per step of the dense design (dense rows, full softmax) on the run's data, model and batch.

    The trainer's own step (:class:`~gpu_ann.objective.Objective`, Adam) on :class:`~gpu_ann.BatchLoader`
    batches of the training split: one warm-up step, then the median of ``steps`` timed ones.

    Parameters
    ----------
    cfg : TrainConfig
        The run's settings (batch size, hidden sizes, precision, learning rate, seed).
    table : RatingsTable
        Its data.
    splits : gpu_ann.splits.Splits
        Its split.
    backend : CpuBackend or CudaBackend
        Where to run.
    steps : int
        Steps to time.

    Returns
    -------
    float
        Median seconds per step.
    """
    rows = splits.inputs
    matrix = InteractionMatrix.from_pairs(backend, rows.user, rows.item, table.n_users, table.n_items)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    torch.manual_seed(cfg.seed)
    model = CandidateGenerator(table.n_items, cfg.hidden).to(backend.torch_device)
    optimizer = model.configure_optimizer(cfg.lr)
    objective = Objective(model, None, cfg.precision, cfg.compile)
    times = []
    with BatchLoader(matrix, splits.train, cfg.batch_size, seed=cfg.seed, dtype=dtype) as loader:
        for batch in itertools.islice(loader, steps + 1):  # the first step is the warm-up
            started = time.perf_counter()
            loss = objective.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            backend.synchronize()  # timing only: a host-device sync
            times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The run's settings: sparse path, sampled softmax, a fixed number of steps, the rest as ``gpu-ann train``.

    Parameters
    ----------
    args : argparse.Namespace
        From :func:`parse_args`.

    Returns
    -------
    TrainConfig
    """
    v = args.validation_share
    return TrainConfig(
        split=(1 - 2 * v, v, v),
        seed=args.seed,
        hidden=args.hidden,
        lr=args.lr,
        optimizer=args.optimizer,
        batch_size=args.batch_size,
        max_steps=args.steps,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        patience=args.steps,  # a fixed number of steps: never stop early
        backend=args.backend,
        out=args.out,
        input_path="sparse",
        softmax="sampled",
        negatives=args.negatives,
        negative_sampling=args.negative_sampling,
        precision=args.precision,
        compile=args.compile,
        memory_budget=None if args.memory_budget is None else int(args.memory_budget * 2**30),
    )


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (0, or 2 when the planner refuses the sparse run).

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name.

    Returns
    -------
    int
    """
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    started = time.perf_counter()
    table = synthetic_table(args.users, args.items, args.interactions, args.seed)
    generated_s = time.perf_counter() - started
    lengths = np.bincount(table.user, minlength=table.n_users)
    items_used = int((np.bincount(table.item, minlength=table.n_items) > 0).sum())
    print(
        f"synthetic catalogue: {table.n_users:,} users x {table.n_items:,} items, {table.nnz:,} interactions "
        f"({items_used:,} items used; {lengths.mean():.1f} items per user, longest row {lengths.max():,}) "
        f"in {generated_s:.1f} s"
    )

    cfg = train_config(args)
    backend = get_backend(args.backend)
    splits, input_lengths = _input_rows(cfg, table)
    plans = planner_report(cfg, table, splits, input_lengths, backend)

    # A new run refuses an --out holding files a run does not write: this record of an earlier run there is
    # this script's own, and the new run writes it again.
    (Path(args.out) / RESULT_FILE).unlink(missing_ok=True)
    try:
        result = train(cfg, table)
    except planner.MemoryBudgetExceeded as exc:
        print(f"error: the planner refuses the sparse run too: {exc}", file=sys.stderr)
        return 2
    # The log's throughput between the last two evaluations counts training steps only (no evaluation,
    # checkpoint or start-up); the TrainResult's counts the whole run.
    steady = result.history[-1]["samples_per_s"] if len(result.history) > 1 else None
    print(
        f"trained {result.steps} steps of {cfg.batch_size} in {result.seconds:.1f} s: "
        f"{result.samples_per_second:,.0f} samples/s over the whole run (TrainResult.samples_per_second: data, "
        f"evaluations and checkpoints included)"
        + (f"; {steady:,.0f} samples/s between the last two evaluations (training steps only)" if steady else "")
    )
    print(
        f"validation loss (best model, whole validation split, full softmax over {table.n_items:,} items): "
        f"{result.final_validation_loss:.4f}; popularity baseline {result.popularity_validation_loss:.4f}; "
        f"uniform {math.log(table.n_items):.4f}"
    )

    dense_step_s = None
    if args.dense_steps and plans["by_batch"][0]["dense+full"]["refused"]:
        print("dense design: not timed, the planner refuses it at these settings")
    elif args.dense_steps:
        dense_step_s = time_dense_steps(cfg, table, splits, backend, args.dense_steps)
        line = f"dense design (dense rows, full softmax), same data, model and batch: {dense_step_s:.2f} s a step, "
        line += f"{cfg.batch_size / dense_step_s:,.0f} samples/s (median of {args.dense_steps} steps)"
        if steady:
            line += f"; this run's sparse + sampled steps: {cfg.batch_size / steady:.2f} s"
        print(line)

    record = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python", "bench/large_catalogue.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "device": str(backend.torch_device),
            "gpu": torch.cuda.get_device_name() if backend.name == "cuda" else None,
        },
        "data": dict(
            users=table.n_users,
            items=table.n_items,
            interactions=table.nnz,
            items_used=items_used,
            longest_row=int(lengths.max()),
            generated_s=generated_s,
        ),
        "settings": vars(args),
        "planner": plans,
        "train": {name: getattr(result, name) for name in TRAIN_RESULT_FIELDS}
        | {"samples_per_second_between_evaluations": steady},
        "dense_design_seconds_per_step": dense_step_s,
    }
    path = Path(result.run_dir) / RESULT_FILE
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"result: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

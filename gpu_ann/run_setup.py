"""What a training run decides and builds before its first step: the checked settings, the memory plan
with the input path and the lazily updated tables, this rank's share of the users, and the run's
matrix, loader, evaluation sets, model, optimiser, sampler and loss (:func:`build_run`).

:func:`gpu_ann.training.train` calls these in order; each rank's own work goes through
``Replicas.attempt`` there, so a rank that fails in any of them stops the others at the next check.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from gpu_ann import planner
from gpu_ann.bags import FixedBags
from gpu_ann.batching import FixedBatches
from gpu_ann.data.table import RatingsTable
from gpu_ann.distributed import Replicas
from gpu_ann.loader import BatchLoader
from gpu_ann.memory_budget import device_budget
from gpu_ann.metrics import popularity_loss
from gpu_ann.model import CandidateGenerator
from gpu_ann.objective import SOFTMAXES, Objective
from gpu_ann.optim import OPTIMIZERS, lazy_parameter_names, lazy_tables
from gpu_ann.path_cost import PATHS, row_statistics, step_bytes
from gpu_ann.progress import stage
from gpu_ann.run_log import RunLog
from gpu_ann.sampled import NegativeSampler
from gpu_ann.sharding import UserShard, shard_users
from gpu_ann.sparse_rows import row_groups
from gpu_ann.splits import FOLD_IN, TRAIN
from gpu_ann.train_config import TrainConfig
from gpu_ann.values import input_matrix

log = logging.getLogger("gpu_ann.training")  # the trainer's logger: its set-up lines log as they did


def check_choices(cfg: TrainConfig) -> None:
    for name, value, choices in (
        ("input_path", cfg.input_path, ("auto", *PATHS)),
        ("softmax", cfg.softmax, SOFTMAXES),
        ("negative_sampling", cfg.negative_sampling, ("popularity", "uniform")),
        ("optimizer", cfg.optimizer, OPTIMIZERS),
    ):
        if value not in choices:
            raise ValueError(f"unknown {name} {value!r}: expected one of {choices}")
    if cfg.eval_batch_size is not None and not 1 <= cfg.eval_batch_size <= cfg.batch_size:
        raise ValueError(
            f"--eval-batch-size must lie in [1, --batch-size={cfg.batch_size}] (evaluation shares the training "
            f"buffers), got {cfg.eval_batch_size}"
        )
    if cfg.softmax == "sampled" and cfg.negatives < 1:
        raise ValueError(f"the sampled softmax needs --negatives >= 1, got {cfg.negatives}")
    if cfg.optimizer == "lazy-adam":
        if cfg.compile:
            # torch 2.13's inductor fails on embedding_bag(sparse=True) (a shape broadcast error at compile time).
            raise ValueError("--optimizer lazy-adam cannot be combined with --compile: torch.compile does not "
                             "trace the sparse gradients lazy Adam steps on; drop one of the two")  # fmt: skip
        if cfg.input_path == "dense" and cfg.softmax == "full":
            raise ValueError(_NOTHING_LAZY.format(path="dense"))


# Raised when the chosen path and softmax leave every gradient dense, so there is nothing to update lazily.
_NOTHING_LAZY = (
    "--optimizer lazy-adam updates lazily the item tables a step reads only rows of: the first layer's on "
    "--input-path sparse, the output layer's under --softmax sampled. With the {path} input path and the full "
    "softmax every gradient is dense: use --optimizer adam, --input-path sparse or --softmax sampled"
)


def memory_plan(
    cfg: TrainConfig, table: RatingsTable, splits, assignment, backend, replicas: Replicas, shard, lazy_names=None
) -> planner.MemoryPlan:
    """The planner's estimate for this rank, with the input path chosen (``cfg.input_path`` or the cheaper one).

    Host arithmetic on sizes only. Under ``--shard-users`` the sizes are this rank's, but what every rank must
    decide alike (the input path, which tables lazy Adam updates) is decided on the whole matrix's rows.
    """
    inputs = np.isin(assignment, (TRAIN, FOLD_IN))  # the input matrix: training and fold-in rows
    overall = row_statistics(np.bincount(table.user[inputs], minlength=table.n_users))  # the same on every rank
    if shard is not None:
        inputs &= shard.owns(table.user)
    lengths = np.bincount(table.user[inputs], minlength=table.n_users)
    if shard is not None:
        lengths = lengths[shard.users]
    mine = (lambda samples: samples) if shard is None else shard.local
    # The loader holds every training sample it may draw (all of them unless users are sharded) and this
    # rank's epoch order. The evaluation sets: the training and validation ones, then the whole validation
    # split for the best model while the first two still exist. Unsharded, only rank 0 evaluates, and each
    # set copies its whole split; sharded, a rank copies only its part of the subset scored.
    n_samples = len(mine(splits.train))
    if shard is None:
        n_eval = len(splits.train) + 2 * len(splits.validation) if replicas.is_main else 0
    else:
        B = cfg.eval_batch_size or cfg.batch_size
        n_eval = sum(len(shard.evaluation_subset(splits[name], B, cfg.eval_batches, cfg.seed))
                     for name in ("train", "validation")) + len(mine(splits.validation))  # fmt: skip
    stats = row_statistics(lengths)
    input_bytes = 2 if cfg.precision == "bf16" else 4
    path = cfg.input_path
    if path == "auto":
        moved = {p: step_bytes(table.n_items, overall, cfg.batch_size, p, embedding_dim=cfg.hidden[0],
                               input_bytes=input_bytes).moved for p in PATHS}  # fmt: skip
        path = "sparse" if moved["sparse"] < moved["dense"] else "dense"
        if cfg.optimizer == "lazy-adam" and not lazy_parameter_names(path, cfg.softmax):
            raise ValueError(_NOTHING_LAZY.format(path=f"{path} (chosen by --input-path auto: it moves fewer bytes)"))
    return planner.estimate(
        len(lengths),
        table.n_items,
        int(inputs.sum()),
        n_samples,
        cfg.batch_size,
        hidden=tuple(cfg.hidden),
        path=path,
        softmax=cfg.softmax,
        negatives=cfg.negatives if cfg.softmax == "sampled" else None,
        # The loader's batch dtype: bf16 rows only on the dense path (bags are float32 either way).
        out_dtype=torch.bfloat16 if cfg.precision == "bf16" and path == "dense" else torch.float32,
        max_row_length=max(stats[1], 1),
        device=backend.name,
        values=cfg.input_values != "implicit",
        n_eval_samples=n_eval,
        eval_batch_size=cfg.eval_batch_size,
        precision=cfg.precision,
        world_size=replicas.world_size,
        epoch_samples=None if shard is None else shard.epoch_samples,
        optimizer=cfg.optimizer,  # lazy-adam with --compile was refused before this
        mean_bag_length=overall[0],
        compiled=cfg.compile,
        lazy_names=lazy_names,
    )


def plan_run(
    cfg: TrainConfig, table: RatingsTable, splits, assignment, backend, replicas: Replicas, shard, saved_lazy=None
) -> tuple[str, tuple[str, ...]]:
    """Choose the input path and the lazily updated tables; refuse, before anything is allocated, a run that
    cannot fit the device.

    Returns the input path and the parameters lazy Adam updates (:func:`gpu_ann.optim.lazy_tables`; empty for
    plain Adam), or for a resumed run ``saved_lazy``, those its saved optimiser state names: the rule, or what
    it reads, may have changed since the run was saved. Everything here is host arithmetic on sizes (and one
    query of the device's free memory, a sync, when no budget is given).
    """
    plan = memory_plan(cfg, table, splits, assignment, backend, replicas, shard, lazy_names=saved_lazy)
    s = plan.settings
    path = s["path"]
    if saved_lazy is not None:
        lazy = tuple(saved_lazy)
    else:  # every rank's rows count (the gather moves them all, RowAdam steps on them all): the planner's rule too
        lazy = lazy_tables(cfg.optimizer, path, cfg.softmax, table.n_items, cfg.batch_size, s["mean_bag_length"],
                           cfg.negatives if cfg.softmax == "sampled" else 0, cfg.compile,
                           world_size=replicas.world_size)  # fmt: skip
    if cfg.memory_budget is not None:
        budget, where = cfg.memory_budget, "--memory-budget"
    else:
        budget = int(0.9 * device_budget(backend))  # host-device sync on CUDA, once
        where = f"90% of the memory free on {backend.torch_device}"
    planner.check(plan, budget, where)
    updates = f"lazy Adam for {', '.join(lazy)}" if lazy else "Adam"
    log.info("input path %s, softmax %s, %s; estimated memory %s of %s", path, cfg.softmax, updates,
             planner.format_bytes(plan.total), planner.format_bytes(budget))  # fmt: skip
    return path, lazy


def user_shard(cfg: TrainConfig, splits, n_users: int, replicas: Replicas) -> UserShard | None:
    """This rank's users under ``--shard-users`` in a ``torchrun`` group; ``None`` otherwise."""
    if not cfg.shard_users or not replicas.distributed:
        return None
    shard = shard_users(splits.train.user, n_users, replicas.rank, replicas.world_size)
    log.info("rank %d holds %d of %d users; %d training samples per epoch on every rank",
             replicas.rank, len(shard.users), n_users, shard.epoch_samples)  # fmt: skip
    return shard


def negative_sampler(cfg: TrainConfig, splits, n_items: int, device: torch.device) -> NegativeSampler | None:
    if cfg.softmax == "full":
        return None
    counts = np.bincount(splits.train.item, minlength=n_items) if cfg.negative_sampling == "popularity" else None
    return NegativeSampler(
        n_items, cfg.negatives, cfg.negative_sampling, counts, power=0.75, device=device, seed=cfg.seed
    )


@dataclasses.dataclass
class Run:
    """What a rank builds before its first step (:func:`build_run`)."""

    matrix: object
    loader: BatchLoader
    eval_sets: dict
    popularity: float
    model: CandidateGenerator
    optimizer: object
    lazy_groups: list  # tuples of the lazy parameters, by shared rows (gpu_ann.sparse_rows.row_groups)
    sampler: NegativeSampler | None
    objective: Objective
    run_log: RunLog | None
    fixed: Callable  # (samples, n_batches) -> the fixed evaluation batches of a split (this rank's part)
    evaluates: bool  # this rank scores evaluation batches


def build_run(cfg: TrainConfig, table, splits, assignment, backend, replicas: Replicas, shard, path: str, lazy) -> Run:
    """This rank's matrix, loader, evaluation sets, model, optimiser, sampler, loss and (rank 0) run log.

    Its own work, with no collective: the trainer runs it through ``replicas.attempt`` and then agrees on
    the outcome, so a rank that fails here (out of memory building its matrix, say) stops the others too.
    """
    n_items = table.n_items
    mine = (lambda samples: samples) if shard is None else shard.local  # this rank's samples, as matrix rows
    with stage(f"building the matrix on {backend.name}"):
        # Training plus fold-in rows (only training rows give examples), valued as the input mode says.
        matrix = input_matrix(backend, table, assignment, cfg.input_values, None if shard is None else shard.users)
    loader = BatchLoader(
        matrix,
        mine(splits.train),
        cfg.batch_size,
        replacement=cfg.sampling == "replacement",
        seed=cfg.seed,
        dtype=torch.bfloat16 if cfg.precision == "bf16" and path == "dense" else torch.float32,
        path=path,
        # Unsharded, every rank takes a share of one epoch order; sharded, each runs its own samples.
        rank=replicas.rank if shard is None else 0,
        world_size=replicas.world_size if shard is None else 1,
        epoch_samples=None if shard is None else shard.epoch_samples,
    )
    # Evaluation runs between steps, so it shares the training loader's buffers. Rank 0 evaluates, or, with
    # sharded users, every rank its own users' part of the same fixed subsets; the sums meet in one
    # all-reduce, so the logged losses are those of the samples one process would score.
    buffers = loader.buffers
    Fixed = FixedBags if path == "sparse" else FixedBatches
    eval_batch = cfg.eval_batch_size or cfg.batch_size
    evaluates = replicas.is_main or shard is not None

    def fixed(samples, n_batches: int | None):
        """The fixed evaluation batches of a split; sharded, this rank's part of those one process scores."""
        if shard is None:
            return Fixed(matrix, samples, eval_batch, n_batches, cfg.seed, buffers)
        owned = shard.evaluation_subset(samples, eval_batch, n_batches, cfg.seed)
        return Fixed(matrix, owned, eval_batch, None, cfg.seed, buffers)

    eval_sets = {name: fixed(splits[name], cfg.eval_batches) for name in (("train", "validation") if evaluates else ())}
    popularity = popularity_loss(splits.train.item, splits.validation.item, n_items)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = CandidateGenerator(n_items, cfg.hidden).to(backend.torch_device)
    # Lazy Adam (lazy_tables, in plan_run): sparse gradients for those item tables, and updates of the rows touched.
    optimizer = model.configure_optimizer(cfg.lr, lazy)
    # Their gradients are sparse; under torchrun each group (the output layer's weight and bias share their
    # rows) is gathered and coalesced as one.
    named = dict(model.named_parameters())
    lazy_groups = [tuple(named[name] for name in group) for group in row_groups(lazy)]
    sampler = negative_sampler(cfg, splits, n_items, backend.torch_device)
    objective = Objective(model, sampler, cfg.precision, cfg.compile, sparse_grad=lazy)

    run_log = RunLog(Path(cfg.out), popularity, cfg.tensorboard) if replicas.is_main else None
    return Run(
        matrix,
        loader,
        eval_sets,
        popularity,
        model,
        optimizer,
        lazy_groups,
        sampler,
        objective,
        run_log,
        fixed,
        evaluates,
    )

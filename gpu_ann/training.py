"""Training the candidate generator: a loop that reads top to bottom, with no device branches.

What differs between runs (dense rows or bags, full or sampled softmax, fp32 or bf16, one process or a
``torchrun`` group) is decided and built once before the loop (:mod:`gpu_ann.run_setup`), and hidden behind
the loader, :class:`~gpu_ann.objective.Objective` and :class:`~gpu_ann.distributed.Replicas`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gpu_ann.backend import get_backend
from gpu_ann.checkpoint import (
    MODEL_FILE,
    Checkpoint,
    CheckpointError,
    ResumeState,
    check_model_shape,
    data_difference,
    data_summary,
    fingerprint,
    load_checkpoint,
    load_data,
    load_resume_state,
    remove_stale_temporaries,
    save_checkpoint,
    save_data,
    save_resume_state,
)
from gpu_ann.data.readers import read_ratings
from gpu_ann.data.table import RatingsTable
from gpu_ann.distributed import Replicas
from gpu_ann.progress import stage
from gpu_ann.run_directory import check_output_directory, staged_run_directory
from gpu_ann.run_setup import build_run, check_choices, plan_run, user_shard
from gpu_ann.splits import make_split, splits_from_assignment, splits_from_tables
from gpu_ann.train_config import TrainConfig, TrainResult, load_table

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "load_table", "resume_run", "train"]

log = logging.getLogger("gpu_ann.training")


class TrainingDiverged(RuntimeError):
    """The loss stopped being a finite number."""


def _read_and_split(cfg: TrainConfig, table: RatingsTable | None, resume) -> tuple:
    """``(table, splits, assignment)``: the ratings and split ``cfg`` names, or a resumed run's stored split."""
    if table is None and cfg.train_file is None:
        with stage("reading ratings"):
            table = load_table(cfg)
    if resume is not None:
        return table, splits_from_assignment(table, resume[1]), resume[1]
    if cfg.train_file is not None:
        if cfg.validation_file is None:
            raise ValueError("a split given as files needs --validation as well as --train")
        options = dict(user_col=cfg.user_col, item_col=cfg.item_col, rating_col=cfg.rating_col, sep=cfg.sep)
        with stage("reading the split files"):
            files = (cfg.train_file, cfg.validation_file, cfg.test_file)
            parts = [read_ratings(path, header=cfg.header, **options) if path else None for path in files]
            return splits_from_tables(*parts)
    with stage("splitting"):
        splits, assignment = make_split(
            table, cfg.protocol, cfg.split, cfg.seed, cfg.min_user_items, cfg.leave_last, cfg.fold_in
        )
    return table, splits, assignment


def train(cfg: TrainConfig, table: RatingsTable | None = None, resume=None) -> TrainResult:
    """Train on ``table`` (default: read as ``cfg`` says); writes ``data.npz`` and the best ``model.pt``.

    Every ``cfg.eval_every`` steps (and at the last step) the model is scored on fixed batches of the
    training and validation splits; an improvement on validation is checkpointed, and training stops
    after ``cfg.patience`` evaluations without one, or after ``max_steps`` / ``max_epochs``. The run
    directory ``cfg.out`` appears whole with the first checkpoint (replacing an earlier run's there; see
    :mod:`gpu_ann.run_directory`) and then holds ``data.npz``, ``model.pt``, ``last.pt``,
    ``config.toml``, ``metrics.jsonl`` and ``curves.png``. The loss is read back to the host only at
    evaluation time. Under ``torchrun`` every rank trains on its share of each batch and only rank 0
    evaluates and writes (see :mod:`gpu_ann.distributed`).

    Parameters
    ----------
    cfg : TrainConfig
        The run's settings.
    table : RatingsTable, optional
        Ratings already in memory; ``None`` reads them as ``cfg`` says (:func:`load_table`).
    resume : (ResumeState, numpy.ndarray), optional
        Internal to :func:`resume_run`: the state to continue from and the run's stored split.

    Returns
    -------
    TrainResult
        Losses of the best model, the evaluation history and throughput.

    Raises
    ------
    TrainingDiverged
        The validation loss stopped being finite.
    DataError
        The ratings cannot be read, or give an empty training or validation split.
    CheckpointError
        ``cfg.out`` is a file, a link, the current directory (or one above it), or a directory holding files
        a run does not write (checked first).
    BackendUnavailable
        ``cfg.backend == "cuda"`` where CUDA cannot run.
    MemoryBudgetExceeded
        The planner's estimate for these settings exceeds the memory budget (nothing was allocated).
    RankFailed
        Under ``torchrun``: another rank raised an error; this one stopped at the same check.
    ValueError
        Invalid settings, e.g. split fractions that do not sum to 1 or an unknown backend.
    """
    started = time.perf_counter()
    check_choices(cfg)
    if resume is None:
        check_output_directory(Path(cfg.out))  # every rank, before anything is read or allocated
    backend = get_backend(cfg.backend, device=int(os.environ.get("LOCAL_RANK", "0")) if cfg.backend != "cpu" else None)
    replicas = Replicas(backend.name)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if cfg.deterministic:
        # cuBLAS reads this when it creates its handle: a process that already ran a CUDA matmul keeps its
        # workspace, so set it before the first one (the CLI's runs do).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    try:
        return _train(cfg, table, resume, backend, replicas, started)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        replicas.close()


def _train(cfg, table, resume, backend, replicas: Replicas, started: float) -> TrainResult:
    table, splits, assignment = _read_and_split(cfg, table, resume)
    n_items = table.n_items
    log.info(
        "data %s: %d users, %d items, %s; %d train / %d validation / %d test samples; backend %s",
        table.source,
        table.n_users,
        n_items,
        table.summary,
        len(splits.train),
        len(splits.validation),
        len(splits.test),
        backend.name,
    )
    shard = user_shard(cfg, splits, table.n_users, replicas)
    # Every rank checks its own plan (sizes and free memory differ between ranks), and they agree on the
    # outcome before any other collective: a rank that does not fit stops the others too, rather than
    # leaving them waiting for it in the first gradient all-reduce.
    # A resumed run updates lazily what it did when saved (LazyAdam's state names its tables, Adam's none).
    saved_lazy = None if resume is None else tuple(resume[0].optimizer_state.get("lazy_names", ()))
    planned = replicas.attempt(plan_run, cfg, table, splits, assignment, backend, replicas, shard, saved_lazy)
    replicas.settle(" in its memory plan")
    path, lazy = planned

    # Every rank builds its own part; they agree on the outcome before the first step's collectives.
    built = replicas.attempt(build_run, cfg, table, splits, assignment, backend, replicas, shard, path, lazy)
    replicas.settle(" while setting up")
    loader, eval_sets, popularity, model = built.loader, built.eval_sets, built.popularity, built.model
    optimizer, lazy_groups, sampler, objective = built.optimizer, built.lazy_groups, built.sampler, built.objective
    run_log, fixed, evaluates = built.run_log, built.fixed, built.evaluates

    run_dir = Path(cfg.out)
    data_fp, data_info = fingerprint(table), data_summary(table)

    max_steps = cfg.max_steps if cfg.max_steps is not None else cfg.max_epochs * len(loader)
    best, bad_evals, step, history = math.inf, 0, 0, []
    epoch, batch_in_epoch = 0, 0
    if resume is not None:
        state = resume[0]
        if state.world_size != replicas.world_size:
            raise CheckpointError(
                f"{run_dir}: the run trained with {state.world_size} rank(s) and is resumed with "
                f"{replicas.world_size}; each epoch's samples are split among the ranks, so resume it with the same "
                f"number (torchrun --nproc-per-node x --nnodes = {state.world_size})"
            )

        def restore() -> None:
            model.load_state_dict(state.model_state)
            optimizer.load_state_dict(state.optimizer_state)
            torch.set_rng_state(state.torch_rng)
            if state.cuda_rng and backend.name == "cuda":
                torch.cuda.set_rng_state_all(state.cuda_rng)
            if sampler is not None and state.sampler_rng is not None:
                sampler.set_state(state.sampler_rng)

        replicas.attempt(restore)  # a rank that cannot load the state stops the others at the check below
        replicas.settle(" while resuming")
        best, bad_evals, step, history = state.best_validation_loss, state.bad_evals, state.step, list(state.history)
        epoch, batch_in_epoch = state.epoch, state.batch_in_epoch
        started -= state.elapsed_s  # times and throughput continue from the interrupted run
        if run_log is not None:
            run_log.restore(history)
        log.info("resuming %s at step %d (epoch %d, batch %d)", run_dir, step, epoch, batch_in_epoch)
    bar = tqdm(
        total=max_steps, initial=step, unit="step", desc="train", disable=None if replicas.is_main else True,
        dynamic_ncols=True,
    )  # fmt: skip
    stop = step >= max_steps or (resume is not None and resume[0].finished)
    since = {"step": step, "time": time.perf_counter()}  # training throughput between evaluations

    def save_state(finished: bool = False, directory: Path = run_dir) -> None:
        """``last.pt``: the current weights, optimiser, sampler position, RNGs and early-stopping state."""
        cuda_rng = torch.cuda.get_rng_state_all() if backend.name == "cuda" else []
        save_resume_state(
            directory,
            ResumeState(
                model.state_dict(),
                optimizer.state_dict(),
                cfg.to_dict(),
                step,
                epoch,
                batch_in_epoch,
                best,
                bad_evals,
                history,
                torch.get_rng_state(),
                cuda_rng,
                data_fp,
                finished,
                time.perf_counter() - started,
                sampler.get_state() if sampler is not None else None,
                replicas.world_size,
                data_info,
            ),
        )

    def mean_losses(sets: dict, names=("train", "validation")) -> dict[str, float]:
        """Full-softmax cross-entropy per sample of each named set of fixed batches, over all ranks' sets.

        Every rank calls it (a rank without a set adds nothing): one all-reduce under ``torchrun``, which is
        a check (it raises on every rank when one has failed), and one host-device sync.
        """
        sums = torch.zeros(2 * len(names), dtype=torch.float64, device=backend.torch_device)

        def add_up() -> None:
            model.eval()
            with torch.no_grad():
                for k, name in enumerate(names):
                    for b in sets.get(name, ()):
                        sums[2 * k] += objective.summed_cross_entropy(b)
                    sums[2 * k + 1] = sets[name].n_samples if name in sets else 0
            model.train()

        replicas.attempt(add_up)
        replicas.all_sum(sums, f" by step {step}")
        totals = sums.tolist()  # host-device sync
        return {name: totals[2 * k] / totals[2 * k + 1] for k, name in enumerate(names)}

    def evaluate(epoch: int, losses: dict[str, float], loss: torch.Tensor, trained_until: float) -> bool:
        """Rank 0: log losses, checkpoint an improvement; True when patience has run out.

        ``trained_until`` is when the steps since the last evaluation had finished on the device: the
        throughput logged counts those steps only, not this evaluation or the last one's checkpoint writes.
        """
        nonlocal best, bad_evals
        bar.set_postfix(loss=f"{loss.item():.3f}")  # the last step's loss; host-device sync, at log time only
        samples_per_s = (step - since["step"]) * cfg.batch_size / (trained_until - since["time"])
        samples_per_s *= replicas.world_size
        if not math.isfinite(losses["validation"]):
            raise TrainingDiverged(
                f"validation loss is {losses['validation']} at step {step}; try a lower --lr (now {cfg.lr})"
            )
        improved = losses["validation"] < best
        if improved:
            best, bad_evals = losses["validation"], 0
        else:
            bad_evals += 1
        record = {
            "step": step,
            "epoch": epoch,
            "train_loss": losses["train"],
            "validation_loss": losses["validation"],
            "best_validation_loss": best,
            "improved": improved,
            "popularity_validation_loss": popularity,
            "samples_per_s": samples_per_s,
            "elapsed_s": time.perf_counter() - started,
        }
        first = not history  # (the first evaluation always improves: it is finite)
        history.append(record)
        # The first checkpoint's files are written beside the run directory and renamed into place together:
        # a kill leaves no run directory (or the earlier run in it, whole) or a complete, resumable one.
        with staged_run_directory(run_dir) if first else contextlib.nullcontext(run_dir) as directory:
            if first:
                save_data(directory, table, assignment)
            if improved:
                best_model = Checkpoint(
                    model.state_dict(), cfg.to_dict(), step, epoch, best, data_fp, optimizer.state_dict(), data_info
                )
                save_checkpoint(directory, best_model)
            run_log.write(record, directory)
            save_state(directory=directory)
        run_log.tensorboard(record)
        since.update(step=step, time=time.perf_counter())
        bar.write(
            f"step {step:6d}  epoch {epoch}  train loss {losses['train']:.4f}  "
            f"validation loss {losses['validation']:.4f}  (popularity {popularity:.4f})"
            f"{'  *saved' if improved else ''}"
        )
        return bad_evals >= cfg.patience

    def train_step(batches) -> torch.Tensor:
        """Forward and backward of the epoch's next batch (the ranks then average the gradients)."""
        loss = objective.loss(next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    def finish() -> None:
        """Rank 0: the final ``last.pt``, the logs closed, and the best weights loaded back."""
        if history:
            save_state(finished=True)
        run_log.close()
        model.load_state_dict(load_checkpoint(run_dir).model_state)

    # A rank's own work goes through replicas.attempt: under torchrun an error is kept, the rank goes on
    # joining the collectives without working, and the next check (the replica check, an evaluation's
    # all-reduce, the stop agreement) raises on every rank (see gpu_ann.distributed); in one process
    # attempt() just calls. The loop counts steps rather than the loader's batches, so a rank whose loader
    # failed still takes every step with the others.
    while not stop:
        loader.set_epoch(epoch, start_batch=batch_in_epoch)
        batches = iter(loader)
        for _ in range(batch_in_epoch, len(loader)):  # the same count on every rank
            loss = replicas.attempt(train_step, batches)
            replicas.average_gradients(model.parameters(), lazy_groups)  # waits for the other ranks (torchrun only)
            replicas.attempt(optimizer.step)
            step += 1
            batch_in_epoch += 1
            bar.update()
            if cfg.replica_check_every and step % cfg.replica_check_every == 0:
                replicas.check_identical(model.parameters(), step)
            if step % cfg.eval_every == 0 or step == max_steps:
                backend.synchronize()  # host-device sync, at evaluation time only: the steps' end, for the throughput
                trained_until = time.perf_counter()
                losses = mean_losses(eval_sets)  # every rank joins; raises everywhere if a rank has failed
                if replicas.is_main:
                    stop = replicas.attempt(evaluate, epoch, losses, loss, trained_until)
                stop = replicas.agree(stop, f" by step {step}")  # rank 0 decides for all, or everyone raises
            if stop or step >= max_steps:
                stop = True
                break
        else:
            epoch, batch_in_epoch = epoch + 1, 0
    bar.close()
    seconds = time.perf_counter() - started
    if replicas.is_main:
        replicas.attempt(finish)
    if shard is not None:
        replicas.broadcast(model.state_dict().values())  # rank 0's best weights, for every rank's own users

    # The best model on the whole validation split, against popularity on the same samples.
    def whole_split() -> dict:
        return {"validation": fixed(splits.validation, None)}

    whole = (replicas.attempt(whole_split) or {}) if evaluates else {}
    with stage("evaluating the best model on the whole validation split"):
        final = mean_losses(whole, ("validation",))["validation"]
    if not replicas.is_main:
        return TrainResult(run_dir, step, math.nan, math.nan, popularity, [], seconds, config=cfg)
    return TrainResult(
        run_dir=run_dir,
        steps=step,
        best_validation_loss=best,
        final_validation_loss=final,
        popularity_validation_loss=popularity,
        history=history,
        seconds=seconds,
        samples_per_second=step * cfg.batch_size * replicas.world_size / seconds if seconds else 0.0,
        example_user=str(table.user_ids[0]),
        config=cfg,
    )


def resume_run(run_dir: str | Path) -> TrainResult:
    """Continue the run in ``run_dir`` from its ``last.pt`` exactly where it stopped.

    The data and split come from the run's ``data.npz``, the settings from its saved config; with the
    same backend the result is the one the uninterrupted run would have given (bit-identical on the
    CPU). Temporary files a killed writer left behind are removed first.

    Parameters
    ----------
    run_dir : str or Path
        A run directory with ``last.pt``, ``data.npz`` and ``model.pt``.

    Returns
    -------
    TrainResult
        As :func:`train`; for a finished run, training does no further step.

    Raises
    ------
    CheckpointError
        Files missing, unreadable, of another format version, from other data or of another model shape;
        the message says what differs.
    """
    run_dir = Path(run_dir)
    stale = remove_stale_temporaries(run_dir) if run_dir.is_dir() else []
    if stale:
        log.info("removed temporary files of an interrupted write: %s", ", ".join(stale))
    state = load_resume_state(run_dir)
    table, assignment = load_data(run_dir)
    if state.data_fingerprint != fingerprint(table):
        difference = data_difference(state.data_summary, table, state.model_state, "last.pt", "data.npz")
        raise CheckpointError(f"{run_dir}: last.pt and data.npz come from different data: {difference}")
    # model.pt is loaded at the end of the run: refuse one of other data or another shape now, not then. Mapped,
    # not read: the check touches shapes only (and no reference is kept, which would pin a second copy).
    best_weights = load_checkpoint(run_dir, table, mmap=True).model_state
    check_model_shape(run_dir / MODEL_FILE, best_weights, state.config["hidden"], table.n_items, "last.pt")
    del best_weights
    # TOML-free round trip: the saved dict holds lists where the config has tuples.
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in state.config.items()}
    values.setdefault("optimizer", "adam")  # runs saved before --optimizer existed trained with Adam
    cfg = dataclasses.replace(TrainConfig(**values), out=str(run_dir))
    return train(cfg, table, resume=(state, assignment))

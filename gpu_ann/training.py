"""Training the candidate generator: a loop that reads top to bottom, with no device branches."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gpu_ann.backend import get_backend
from gpu_ann.batching import FixedBatches
from gpu_ann.checkpoint import (
    STATE_FILE,
    Checkpoint,
    CheckpointError,
    ResumeState,
    fingerprint,
    load_checkpoint,
    load_data,
    load_resume_state,
    remove_stale_temporaries,
    save_checkpoint,
    save_data,
    save_resume_state,
)
from gpu_ann.data.readers import load_bundled_anime, read_ratings
from gpu_ann.data.table import RatingsTable
from gpu_ann.loader import BatchLoader
from gpu_ann.metrics import mean_loss, popularity_loss
from gpu_ann.model import CandidateGenerator
from gpu_ann.progress import stage
from gpu_ann.run_log import RunLog
from gpu_ann.splits import make_split, splits_from_assignment, splits_from_tables
from gpu_ann.values import input_matrix

log = logging.getLogger("gpu_ann.training")


class TrainingDiverged(RuntimeError):
    """The loss stopped being a finite number."""


@dataclass
class TrainConfig:
    """Everything a training run needs; split, model and optimiser defaults are the seed notebook's.

    Saved with every checkpoint (:meth:`to_dict`) and written as ``config.toml`` in the run directory.

    Parameters
    ----------
    data : str, optional
        Ratings file to read; ``None`` reads the bundled anime ratings.
    user_col, item_col, rating_col : str, optional
        Column names or 0-based positions for :func:`gpu_ann.read_ratings`; ``None`` lets it guess.
    sep : str, optional
        Field separator for text files; ``None`` picks it from the suffix or the first line.
    header : bool
        Whether a text file's first line holds column names.
    split : tuple of three floats
        Train / validation / test shares (of interactions, of each user's items, or of users, by protocol).
    protocol : {"random", "per-user", "leave-last", "users"}
        The split protocol, see :func:`gpu_ann.splits.make_split`.
    train_file, validation_file, test_file : str, optional
        A split given as files (read with the same column options); replaces ``data`` and ``protocol``.
    min_user_items : int
        ``per-user``: users with fewer interactions stay whole in training.
    leave_last : int
        ``leave-last``: interactions per user in each of validation and test.
    fold_in : float
        ``users``: share of a held-out user's items used as input.
    seed : int
        Seeds the split, the epoch orders, the evaluation batches and the model's initial weights.
    hidden : tuple of three ints
        Hidden layer widths of :class:`gpu_ann.CandidateGenerator`.
    lr : float
        Adam learning rate.
    batch_size : int
        Samples per training and evaluation batch.
    sampling : {"epoch", "replacement"}
        ``"epoch"``: each sample once per epoch, shuffled; ``"replacement"``: drawn with replacement
        (the seed notebook's sampling).
    eval_every : int
        Training steps between evaluations.
    eval_batches : int
        Fixed random batches per split (train and validation) in each evaluation.
    patience : int
        Evaluations without a better validation loss before training stops.
    max_epochs : int
        Epochs to train when ``max_steps`` is None.
    max_steps : int, optional
        Steps to train; overrides ``max_epochs``.
    backend : {"auto", "cpu", "cuda"}
        See :func:`gpu_ann.get_backend`.
    out : str
        Run directory for data, checkpoint, config and logs.
    tensorboard : bool
        Also log to ``out/tensorboard`` (needs the tensorboard package).
    """

    # data: None = the bundled anime ratings
    data: str | None = None
    user_col: str | None = None
    item_col: str | None = None
    rating_col: str | None = None
    sep: str | None = None
    header: bool = True
    # split: the seed's seeded random 80/10/10 split of the interactions
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    protocol: str = "random"  # random | per-user | leave-last | users (gpu_ann.splits.make_split)
    train_file: str | None = None  # the user's own split: training interactions (replaces data + protocol)
    validation_file: str | None = None  # ... validation interactions (needed with train_file)
    test_file: str | None = None  # ... test interactions (optional)
    min_user_items: int = 5  # per-user: users with fewer items stay in training
    leave_last: int = 1  # leave-last: items per user in each of validation and test
    fold_in: float = 0.8  # users: share of a held-out user's items used as input
    # model and optimiser: the seed's MLP and Adam(1e-3)
    input_values: str = "implicit"  # implicit | rating | residual (gpu_ann.values)
    hidden: tuple[int, int, int] = (256, 512, 256)
    lr: float = 1e-3
    batch_size: int = 1024
    sampling: str = "epoch"  # "epoch": shuffled, each sample once per epoch; "replacement": the seed's
    # evaluation and stopping
    eval_every: int = 100  # steps between evaluations
    eval_batches: int = 10  # fixed random batches per split per evaluation
    patience: int = 5  # evaluations without a better validation loss before stopping
    max_epochs: int = 3
    max_steps: int | None = None
    # where
    backend: str = "auto"
    out: str = "runs/anime"
    tensorboard: bool = False  # also log to run_dir/tensorboard (needs the tensorboard package)

    def to_dict(self) -> dict:
        """The fields as a new dict (``dataclasses.asdict``: tuples stay tuples)."""
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    """What :func:`train` returns; losses are mean cross-entropies in nats.

    Parameters
    ----------
    run_dir : Path
        The run directory written.
    steps : int
        Optimiser steps taken.
    best_validation_loss : float
        Best loss on the fixed validation batches, the one checkpointed.
    final_validation_loss : float
        Loss of that best model on the whole validation split.
    popularity_validation_loss : float
        The add-one smoothed popularity baseline on the whole validation split.
    history : list of dict
        One record per evaluation (the lines of ``metrics.jsonl``).
    seconds : float
        Wall time from the start of the run to the end of training (reading and evaluations included,
        the final whole-split evaluation not).
    samples_per_second : float
        Training samples (``steps * batch_size``) over ``seconds``.
    example_user : str
        A raw user id of the data, for the hint printed at the end.
    config : TrainConfig
        The settings the run used.
    """

    run_dir: Path
    steps: int
    best_validation_loss: float
    final_validation_loss: float  # the best model on the whole validation split
    popularity_validation_loss: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    samples_per_second: float = 0.0  # training samples over the whole run's time, evaluation included
    example_user: str = ""  # a raw user id of the data, for the hint printed at the end
    config: TrainConfig | None = None  # the settings the run used


def load_table(cfg: TrainConfig) -> RatingsTable:
    """Read the ratings ``cfg`` names: ``cfg.data`` with its column options, or the bundled anime data.

    Parameters
    ----------
    cfg : TrainConfig
        Uses ``data``, ``user_col``, ``item_col``, ``rating_col``, ``sep`` and ``header``.

    Returns
    -------
    RatingsTable

    Raises
    ------
    DataError
        The file cannot be read as ratings; the message names the file, line and value.
    """
    if cfg.data is None:
        return load_bundled_anime()
    return read_ratings(
        cfg.data,
        user_col=cfg.user_col,
        item_col=cfg.item_col,
        rating_col=cfg.rating_col,
        sep=cfg.sep,
        header=cfg.header,
    )


def train(cfg: TrainConfig, table: RatingsTable | None = None, resume=None) -> TrainResult:
    """Train on ``table`` (default: read as ``cfg`` says); writes ``data.npz`` and the best ``model.pt``.

    Every ``cfg.eval_every`` steps (and at the last step) the model is scored on fixed batches of the
    training and validation splits; an improvement on validation is checkpointed, and training stops
    after ``cfg.patience`` evaluations without one, or after ``max_steps`` / ``max_epochs``. The run
    directory ``cfg.out`` appears with the first checkpoint and then holds ``data.npz``, ``model.pt``,
    ``config.toml``, ``metrics.jsonl`` and ``curves.png``. The loss is read back to the host only at
    evaluation time.

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
    BackendUnavailable
        ``cfg.backend == "cuda"`` where CUDA cannot run.
    ValueError
        Invalid settings, e.g. split fractions that do not sum to 1 or an unknown backend.
    """
    started = time.perf_counter()
    backend = get_backend(cfg.backend)
    if table is None and cfg.train_file is None:
        with stage("reading ratings"):
            table = load_table(cfg)
    if resume is not None:
        state, assignment = resume
        splits = splits_from_assignment(table, assignment)
    elif cfg.train_file is not None:
        if cfg.validation_file is None:
            raise ValueError("a split given as files needs --validation as well as --train")
        with stage("reading the split files"):
            parts = [
                read_ratings(
                    path,
                    user_col=cfg.user_col,
                    item_col=cfg.item_col,
                    rating_col=cfg.rating_col,
                    sep=cfg.sep,
                    header=cfg.header,
                )
                if path
                else None
                for path in (cfg.train_file, cfg.validation_file, cfg.test_file)
            ]
            table, splits, assignment = splits_from_tables(*parts)
    else:
        with stage("splitting"):
            splits, assignment = make_split(
                table, cfg.protocol, cfg.split, cfg.seed, cfg.min_user_items, cfg.leave_last, cfg.fold_in
            )
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

    with stage(f"building the matrix on {backend.name}"):
        # Training plus fold-in rows (only training rows give examples), valued as the input mode says.
        matrix = input_matrix(backend, table, assignment, cfg.input_values)
    loader = BatchLoader(matrix, splits.train, cfg.batch_size, replacement=cfg.sampling == "replacement", seed=cfg.seed)
    # Evaluation runs between steps, so it shares the training loader's buffers.
    buffers = loader.assembler.buffers
    eval_sets = {
        name: FixedBatches(matrix, splits[name], cfg.batch_size, cfg.eval_batches, cfg.seed, buffers)
        for name in ("train", "validation")
    }
    popularity = popularity_loss(splits.train.item, splits.validation.item, n_items)

    torch.manual_seed(cfg.seed)
    model = CandidateGenerator(n_items, cfg.hidden).to(backend.torch_device)
    optimizer = model.configure_optimizer(cfg.lr)

    run_dir = Path(cfg.out)
    data_fp = fingerprint(table)

    max_steps = cfg.max_steps if cfg.max_steps is not None else cfg.max_epochs * len(loader)
    best, bad_evals, step, history = math.inf, 0, 0, []
    epoch, batch_in_epoch = 0, 0
    run_log = RunLog(run_dir, popularity, cfg.tensorboard)
    if resume is not None:
        model.load_state_dict(state.model_state)
        optimizer.load_state_dict(state.optimizer_state)
        torch.set_rng_state(state.torch_rng)
        if state.cuda_rng and backend.name == "cuda":
            torch.cuda.set_rng_state_all(state.cuda_rng)
        best, bad_evals, step, history = state.best_validation_loss, state.bad_evals, state.step, list(state.history)
        epoch, batch_in_epoch = state.epoch, state.batch_in_epoch
        started -= state.elapsed_s  # times and throughput continue from the interrupted run
        run_log.restore(history)
        log.info("resuming %s at step %d (epoch %d, batch %d)", run_dir, step, epoch, batch_in_epoch)
    bar = tqdm(total=max_steps, initial=step, unit="step", desc="train", disable=None, dynamic_ncols=True)
    stop = step >= max_steps or (resume is not None and state.finished)
    since = {"step": step, "time": time.perf_counter()}  # training throughput between evaluations

    def save_state(finished: bool = False) -> None:
        """``last.pt``: the current weights, optimiser, sampler position, RNGs and early-stopping state."""
        cuda_rng = torch.cuda.get_rng_state_all() if backend.name == "cuda" else []
        save_resume_state(
            run_dir,
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
            ),
        )

    def evaluate(epoch: int) -> bool:
        """Log losses, checkpoint an improvement; True when patience has run out."""
        nonlocal best, bad_evals
        samples_per_s = (step - since["step"]) * cfg.batch_size / (time.perf_counter() - since["time"])
        losses = {name: mean_loss(model, batches) for name, batches in eval_sets.items()}
        if not math.isfinite(losses["validation"]):
            raise TrainingDiverged(
                f"validation loss is {losses['validation']} at step {step}; try a lower --lr (now {cfg.lr})"
            )
        improved = losses["validation"] < best
        if improved:
            best, bad_evals = losses["validation"], 0
            if not history:  # the first checkpoint: the run directory appears only now, complete
                # An earlier run's state in this directory must never be resumed on this run's data.
                (run_dir / STATE_FILE).unlink(missing_ok=True)
                save_data(run_dir, table, assignment)
                run_log.start_fresh()
            save_checkpoint(
                run_dir,
                Checkpoint(model.state_dict(), cfg.to_dict(), step, epoch, best, data_fp, optimizer.state_dict()),
            )
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
        history.append(record)
        if best < math.inf:  # the run directory exists once the first checkpoint is written
            run_log.write(record)
            save_state()
        since.update(step=step, time=time.perf_counter())
        bar.write(
            f"step {step:6d}  epoch {epoch}  train loss {losses['train']:.4f}  "
            f"validation loss {losses['validation']:.4f}  (popularity {popularity:.4f})"
            f"{'  *saved' if improved else ''}"
        )
        return bad_evals >= cfg.patience

    while not stop:
        loader.set_epoch(epoch, start_batch=batch_in_epoch)
        for X, y in loader:
            loss = F.cross_entropy(model(X), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            batch_in_epoch += 1
            bar.update()
            if step % cfg.eval_every == 0 or step == max_steps:
                bar.set_postfix(loss=f"{loss.item():.3f}")  # host-device sync, at log time only
                stop = evaluate(epoch)
            if stop or step >= max_steps:
                stop = True
                break
        else:
            epoch, batch_in_epoch = epoch + 1, 0
    if history:
        save_state(finished=True)
    bar.close()
    run_log.close()
    seconds = time.perf_counter() - started

    # The best model on the whole validation split, against popularity on the same samples.
    model.load_state_dict(load_checkpoint(run_dir).model_state)
    with stage("evaluating the best model on the whole validation split"):
        full_val = FixedBatches(matrix, splits.validation, cfg.batch_size, None, cfg.seed, buffers)
        final = mean_loss(model, full_val)
    return TrainResult(
        run_dir=run_dir,
        steps=step,
        best_validation_loss=best,
        final_validation_loss=final,
        popularity_validation_loss=popularity,
        history=history,
        seconds=seconds,
        samples_per_second=step * cfg.batch_size / seconds if seconds else 0.0,
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
        Files missing, unreadable, or from other data.
    """
    run_dir = Path(run_dir)
    stale = remove_stale_temporaries(run_dir) if run_dir.is_dir() else []
    if stale:
        log.info("removed temporary files of an interrupted write: %s", ", ".join(stale))
    state = load_resume_state(run_dir)
    table, assignment = load_data(run_dir)
    if state.data_fingerprint != fingerprint(table):
        raise CheckpointError(f"{run_dir}: last.pt and data.npz come from different data")
    # TOML-free round trip: the saved dict holds lists where the config has tuples.
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in state.config.items()}
    cfg = dataclasses.replace(TrainConfig(**values), out=str(run_dir))
    return train(cfg, table, resume=(state, assignment))
